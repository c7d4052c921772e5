"""Random valid networks (conv geometry, groups, pools, BN, activations, residual and
concatenation joins, one or two heads) against PyTorch: loss and every gradient, both backends.
A fixed-seed slice runs here; ``bench/fuzz_torch.py`` runs the long version."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

import cnncompile as cc
from cnncompile import nn as cnn
from helpers import torch_state
from random_nets import build, networks


def compare(desc, backend):
    """Largest relative error of loss and gradients against PyTorch for one random network."""
    try:
        ours_net = build(cnn, desc, cc.cat)
    except ValueError:
        return None
    two = desc["two_heads"]
    loss = (cnn.CrossEntropyLoss(), cnn.MSELoss()) if two else cnn.CrossEntropyLoss()
    shape = (desc["channels"], desc["size"], desc["size"])
    model = cc.compile(ours_net, input_shape=shape, loss=loss, loss_weights=(1.0, 0.5) if two else None,
                       backend=backend, seed=desc["seed"])
    ref = build(torch.nn, desc, torch.cat)
    ref.load_state_dict(torch_state(model))
    rng = np.random.default_rng(desc["seed"])
    n = desc["batch"]
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    labels = rng.integers(0, desc["classes"], n)
    y = (labels, rng.standard_normal((n, 3)).astype(np.float32)) if two else labels
    ours_loss, grads = model.loss_and_grads(x, y)
    out = ref(torch.tensor(x))
    F = torch.nn.functional
    ref_loss = F.cross_entropy(out[0], torch.tensor(labels)) + 0.5 * F.mse_loss(out[1], torch.tensor(y[1])) \
        if two else F.cross_entropy(out, torch.tensor(labels))
    ref_loss.backward()
    worst = abs(ours_loss - ref_loss.item()) / max(abs(ref_loss.item()), 1e-3)
    # a gradient that is zero by invariance (γ, β of a batch norm followed by another) is float32
    # noise in both; it is measured against the network's largest gradient instead
    largest = max(float(p.grad.abs().max()) for p in ref.parameters())
    for name, p in ref.named_parameters():
        g = p.grad.numpy()
        worst = max(worst, float(np.abs(grads[name] - g).max() / max(np.abs(g).max(), 1e-2 * largest, 1e-3)))
    return worst


@pytest.mark.parametrize("backend,examples", [("numpy", 15), ("llvm", 5)])
def test_random_networks_match_pytorch(backend, examples):
    tried = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(networks())
    def check(desc):
        err = compare(desc, backend)
        assume(err is not None)
        tried.append(err)
        assert err < 2e-4, f"{desc}: relative error {err:.2e}"

    check()
    assert len(tried) >= examples // 2
