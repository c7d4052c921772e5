"""Classification + localization, the lecture's multi-task head: one convolutional trunk, a
class head (which shape: square, disc, triangle) trained with cross-entropy, and a box head (its
bounding box as 8 corner coordinates in [0, 1]) trained with L2; the loss is their weighted sum.
Data: generated shapes (cnncompile.training.data.synthetic.shapes).

    cnncompile train examples/bbox.py
"""
from cnncompile import nn, optim
from cnncompile.training.data import synthetic

F = nn.functional


class Localizer(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU())
        self.cls = nn.Linear(128, len(synthetic.SHAPES))
        self.box = nn.Linear(128, 8)

    def forward(self, x):
        h = self.features(x)
        return {"cls": self.cls(h), "box": F.sigmoid(self.box(h))}


net = Localizer()
input_shape = (1, 32, 32)
loss = {"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()}
loss_weights = {"cls": 1.0, "box": 10.0}
optimizer = optim.Adam(lr=2e-3)
epochs = 6
batch_size = 64


def dataset():
    return synthetic.shapes(n=12000, seed=0)


def report(model, data):
    """Class accuracy and mean box IoU on the test split."""
    x, y = data["test"]
    out = model.predict(x)
    accuracy = float((out["cls"].argmax(1) == y["cls"]).mean())
    iou = synthetic.box_iou(out["box"], y["box"])
    return {"class accuracy": accuracy, "mean box IoU": float(iou.mean()), "IoU > 0.5": float((iou > 0.5).mean())}
