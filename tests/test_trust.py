"""The NaN guard names the first bad stage; bounds-checked native code reports a stage and an offset
instead of touching memory outside a buffer; determinism after N steps; bad inputs; loading a
checkpoint never runs code from it and refuses another network's checkpoint."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn


def exploding(backend):
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    return cc.compile(net, (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=1e30),
                      backend=backend, seed=0)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_nan_guard_names_the_first_stage_and_keeps_the_parameters(backend):
    model = exploding(backend)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 8, 8)).astype(np.float32) * 100, rng.integers(0, 4, 8)
    model.nan_guard = True
    with np.errstate(all="ignore"):
        model.train_step(x, y)  # lr 1e30: the parameters become huge but finite ...
        before = model.state_dict()
        with pytest.raises(FloatingPointError, match=r"first in stage '[^']+' \((forward|loss|backward|update) "
                                                     r"of layer '[^']+'\)"):
            for _ in range(5):  # ... and soon overflow
                before = model.state_dict()
                model.train_step(x, y)
    after = model.state_dict()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_nan_guard_off_by_default_and_fit_turns_it_on():
    model = exploding("numpy")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 1, 8, 8)).astype(np.float32) * 100, rng.integers(0, 4, 32)
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="NaN guard"):
        model.fit((x, y), epochs=3, batch_size=8, verbose=False, nan_guard=True)


def test_bounds_check_reports_an_out_of_range_write(monkeypatch):
    """A deliberately wrong stage (it writes one past its buffer) in checked mode."""
    from cnncompile.backends.llvm.program import LLVMExecutable
    from cnncompile.ir.affine import Affine
    from cnncompile.ir.expr import Program, Stage, TensorSpec, read, var
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    prog = Program()
    prog.add_tensor(TensorSpec("a", (5,), "param"))
    prog.add_tensor(TensorSpec("out", (5,), "activation"))
    prog.forward.append(Stage(out="out", out_index=(Affine.var("x") + Affine.constant(1),), domain=(("x", 5),),
                              body=read("a", var("x")) * 2, layer="broken"))
    exe = LLVMExecutable(prog, np.float32, use_cache=False)
    exe.state["a"][...] = np.arange(5)
    with pytest.raises(IndexError, match=r"stage 0 writing 'out' \(forward of layer 'broken'\) touched out at "
                                         r"flat offset 5, outside its shape \(5,\)"):
        exe.run("predict", 1, {})
    np.testing.assert_array_equal(exe.bound[(1, True)][0]["out"][1:], [0, 2, 4, 6])


def test_checked_mode_runs_a_real_network_clean(monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.Flatten(),
                        nn.Dropout(0.2), nn.Linear(4 * 3 * 3, 3))
    checked = cc.compile(net, (2, 9, 9), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.Adam(), backend="llvm")
    assert checked.executable.checked
    monkeypatch.delenv("CNNCOMPILE_CHECK")
    plain = cc.compile(net, (2, 9, 9), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.Adam(), backend="numpy")
    rng = np.random.default_rng(0)
    for step in range(3):
        x, y = rng.standard_normal((3 + step, 2, 9, 9)), rng.integers(0, 3, 3 + step)
        assert checked.train_step(x, y) == pytest.approx(plain.train_step(x, y), rel=1e-4)


SCRIPT = """
import sys, numpy as np, cnncompile as cc
from cnncompile import nn
net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                    nn.Dropout(0.3), nn.Linear(36, 3))
m = cc.compile(net, (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.Adam(lr=0.01), backend=sys.argv[1])
rng = np.random.default_rng(0)
for step in range(10):
    m.train_step(rng.standard_normal((16, 1, 8, 8)), rng.integers(0, 3, 16))
np.save(sys.argv[2], np.concatenate([v.ravel().astype(np.float64) for v in m.state_dict().values()]))
"""


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_bit_identical_parameters_across_runs_and_thread_counts(backend, tmp_path):
    results = []
    for run, threads in enumerate(["1", "2", "2"]):
        out = tmp_path / f"{run}.npy"
        env = dict(os.environ, CNNCOMPILE_THREADS=threads, PYTHONHASHSEED=str(run))
        subprocess.run([sys.executable, "-c", SCRIPT, backend, str(out)], env=env, check=True)
        results.append(np.load(out))
    assert all(np.array_equal(results[0], r) for r in results[1:])


# ----- more of the bad-input catalogue (tests/test_errors.py holds the single-head basics) -----------
def two_head_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
            self.cls = nn.Linear(72, 3)
            self.box = nn.Linear(72, 8)

        def forward(self, x):
            h = self.trunk(x)
            return {"cls": self.cls(h), "box": self.box(h)}

    return cc.compile(Net(), (1, 8, 8), loss={"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()},
                      optimizer=cc.optim.SGD(lr=0.1), backend="numpy")


GOOD_X = np.zeros((4, 1, 8, 8), np.float32)


@pytest.mark.parametrize("x,y,error,message", [
    (GOOD_X, {"cls": np.zeros(4, int)}, KeyError, r"no target for head\(s\) \[.box.\]"),
    (GOOD_X, {"cls": np.zeros(4, int), "box": np.zeros((4, 7))}, ValueError, r"shape \(4, 7\); expected \(N, 8\)"),
    (GOOD_X, {"cls": np.zeros(4, int), "box": np.zeros((3, 8))}, ValueError, "3 rows but the input has 4"),
    (GOOD_X, {"cls": np.zeros(4, int), "box": np.full((4, 8), np.inf)}, ValueError, "NaN or Inf"),
    (GOOD_X[:1, :, :3, :3], None, ValueError, "expected"),
    (GOOD_X[:1], {"cls": np.zeros(1, int), "box": np.zeros((1, 8))}, None, None),
])
def test_multi_head_targets_are_checked(x, y, error, message):
    model = two_head_model()
    before = model.state_dict()
    if error is None:  # batch 1 of a 6×6 map: 36 values per channel, batch norm is fine
        assert np.isfinite(model.train_step(x, y))
        return
    with pytest.raises(error, match=message):
        model.train_step(x, y)
    assert all(np.array_equal(before[k], model.state_dict()[k]) for k in before)


def test_batch_norm_needs_two_values_per_channel_in_training():
    net = nn.Sequential(nn.Conv2d(1, 2, 8), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2))
    model = cc.compile(net, (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1), backend="llvm")
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\) sees 1 value per channel"):
        model.train_step(GOOD_X[:1], [0])
    model.eval()
    assert model.predict(GOOD_X[:1]).shape == (1, 2)  # eval uses running statistics: fine


def test_torch_tensors_and_bad_layer_arguments():
    import torch
    model = two_head_model()
    out = model.predict(torch.zeros(2, 1, 8, 8))
    assert out["box"].shape == (2, 8)
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.5)
    with pytest.raises(cc.ShapeError, match=r"layer '1' \(BatchNorm2d\) expects input \(N, 3, H, W\)"):
        cc.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(3)), (1, 8, 8))
    with pytest.raises(cc.ShapeError, match="cannot concatenate"):
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Conv2d(1, 2, 3)

            def forward(self, x):
                return cc.cat([x, self.a(x)], 1)

        cc.compile(Bad(), (1, 8, 8))


def test_fit_rejects_empty_data():
    model = two_head_model()
    with pytest.raises(ValueError, match="empty"):
        model.fit((GOOD_X[:0], {"cls": np.zeros(0, int), "box": np.zeros((0, 8))}), epochs=1, verbose=False)


# ----- loading a checkpoint never runs code from it -------------------------------------------------
SOURCE = """
import pathlib
pathlib.Path({marker!r}).write_text("the checkpoint's code ran")
from cnncompile import nn
net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
"""


def same_net(activation=nn.ReLU):
    return nn.Sequential(nn.Conv2d(1, 2, 3), activation(), nn.Flatten(), nn.Linear(72, 3))


def saved_with_source(tmp_path):
    """A checkpoint whose stored network source leaves a marker file when it runs."""
    marker = tmp_path / "ran.txt"
    model = cc.compile(same_net(), (1, 8, 8), loss=nn.CrossEntropyLoss(),
                       optimizer=cc.optim.SGD(lr=0.1, momentum=0.9), backend="numpy")
    model.source_text = SOURCE.format(marker=str(marker))
    model.train_step(GOOD_X, [0, 1, 2, 0])
    model.save(tmp_path / "a.ckpt")
    return model, tmp_path / "a.ckpt", marker


def test_load_without_net_refuses_and_runs_nothing(tmp_path):
    model, path, marker = saved_with_source(tmp_path)
    with pytest.raises(cc.CheckpointError, match=r"pass net=.*never runs code from the file unless "
                                                 r"trust_source=True"):
        cc.load(path)
    loaded = cc.load(path, net=same_net())
    assert not marker.exists()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
    trusted = cc.load(path, trust_source=True)  # the opt-in runs the stored source
    assert marker.exists()
    np.testing.assert_array_equal(trusted.predict(GOOD_X), model.predict(GOOD_X))


@pytest.mark.parametrize("other,message", [
    (lambda: same_net(nn.Tanh), "same shapes, different layers"),
    (lambda: nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 3)), r"0\.weight"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(50, 3)), "tracing it"),
])
def test_a_checkpoint_of_another_network_is_refused(tmp_path, other, message):
    _, path, _ = saved_with_source(tmp_path)
    with pytest.raises(cc.CheckpointError, match=f"different network.*{message}"):
        cc.load(path, net=other())


NETWORK_FILE = """
import numpy as np
import cnncompile as cc
from cnncompile import nn
optimizer = cc.optim.SGD(lr=0.1)
net = nn.Sequential(nn.Conv2d(1, {channels}, 3), nn.ReLU(), nn.Flatten(), nn.Linear({channels} * 36, 3))
input_shape = (1, 8, 8)
rng = np.random.default_rng(0)
x, y = rng.standard_normal((24, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 24)
dataset = lambda: {{"train": (x, y), "val": (x[:8], y[:8]), "test": (x[:8], y[:8])}}
"""


def test_cli_uses_the_network_file_given_and_refuses_another_networks_checkpoint(tmp_path, capsys):
    from cnncompile.cli import main
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(NETWORK_FILE.format(channels=2))
    b.write_text(NETWORK_FILE.format(channels=4))
    ckpt = tmp_path / "a.ckpt"
    main(["train", str(a), "--epochs", "1", "--backend", "numpy", "--checkpoint", str(ckpt)])
    main(["train", str(a), "--epochs", "2", "--backend", "numpy", "--resume", str(ckpt)])
    assert "resumed" in capsys.readouterr().out
    for argv in (["train", str(b), "--epochs", "2", "--backend", "numpy", "--resume", str(ckpt)],
                 ["show", str(b), "--checkpoint", str(ckpt), "--filters", str(tmp_path / "f.png")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "different network" in err and "b.py" in err, err
    assert not (tmp_path / "f.png").exists()


def test_meta_naming_a_non_loss_class_is_refused(tmp_path):
    """A crafted meta.json (with a fresh, valid manifest) cannot make load call other classes."""
    import json
    from cnncompile.training import checkpoint
    _, path, _ = saved_with_source(tmp_path)
    meta, arrays = checkpoint.read(path)
    for field, value, message in [("loss", {"__loss__": "Sequential", "args": {}}, "unknown loss"),
                                  ("optimizer", {"class": "Optimizer", "hyper": {"lr": 0.1}}, "unknown optimizer")]:
        edited = json.loads(json.dumps(meta))
        if field == "loss":
            edited["compile"]["loss"] = value
        else:
            edited["optimizer"] = value
        members = {checkpoint.META: json.dumps(edited).encode()}
        members.update({f"{k}.npy": checkpoint._npy_bytes(v) for k, v in arrays.items()})
        bad = tmp_path / "crafted.ckpt"
        bad.write_bytes(checkpoint._zip_bytes(members))
        with pytest.raises(cc.CheckpointError, match=message):
            cc.load(bad, net=same_net())
