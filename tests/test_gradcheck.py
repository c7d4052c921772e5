"""Every op's derived gradient against float64 central differences, over a grid of geometries.

A 1×1 convolution sits in front of the op under test so that the op's input gradient (the
transposed, gathered formula) is checked through that convolution's weight gradient.
"""
import itertools

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from helpers import check_gradients

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 2, 9, 8))
BACKENDS = ["numpy", "llvm"]


def probe(layer, flat_features=None):
    return nn.Sequential(nn.Conv2d(2, 3, 1), layer, nn.Flatten())


def regression_target(net, shape=(2, 2, 9, 8)):
    import cnncompile as cc
    out = cc.compile(net, input_shape=shape[1:]).predict(X)
    return rng.standard_normal(out.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,padding,dilation", list(itertools.product([1, 2, 3], [0, 1, 2], [1, 2])))
def test_conv_geometry(backend, stride, padding, dilation):
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, (3, 2), stride=stride, padding=padding,
                                                      dilation=dilation), nn.Flatten())
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0), ((3, 2), (2, 1), (1, 0))])
def test_max_pool(backend, kernel, stride, padding):
    net = probe(nn.MaxPool2d(kernel, stride, padding))
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,stride,padding,include", [(2, 2, 0, True), (3, 2, 1, True), (3, 2, 1, False),
                                                           (3, 1, 1, False)])
def test_avg_pool(backend, kernel, stride, padding, include):
    net = probe(nn.AvgPool2d(kernel, stride, padding, count_include_pad=include))
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU(0.1)])
def test_activations(backend, activation):
    net = probe(activation)
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.MSELoss(), nn.L1Loss()])
def test_linear_and_losses(backend, loss):
    net = nn.Sequential(nn.Conv2d(2, 2, 3, stride=2), nn.Flatten(), nn.Linear(24, 5), nn.Tanh(), nn.Linear(5, 4))
    y = rng.integers(0, 4, 2) if isinstance(loss, nn.CrossEntropyLoss) else rng.standard_normal((2, 4))
    check_gradients(net, (2, 9, 8), loss, X, y, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_join_and_scalars(backend):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 2, 3, padding=1)
            self.b = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            h = nn.functional.relu(self.a(x))
            return nn.functional.flatten(self.b(h) * 0.5 + x - h * h)

    net = Block()
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


# ----- batch norm, dropout, more layers and joins ---------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm(backend, mode):
    # no bias before a batch norm in training: its true gradient is 0 and the FD quotient pure noise
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=mode == "eval"), nn.BatchNorm2d(3), nn.Tanh(),
                        nn.Conv2d(3, 2, 1, bias=mode == "eval"), nn.BatchNorm2d(2, eps=1e-3, momentum=0.3),
                        nn.Flatten())
    stats = {"1.running_mean": rng.standard_normal(3), "1.running_var": rng.uniform(0.5, 2, 3),
             "4.running_mean": rng.standard_normal(2), "4.running_var": rng.uniform(0.5, 2, 2)}
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend, mode=mode, state=stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_its_mask(backend):
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Dropout(0.3), nn.ReLU(), nn.Flatten(), nn.Linear(126, 4),
                        nn.Dropout(0.5))
    check_gradients(net, (2, 9, 8), nn.CrossEntropyLoss(), X, rng.integers(0, 4, 2), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups,cout", [(2, 4), (4, 4), (4, 8)])
def test_grouped_and_depthwise_conv(backend, groups, cout):
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Conv2d(4, cout, 3, stride=2, padding=1, groups=groups), nn.Flatten())
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concatenation_identity_and_adaptive_pool(backend):
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.b = nn.Conv2d(5, 2, 3, padding=1)
            self.keep = nn.Identity()
            self.pool = nn.AdaptiveAvgPool2d((3, 2))

        def forward(self, x):
            h = cc.cat([x, nn.functional.relu(self.a(x))], 1)
            h = cc.cat([self.keep(h), self.b(h)], 1)
            return self.pool(h).flatten(1)

    net = Dense()
    check_gradients(net, (2, 9, 8), nn.MSELoss(), X, regression_target(net), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_heads_weighted(backend):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), nn.Flatten())
            self.cls = nn.Linear(36, 3)
            self.box = nn.Linear(36, 4)

        def forward(self, x):
            h = self.trunk(x)
            return {"cls": self.cls(h), "box": nn.functional.sigmoid(self.box(h))}

    y = {"cls": rng.integers(0, 3, 2), "box": rng.uniform(0, 1, (2, 4))}
    check_gradients(TwoHeads(), (2, 9, 8), {"cls": nn.CrossEntropyLoss(), "box": nn.L1Loss()}, X, y, backend,
                    loss_weights={"cls": 1.0, "box": 2.5})
