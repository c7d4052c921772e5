"""Networks from the lecture, each built by ONE function called with ``torch.nn`` or ``cnncompile.nn``.

``cat`` is the one call that lives outside ``nn`` in both libraries (``torch.cat``, ``cc.cat``).
"""
import cnncompile as cc


def cat_for(nn):
    if nn.__name__.startswith("torch"):
        import torch
        return torch.cat
    return cc.cat


def resnet_basic(nn):
    """He et al.'s basic block, downsampling with a 1×1 projection on the shortcut."""
    F = nn.functional

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
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

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = BasicBlock(3, 4, 1)
            self.block2 = BasicBlock(4, 6, 2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))

    return Net()


def resnet_bottleneck(nn):
    """The 1×1 → 3×3 → 1×1 bottleneck with an identity shortcut."""
    F = nn.functional

    class Bottleneck(nn.Module):
        def __init__(self, channels, width):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(channels)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + x)

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Bottleneck(8, 4), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def dense_block(nn):
    """DenseNet-BC: each layer sees the concatenation of all earlier feature maps."""
    F = nn.functional
    cat = cat_for(nn)

    class DenseLayer(nn.Module):
        def __init__(self, cin, growth):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(2 * growth)
            self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

        def forward(self, x):
            out = self.conv1(F.relu(self.bn1(x)))
            out = self.conv2(F.relu(self.bn2(out)))
            return cat([x, out], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.layer1 = DenseLayer(4, 3)
            self.layer2 = DenseLayer(7, 3)
            self.transition = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 5, 1, bias=False),
                                            nn.AvgPool2d(2))
            self.fc = nn.Linear(5 * 4 * 4, 5)

        def forward(self, x):
            h = self.transition(self.layer2(self.layer1(self.stem(x))))
            return self.fc(h.flatten(1))

    return Net()


def separable(nn):
    """Depth-wise (groups = channels) then point-wise 1×1: the lecture's separable convolution."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12), nn.Conv2d(12, 6, 1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=2),
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def two_heads(nn):
    """The lecture's multi-task net: class scores and a bounding box from one trunk."""
    F = nn.functional

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
            self.classify = nn.Linear(6 * 4 * 4, 5)
            self.box = nn.Linear(6 * 4 * 4, 4)

        def forward(self, x):
            h = self.trunk(x).flatten(1)
            return self.classify(h), F.sigmoid(self.box(h))

    return Net()


INPUT_SHAPE = (3, 8, 8)
CLASSES = 5
ZOO = {"resnet_basic": resnet_basic, "resnet_bottleneck": resnet_bottleneck, "dense_block": dense_block,
       "separable": separable, "two_heads": two_heads}
