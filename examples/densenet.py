"""A small DenseNet-BC for 32×32 images (Huang et al. 2017): dense blocks in which every layer
(BN–ReLU–1×1 conv–BN–ReLU–3×3 conv) sees the concatenation of all earlier feature maps, and
transitions (BN–ReLU–1×1 conv with compression 0.5, 2×2 average pool) between blocks.

    cnncompile train examples/densenet.py --data /path/to/cifar-10-batches-py
"""
import cnncompile as cc
from cnncompile import nn, optim

F = nn.functional


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return cc.cat([x, out], 1)


def transition(cin, cout):
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    def __init__(self, growth=12, layers=(4, 4, 4), classes=10):
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        blocks = []
        for k, n in enumerate(layers):
            block = []
            for _ in range(n):
                block.append(DenseLayer(channels, growth))
                channels += growth
            blocks.append(nn.Sequential(*block))
            if k < len(layers) - 1:
                blocks.append(transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        out = F.relu(self.norm(self.features(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


net = DenseNet()
input_shape = (3, 32, 32)
loss = nn.CrossEntropyLoss()
optimizer = optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)
dataset = "cifar10"
epochs = 1
batch_size = 32
