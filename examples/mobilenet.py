"""A MobileNet-style net for 32×32 images (Howard et al. 2017): depth-wise separable blocks, each
a 3×3 depth-wise convolution (groups = channels, one filter per channel) and a 1×1 point-wise
convolution, with batch norm and ReLU after both: the lecture's separable convolution.

    cnncompile train examples/mobilenet.py --data /path/to/cifar-10-batches-py
"""
from cnncompile import nn, optim


def separable(cin, cout, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


net = nn.Sequential(
    nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
    separable(32, 64),
    separable(64, 128, stride=2),
    separable(128, 128),
    separable(128, 256, stride=2),
    separable(256, 256),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    nn.Dropout(0.2), nn.Linear(256, 10),
)
input_shape = (3, 32, 32)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.05, momentum=0.9, weight_decay=4e-5)
dataset = "cifar10"
epochs = 1
batch_size = 32
