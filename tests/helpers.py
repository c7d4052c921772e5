"""Shared by the tests: finite differences and the PyTorch twin of a network."""
from __future__ import annotations

import numpy as np

import cnncompile as cc

# The target the schedule-structure tests describe (8-lane rows, 16 registers): their expected
# templates, blocks and pairs are those of 256-bit code, whatever this host would choose.
SCHEDULE_TARGET = "avx2"


def finite_difference_grads(model, x, y, eps=1e-6, draw=0):
    """Central differences of the loss for every parameter element (float64 models only); every
    evaluation uses dropout draw ``draw``, so all see the same masks."""
    state = model.executable.state
    grads = {}

    def loss_at():
        model.noise_draws = draw
        return model.evaluate_loss(x, y)

    for name in model.prog.params:
        p = state[name]
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            plus = loss_at()
            p[idx] = old - eps
            minus = loss_at()
            p[idx] = old
            g[idx] = (plus - minus) / (2 * eps)
        grads[name] = g
    return grads


def max_relative_error(a: dict, b: dict) -> float:
    worst = 0.0
    for name in a:
        scale = max(np.abs(b[name]).max(), 1e-8)
        worst = max(worst, float(np.abs(a[name] - b[name]).max() / scale))
    return worst


def check_gradients(net, input_shape, loss, x, y, backend="numpy", tol=1e-6, mode="train", loss_weights=None,
                    state=None):
    """Derived gradients against central differences; ``state`` loads e.g. running statistics."""
    model = cc.compile(net, input_shape=input_shape, loss=loss, dtype="float64", backend=backend, seed=1,
                       loss_weights=loss_weights)
    if state:
        model.load_state_dict(state, strict=False)
    getattr(model, mode)()
    draw = model.noise_draws
    _, analytic = model.loss_and_grads(x, y)
    numeric = finite_difference_grads(model, x, y, draw=draw)
    err = max_relative_error(analytic, numeric)
    assert err < tol, f"gradient error {err:.2e}"
    return err


def torch_state(model):
    import torch
    return {k: torch.tensor(v) for k, v in model.state_dict().items()}


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-8))
