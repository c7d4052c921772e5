"""Geometries whose gradients the derivation transposes (strided, dilated, padded windows), built
as many branches of one network so that one compile checks many of them.

Each branch is ``probe → op → Flatten`` with a head and an MSE loss of its own; the probe is a
1×1 convolution private to the branch, so the op's input gradient is computed by exactly one
stage that writes it whole (no other branch accumulates into it: a residue class that receives no
term must still be written, as zeros). The probe's weight gradient is ``Σ dX·x`` over that input
gradient, and the network's input gradient adds every branch's, so both see any wrong element.
Shared by the test suite (a seeded sample) and ``bench/lattice_sweep.py`` (everything).
"""
from __future__ import annotations

import itertools

import numpy as np

CHANNELS = 2  # the network's input; each branch has its own width (1 runs other templates than 2 or 4)
WIDTHS = (1, 2, 4)


def out_size(n, k, s, p, d, ceil=False):
    """PyTorch's output size; with ``ceil``, a last partial window counts if it starts inside
    the input or its left padding."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def pair(v):
    return v if isinstance(v, tuple) else (v, v)


def valid(spec, size) -> bool:
    """Does the op give at least one output, and does PyTorch accept its padding?"""
    kind, k, s, p, d, options = spec
    for n, kk, ss, pp, dd in zip(size, pair(k), pair(s), pair(p), pair(d)):
        if out_size(n, kk, ss, pp, dd) < 1:  # (a window wider than the padded input is refused even in
            return False                      # ceil mode, where PyTorch makes one partial window)
        if kind != "conv" and pp > kk // 2:  # PyTorch: pad at most half the kernel size
            return False
    return True


def specs(kernels=(1, 2, 3, (2, 3)), strides=(1, 2, 3, 4), paddings=(0, 1, 2), dilations=(1, 2, 3)):
    """Every (kind, kernel, stride, padding, dilation, options): convolutions, max pools (dilated
    ones too) and average pools with and without counting the padding, pools also in ceil mode."""
    out = []
    for k, s, p, d in itertools.product(kernels, strides, paddings, dilations):
        out.append(("conv", k, s, p, d, {}))
        if k == 1:
            continue
        for ceil in (False, True):
            out.append(("max", k, s, p, d, {"ceil_mode": ceil}))
            if d == 1:
                out += [("avg", k, s, p, 1, {"ceil_mode": ceil, "count_include_pad": c}) for c in (True, False)]
    return out


def make_op(nn, spec, width):
    kind, k, s, p, d, options = spec
    if kind == "conv":
        return nn.Conv2d(width, width, k, stride=s, padding=p, dilation=d)
    if kind == "max":
        return nn.MaxPool2d(k, s, p, dilation=d, **options)
    return nn.AvgPool2d(k, s, p, **options)


def build(nn, branches):
    """One network with a branch per (spec, width); ``nn`` is torch.nn or cnncompile.nn."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.count = len(branches)
            for i, (spec, width) in enumerate(branches):
                setattr(self, f"probe{i}", nn.Conv2d(CHANNELS, width, 1))
                setattr(self, f"op{i}", make_op(nn, spec, width))
            self.flatten = nn.Flatten()

        def forward(self, x):
            return tuple(self.flatten(getattr(self, f"op{i}")(getattr(self, f"probe{i}")(x)))
                         for i in range(self.count))

    return Branches()


def compare(backend, branches, size, batch=2, seed=0):
    """Largest relative errors against PyTorch in float64: (forward, parameter gradients, input
    gradient), and the name of the worst parameter."""
    import torch

    import cnncompile as cc
    from cnncompile import nn as cnn

    model = cc.compile(build(cnn, branches), input_shape=(CHANNELS, *size), dtype="float64", backend=backend,
                       loss=tuple(cnn.MSELoss() for _ in branches), input_grad=True, seed=seed)
    ref = build(torch.nn, branches).double()
    ref.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, CHANNELS, *size))
    xt = torch.tensor(x, requires_grad=True)
    outs = ref(xt)
    y = tuple(rng.standard_normal(tuple(o.shape)) for o in outs)
    total = sum(torch.nn.functional.mse_loss(o, torch.tensor(t)) for o, t in zip(outs, y))
    total.backward()
    poison(model, batch)
    ours = model.predict(x)
    err_fwd = max(rel(a, o.detach().numpy()) for a, o in zip(ours, outs))
    poison(model, batch)
    _, grads = model.loss_and_grads(x, y)
    worst, name = 0.0, None
    for n, p in ref.named_parameters():
        e = rel(grads[n], p.grad.numpy())
        if e >= worst:
            worst, name = e, n
    poison(model, batch)
    err_in = rel(model.input_gradient(x, y), xt.grad.numpy())
    return err_fwd, worst, err_in, name


def poison(model, batch):
    """NaN in every working buffer: an element a kernel should write and does not shows."""
    env = model.executable.bind(batch)[0]
    for name, spec in model.prog.tensors.items():
        if spec.role not in ("param", "buffer", "state", "input", "label"):
            env[name][...] = -987654321 if spec.dtype != "float" else np.nan


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def describe(spec) -> str:
    kind, k, s, p, d, options = spec
    return f"{kind} k={k} s={s} p={p} d={d}" + "".join(f" {key}={value}" for key, value in options.items())


def sample(size, count, seed):
    """``count`` branches drawn from every valid spec for an input of ``size``, widths drawn too."""
    rng = np.random.default_rng(seed)
    pool = [sp for sp in specs() if valid(sp, size)]
    picks = rng.choice(len(pool), size=min(count, len(pool)), replace=False)
    return [(pool[i], int(rng.choice(WIDTHS))) for i in sorted(picks)]
