"""Every example compiles and takes a training step on both backends (AlexNet at batch 2)."""
import runpy
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = ["lenet5.py", "alexnet.py", "resnet20.py", "resnet18.py", "densenet.py", "mobilenet.py", "bbox.py",
         "pose.py"]


def targets_for(model, spec, x, rng):
    """Random targets shaped like each head's output: classes for cross-entropy, values otherwise."""
    out = model.predict(x)
    losses = spec.get("loss", nn.CrossEntropyLoss())

    def one(pred, loss):
        if isinstance(loss, nn.CrossEntropyLoss):
            return rng.integers(0, pred.shape[1], len(x))
        return rng.uniform(0, 1, pred.shape).astype(np.float32)

    if isinstance(out, dict):
        return {k: one(out[k], losses[k]) for k in out}
    return one(out, losses)


# the four largest examples' LLVM builds (10-17 s each) run with the slow tests; their NumPy runs and the
# zoo parity suite's LLVM residual, dense and separable blocks stay in the default run
BIG_LLVM = {"densenet.py", "resnet18.py", "resnet20.py", "alexnet.py"}


@pytest.mark.parametrize("name, backend", [
    pytest.param(name, backend, marks=[pytest.mark.slow] if backend == "llvm" and name in BIG_LLVM else [])
    for name in FILES for backend in ("numpy", "llvm")])
def test_example_trains_a_step(name, backend):
    spec = runpy.run_path(str(EXAMPLES / name))
    model = cc.compile(spec["net"], input_shape=spec["input_shape"], loss=spec.get("loss", nn.CrossEntropyLoss()),
                       loss_weights=spec.get("loss_weights"), optimizer=spec["optimizer"], backend=backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *spec["input_shape"])).astype(np.float32)
    y = targets_for(model, spec, x, rng)
    before = model.state_dict()
    loss = model.train_step(x, y)
    assert np.isfinite(loss)
    after = model.state_dict()
    changed = [k for k in before if k.endswith("weight") and not np.array_equal(before[k], after[k])]
    assert len(changed) >= len([k for k in before if k.endswith("weight")]) - 1
    second = model.train_step(x, y)
    assert np.isfinite(second)
