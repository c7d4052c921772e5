"""The zoo networks (tests/zoo_nets.py) against PyTorch (loss, every gradient, buffers, 3 SGD and 3 Adam steps) in
training and eval mode, on both backends; dropout against PyTorch with the same mask."""
import numpy as np
import pytest
import torch

import cnncompile as cc
from cnncompile import nn as cnn
from helpers import torch_state
from zoo_nets import CLASSES, INPUT_SHAPE, ZOO

BACKENDS = ["numpy", "llvm"]
TOL = 1e-4


def close(a, b, tol=TOL) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) <= tol * max(float(np.abs(b).max()), 1e-3)


def losses_for(name):
    if name == "two_heads":
        return (cnn.CrossEntropyLoss(), cnn.MSELoss()), (1.0, 0.5)
    return cnn.CrossEntropyLoss(), None


def data(name, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *INPUT_SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, n)
    if name == "two_heads":
        return x, (y, rng.uniform(0, 1, (n, 4)).astype(np.float32))
    return x, y


def torch_loss(name, out, y):
    F = torch.nn.functional
    if name == "two_heads":
        return F.cross_entropy(out[0], torch.tensor(y[0])) + 0.5 * F.mse_loss(out[1], torch.tensor(y[1]))
    return F.cross_entropy(out, torch.tensor(y))


def pair(name, backend, optimizer=None):
    loss, weights = losses_for(name)
    model = cc.compile(ZOO[name](cnn), input_shape=INPUT_SHAPE, loss=loss, loss_weights=weights,
                       optimizer=optimizer, backend=backend, seed=5)
    ref = ZOO[name](torch.nn)
    ref.load_state_dict(torch_state(model))  # strict: names and shapes are PyTorch's
    return model, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(ZOO))
def test_loss_and_gradients(backend, mode, name):
    model, ref = pair(name, backend)
    if mode == "eval":  # non-trivial running statistics first
        stats = {k: torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.1
                 for k, v in ref.state_dict().items() if k.endswith(("running_mean", "running_var"))}
        ref.load_state_dict(stats, strict=False)
        model.load_state_dict(torch_state_np(ref), strict=True)
    getattr(model, mode)()
    getattr(ref, mode)()
    x, y = data(name, 4, 0)
    loss, grads = model.loss_and_grads(x, y)
    ref_loss = torch_loss(name, ref(torch.tensor(x)), y)
    ref_loss.backward()
    assert close(loss, ref_loss.item())
    ref_grads = dict(ref.named_parameters())
    assert list(grads) == list(ref_grads)
    for key, g in grads.items():
        assert close(g, ref_grads[key].grad.numpy()), key


def torch_state_np(ref):
    return {k: v.detach().numpy() for k, v in ref.state_dict().items()}


OPTIMIZERS = {
    "sgd": (lambda: cc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adam": (lambda: cc.optim.Adam(lr=1e-2, weight_decay=1e-4),
             lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(ZOO))
def test_three_steps(backend, opt, name):
    ours, theirs = OPTIMIZERS[opt]
    model, ref = pair(name, backend, ours())
    topt = theirs(ref.parameters())
    ref.train()
    for step in range(3):
        x, y = data(name, 4 + step, step)
        loss = model.train_step(x, y)
        topt.zero_grad()
        ref_loss = torch_loss(name, ref(torch.tensor(x)), y)
        ref_loss.backward()
        topt.step()
        assert close(loss, ref_loss.item())
    theirs_state = ref.state_dict()
    assert list(model.state_dict()) == list(theirs_state)
    for key, value in model.state_dict().items():
        assert close(value, theirs_state[key].numpy()), key
    model.eval()
    ref.eval()
    x, _ = data(name, 3, 9)
    out, ref_out = model.predict(x), ref(torch.tensor(x))
    for a, b in zip(out if isinstance(out, tuple) else [out], ref_out if isinstance(ref_out, tuple) else [ref_out]):
        assert close(a, b.detach().numpy())


def dropout_net(nn, mask_layer=None):
    drop = mask_layer if mask_layer is not None else nn.Dropout(0.4)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 20), nn.ReLU(), drop,
                         nn.Linear(20, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_against_torch_with_the_same_mask(backend):
    model = cc.compile(dropout_net(cnn), input_shape=INPUT_SHAPE, loss=cnn.CrossEntropyLoss(), backend=backend,
                       seed=2)
    x, y = data("dropout", 6, 1)
    (mask,) = model.noise(len(x), draw=model.noise_draws).values()  # what the next call will use

    class Mask(torch.nn.Module):
        def forward(self, h):
            return h * torch.tensor(mask)

    ref = dropout_net(torch.nn, Mask())
    ref.load_state_dict(torch_state(model))
    loss, grads = model.loss_and_grads(x, y)
    ref_loss = torch_loss("dropout", ref(torch.tensor(x)), y)
    ref_loss.backward()
    assert close(loss, ref_loss.item())
    for key, p in ref.named_parameters():
        assert close(grads[key], p.grad.numpy()), key
    assert set(np.unique(mask)) <= {0.0, np.float32(1 / 0.6)}
    model.eval()  # eval: the identity, as the PyTorch model without the mask
    ref_eval = dropout_net(torch.nn, torch.nn.Identity())
    ref_eval.load_state_dict(torch_state(model))
    np.testing.assert_allclose(model.predict(x), ref_eval(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_dropout_masks_are_seeded_and_have_the_right_rate():
    model = cc.compile(dropout_net(cnn), input_shape=INPUT_SHAPE, loss=cnn.CrossEntropyLoss(), backend="numpy",
                       seed=7)
    a = model.noise(512, draw=3)
    b = model.noise(512, draw=3)
    c = model.noise(512, draw=4)
    (ma,), (mb,), (mc,) = a.values(), b.values(), c.values()
    assert np.array_equal(ma, mb) and not np.array_equal(ma, mc)
    assert abs((ma == 0).mean() - 0.4) < 0.02
    x, y = data("dropout", 8, 0)
    first = model.loss_and_grads(x, y)[0]
    second = model.loss_and_grads(x, y)[0]
    assert first != second  # a fresh mask per training batch
    model.noise_draws = 0
    assert model.loss_and_grads(x, y)[0] == first  # and reproducible from its draw number
