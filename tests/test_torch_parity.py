"""PyTorch (CPU, 2.13) as the outside oracle: each network is built by ONE function that is
called with ``torch.nn`` or with ``cnncompile.nn``; loss, every gradient, and the parameters
after three optimizer steps must agree."""
import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn as cnn
from helpers import relative, torch_state

import torch  # noqa: E402  (the test extra: torch==2.13.0)
BACKENDS = ["numpy", "llvm"]


def lenet5(nn):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def strided_net(nn):
    return nn.Sequential(
        nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2)), nn.Tanh(),
        nn.Conv2d(8, 6, 3, padding=2, dilation=2), nn.LeakyReLU(0.05),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 5, 2, stride=3), nn.Sigmoid(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(), nn.Linear(5, 7))


CASES = [(lenet5, (1, 32, 32), 10), (strided_net, (3, 23, 21), 7)]


def make_pair(builder, input_shape, optimizer, backend, torch_optimizer):
    model = cc.compile(builder(cnn), input_shape=input_shape, loss=cnn.CrossEntropyLoss(), optimizer=optimizer,
                       backend=backend, seed=3)
    ref = builder(torch.nn)
    ref.load_state_dict(torch_state(model))
    return model, ref, torch_optimizer(ref.parameters())


def batch(input_shape, classes, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *input_shape)).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("builder,input_shape,classes", CASES)
def test_loss_and_every_gradient(backend, builder, input_shape, classes):
    model = cc.compile(builder(cnn), input_shape=input_shape, loss=cnn.CrossEntropyLoss(), backend=backend, seed=3)
    ref = builder(torch.nn)
    ref.load_state_dict(torch_state(model))
    x, y = batch(input_shape, classes)
    loss, grads = model.loss_and_grads(x, y)
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
    ref_loss.backward()
    assert relative(loss, ref_loss.item()) < 1e-4
    ref_grads = dict(ref.named_parameters())
    assert list(grads) == list(ref_grads)
    for name, g in grads.items():
        assert relative(g, ref_grads[name].grad.numpy()) < 1e-4, name
    np.testing.assert_allclose(model.predict(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("builder,input_shape,classes", CASES)
@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adam"])
def test_three_optimizer_steps(backend, builder, input_shape, classes, opt):
    ours, theirs = {
        "sgd": (cc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
                lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)),
        "nesterov": (cc.optim.SGD(lr=0.02, momentum=0.8, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, nesterov=True)),
        "adam": (cc.optim.Adam(lr=1e-3, weight_decay=1e-4), lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4)),
    }[opt]
    model, ref, topt = make_pair(builder, input_shape, ours, backend, theirs)
    for step in range(3):
        x, y = batch(input_shape, classes, n=5 + step, seed=step)  # the batch size changes: no recompile
        loss = model.train_step(x, y)
        topt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
        ref_loss.backward()
        topt.step()
        assert relative(loss, ref_loss.item()) < 1e-4
    for name, value in model.state_dict().items():
        assert relative(value, ref.state_dict()[name].numpy()) < 1e-4, name
