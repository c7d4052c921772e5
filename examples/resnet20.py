"""ResNet-20 for CIFAR-10 (He et al. 2016, §4.2): a 3×3 stem with 16 filters, three stages of
three basic blocks (16, 32, 64 filters; stride 2 at each new stage, 1×1 projection shortcuts),
global average pooling and a 10-way classifier. Batch norm after every convolution.

    cnncompile train examples/resnet20.py --data /path/to/cifar-10-batches-py
Without --data it trains on random images (a smoke run).
"""
from cnncompile import nn, optim

F = nn.functional


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self, blocks=(3, 3, 3), widths=(16, 32, 64), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin, stages = widths[0], []
        for k, (n, width) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, width, stride=2 if (k > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.pool(out).flatten(1))


net = ResNet()
input_shape = (3, 32, 32)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
dataset = "cifar10"
epochs = 1
batch_size = 32
