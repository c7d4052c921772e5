"""ResNet-18 (He et al. 2016, ImageNet layout): a 7×7 stride-2 stem and 3×3 max pool, four
stages of two basic blocks (64, 128, 256, 512 filters), global average pooling, 1000 classes.
The default data set is random images (no ImageNet here).

    cnncompile summary examples/resnet18.py
"""
import os
import sys

from cnncompile import nn, optim
from cnncompile.training.data import synthetic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet20 import BasicBlock  # noqa: E402  (the same block as ResNet-20's)

F = nn.functional


class ResNet18(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for k, width in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(BasicBlock(cin, width, stride=1 if k == 0 else 2), BasicBlock(width, width)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


net = ResNet18()
input_shape = (3, 224, 224)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)


def dataset():
    return synthetic.random_images(input_shape, 1000, n=16)


epochs = 1
batch_size = 4
