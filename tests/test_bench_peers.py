"""bench/zoo.py's peers: the JAX and tinygrad versions of the example networks compute what
cnncompile computes from the same weights, and the worker processes answer the bench's protocol."""
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench" / "peers"), str(ROOT / "bench")]

import worker  # noqa: E402  (bench/peers/worker.py)
import zoo  # noqa: E402  (bench/zoo.py)

CHECK_STEPS = 2  # the second loss is computed after one update: the optimizer is the same too


@pytest.fixture(scope="module")
def lenet5(tmp_path_factory):
    """cnncompile's LeNet-5 (batch 64), the state file the peers start from, and its first losses."""
    spec = runpy.run_path(str(ROOT / "examples" / "lenet5.py"))
    model = cc.compile(spec["net"], spec["input_shape"], loss=spec["loss"], optimizer=spec["optimizer"])
    x, y = worker.draw_batch(model, spec["input_shape"], 64)
    path = tmp_path_factory.mktemp("peers") / "lenet5.npz"
    worker.export_state(path, model, x, y)
    losses = [model.train_step(x, y) for _ in range(CHECK_STEPS)]
    return path, losses


def peer_losses(trainer, path):
    state, x, y, _ = worker.load_state(str(path))
    trainer.set_batch(x, y)
    out = []
    for _ in range(CHECK_STEPS):
        trainer.step()
        out.append(trainer.sync())
    return out


def assert_same_losses(got, want):
    np.testing.assert_allclose(got, want, rtol=zoo.LOSS_BOUND, atol=zoo.LOSS_BOUND)


@pytest.mark.bench  # needs the bench extra (jax[cpu])
def test_jax_lenet5_step_matches_cnncompile(lenet5):
    """One jitted JAX train step from cnncompile's weights has cnncompile's loss, and so has the next
    (after the SGD update with momentum and weight decay), within the float32 bound."""
    from jax_nets import JaxTrainer
    path, want = lenet5
    state, _, _, hyper = worker.load_state(str(path))
    assert_same_losses(peer_losses(JaxTrainer("lenet5", state, hyper), path), want)


@pytest.mark.bench  # needs the bench extra (tinygrad, and a clang binary); about a minute to build the step
def test_tinygrad_lenet5_step_matches_cnncompile(lenet5, monkeypatch):
    """The same for tinygrad's TinyJit step on its CPU device."""
    from tinygrad_nets import choose_device
    for var in ("DEV", "CC"):  # choose_device sets them: monkeypatch puts back what was there
        was = os.environ.get(var)
        monkeypatch.setenv(var, "")
        if was is None:
            monkeypatch.delenv(var)
        else:
            monkeypatch.setenv(var, was)
    choose_device()
    from tinygrad_nets import TinygradTrainer
    path, want = lenet5
    state, _, _, hyper = worker.load_state(str(path))
    assert_same_losses(peer_losses(TinygradTrainer("lenet5", state, hyper), path), want)


def test_worker_protocol_one_round(lenet5, tmp_path):
    """A PyTorch-eager worker process started on the state file answers with its first losses (equal to
    cnncompile's), times one round when asked and quits; the bench's loss check accepts it."""
    path, want = lenet5
    reference = type("Reference", (), {"framework": "cnncompile", "ready": {"losses": want}})()
    w = zoo.Worker("eager", "lenet5", path, 64, tmp_path, check_steps=CHECK_STEPS)
    try:
        assert w.ready["ok"], w.ready
        first, second = zoo.check_losses("lenet5", reference, w)
        assert first <= 1 and second <= 1
        w.time(1)
        assert len(w.seconds) == 1 and w.seconds[0] > 0
    finally:
        w.close()
    assert w.proc.returncode == 0, w.log_tail()


def test_loss_check_fails_loudly_on_different_losses():
    """A first loss beyond the float32 bound, or a first update that changes the loss differently
    (another learning rate), stops the bench naming the framework and both losses; rounding passes."""
    def fake(name, losses):
        return type("W", (), {"framework": name, "ready": {"losses": losses}})()
    ref = fake("cnncompile", [2.3, 2.2])
    with pytest.raises(zoo.BenchError, match=r"jax's losses \[2\.3001, 2\.2001\] differ from cnncompile's"):
        zoo.check_losses("lenet5", ref, fake("jax", [2.3001, 2.2001]))
    with pytest.raises(zoo.BenchError, match=r"by 0 and 4\.1e\+02 of their bounds"):
        zoo.check_losses("lenet5", ref, fake("jax", [2.3, 2.25]))
    first, second = zoo.check_losses("lenet5", ref, fake("jax", [2.3 + 1e-6, 2.2 + 2e-6]))
    assert first < 1 and second < 1


def test_missing_framework_is_a_column_not_an_error(lenet5, tmp_path, monkeypatch):
    """A worker whose framework cannot be imported (here a jax package that raises ImportError, first on
    the path) answers 'not installed' and exits cleanly instead of failing."""
    shadow = tmp_path / "shadow" / "jax"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'jax'\", name='jax')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    w = zoo.Worker("jax", "lenet5", lenet5[0], 64, tmp_path)
    w.close()
    assert not w.ready["ok"] and w.ready["missing"] and "not installed" in w.ready["error"], w.ready
    assert w.proc.returncode == 0
