"""Random valid networks for property tests: a description (plain data) drawn by hypothesis, and
ONE builder that turns it into a ``torch.nn`` or a ``cnncompile.nn`` network."""
from __future__ import annotations

from hypothesis import strategies as st

ACTS = ("relu", "tanh", "sigmoid", "leaky_relu")


@st.composite
def blocks(draw, depth: int):
    kind = draw(st.sampled_from(["conv", "conv", "bn", "act", "maxpool", "avgpool", "residual", "dense"]))
    if kind == "conv":
        return ("conv", draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                draw(st.integers(0, 1)), draw(st.integers(1, 2)), draw(st.booleans()), draw(st.booleans()))
    if kind == "act":
        return ("act", draw(st.sampled_from(ACTS)))
    if kind in ("maxpool", "avgpool"):
        k = draw(st.integers(2, 3))
        return (kind, k, draw(st.integers(1, 2)), draw(st.integers(0, k // 2)), draw(st.booleans()))
    return (kind,)


@st.composite
def networks(draw):
    return {"channels": draw(st.integers(1, 3)), "size": draw(st.integers(7, 11)),
            "blocks": draw(st.lists(blocks(0), min_size=1, max_size=5)),
            "two_heads": draw(st.booleans()), "classes": draw(st.integers(2, 5)), "batch": draw(st.integers(2, 4)),
            "seed": draw(st.integers(0, 2 ** 16))}


def build(nn, desc, cat):
    """The network ``desc`` describes, in ``nn`` (torch.nn or cnncompile.nn). Raises ValueError
    when the description does not fit (a kernel larger than the map): the caller rejects it."""
    F = nn.functional

    class Residual(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x)) + x

    class Dense(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, 2, 3, padding=1)

        def forward(self, x):
            return cat([x, F.tanh(self.conv(x))], 1)

    layers, c, h = [], desc["channels"], desc["size"]
    for b in desc["blocks"]:
        if b[0] == "conv":
            _, out, k, s, p, d, grouped, bias = b
            groups = c if grouped and out % c == 0 else 1
            span = d * (k - 1) + 1
            if h + 2 * p < span:
                raise ValueError("kernel larger than the map")
            layers.append(nn.Conv2d(c, out, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias))
            c, h = out, (h + 2 * p - span) // s + 1
        elif b[0] == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif b[0] == "act":
            layers.append({"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
                           "leaky_relu": lambda: nn.LeakyReLU(0.1)}[b[1]]())
        elif b[0] in ("maxpool", "avgpool"):
            _, k, s, p, include = b
            if h + 2 * p < k:
                raise ValueError("pool larger than the map")
            layers.append(nn.MaxPool2d(k, s, p) if b[0] == "maxpool" else nn.AvgPool2d(k, s, p, count_include_pad=include))
            h = (h + 2 * p - k) // s + 1
        elif b[0] == "residual":
            layers.append(Residual(c))
        else:
            layers.append(Dense(c))
            c += 2
    features = c * h * h
    trunk = nn.Sequential(*layers, nn.Flatten())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk
            self.cls = nn.Linear(features, desc["classes"])
            if desc["two_heads"]:
                self.reg = nn.Linear(features, 3)

        def forward(self, x):
            z = self.trunk(x)
            return (self.cls(z), self.reg(z)) if desc["two_heads"] else self.cls(z)

    return Net()
