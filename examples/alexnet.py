"""AlexNet as in the lecture: 227×227×3 input, 96 11×11 filters with stride 4, 3×3 stride-2 max
pools, 256 5×5, 384, 384 and 256 3×3 filters, then FC 4096–4096–1000 with dropout 0.5, ReLU
throughout. There is no ImageNet here: the default data set is random images, enough to time a
step and check the compiled code (point --data at your own loader to really train it).

    cnncompile summary examples/alexnet.py
    cnncompile train examples/alexnet.py --epochs 1 --batch-size 8
"""
from cnncompile import nn, optim
from cnncompile.training.data import synthetic

net = nn.Sequential(
    nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(), nn.MaxPool2d(3, stride=2),
    nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, stride=2),
    nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
    nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
    nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2),
    nn.Flatten(),
    nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
    nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
    nn.Linear(4096, 1000),
)
input_shape = (3, 227, 227)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)


def dataset():
    return synthetic.random_images(input_shape, 1000, n=32)


epochs = 1
batch_size = 8
