"""The tuner (``cc.compile(..., tune=True)``, ``cnncompile tune``): choices stored per kernel and
target, reused without timing, applied to the schedule, never trusted when damaged, and never
changing a result."""
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc
from helpers import SCHEDULE_TARGET
from cnncompile import cli, diskcache, nn
from cnncompile.backends.llvm import tuner
from cnncompile.backends.llvm.codegen import code_program
from cnncompile.backends.llvm.target import resolve
from cnncompile.schedule_text import schedule
from test_llvm import poison

SHAPE = (3, 16, 16)


def small_net():
    """Channel blocks (a 16-wide row: 4 channels, or 2), batch pairs (8-wide rows) and
    unroll-and-jam blocks (the dense layers): every kind of choice the tuner makes."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(288, 32), nn.ReLU(), nn.Linear(32, 10))


def compile_small(**kw):
    return cc.compile(small_net(), SHAPE, loss=nn.CrossEntropyLoss(), seed=2,
                      optimizer=cc.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3), **kw)


def tunable(prog):
    target = resolve(None)
    return tuner.tunable(code_program(prog, "float", target), target, "float")


def forced(prog, k):
    """Every tunable kernel's k-th candidate (its last where it has fewer)."""
    return {fp: c[min(k, len(c) - 1)] for fp, c in tunable(prog).items()}


def force(monkeypatch, k):
    """Tuned compiles take ``forced(prog, k)`` instead of timing anything."""
    def choices(self):
        return forced(self.prog, k)
    monkeypatch.setattr(tuner.Tuner, "choices", choices)


def no_timing(*args, **kw):
    raise AssertionError("the tuner timed a kernel")


def test_the_small_net_offers_every_kind_of_choice():
    """The network the other tests use has kernels with channel-block, batch-pair and jam choices."""
    keys = {k for cands in tunable(compile_small().prog).values() for c in cands for k in c}
    assert keys == {"tile", "pair", "jam"}


@pytest.mark.parametrize("k", [1, 2])
def test_tuned_results_equal_untuned_bit_for_bit(monkeypatch, k):
    """With every kernel forced to a non-default blocking, gradients of every tensor, losses and
    parameters after three steps equal the untuned build's bit for bit (no choice reorders a
    sum), and both match the NumPy backend within float32 rounding, working buffers poisoned."""
    reference, untuned = compile_small(backend="numpy"), compile_small()
    force(monkeypatch, k)
    tuned = compile_small(tune=True)
    assert tuned.executable.ir_text != untuned.executable.ir_text
    assert tuned.schedule("train") == schedule(tuned.prog, "train", choices=forced(tuned.prog, k)) \
        != untuned.schedule("train")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    _, feeds = reference._feeds(x, y)
    envs = []
    for model in (reference, untuned, tuned):
        poison(model.executable, 6)
        envs.append(model.executable.run("grads", 6, feeds, share=False))
    for name, spec in reference.prog.tensors.items():
        if spec.role in ("param", "state") or name in untuned.executable.elided:
            continue
        assert not np.isnan(envs[2][name]).any(), f"{name} has unwritten elements"
        np.testing.assert_array_equal(envs[2][name], envs[1][name], err_msg=name)
        scale = max(float(np.abs(envs[0][name]).max()), 1e-6)
        assert np.abs(envs[2][name] - envs[0][name]).max() / scale < 1e-5, name
    for _ in range(3):
        x = rng.standard_normal((6, *SHAPE)).astype(np.float32)
        y = rng.integers(0, 10, 6)
        for model in (reference, untuned, tuned):
            poison(model.executable, 6, share=model is not reference)
        losses = [m.train_step(x, y) for m in (reference, untuned, tuned)]
        assert losses[2] == losses[1]
        assert abs(losses[2] - losses[0]) <= 1e-5 * max(1.0, abs(losses[0]))
    for name, value in untuned.executable.state.items():
        np.testing.assert_array_equal(tuned.executable.state[name], value, err_msg=name)
        scale = max(float(np.abs(reference.executable.state[name]).max()), 1e-6)
        assert np.abs(value - reference.executable.state[name]).max() / scale < 1e-4, name


def test_a_forced_choice_changes_the_schedule():
    """A non-default choice shows in the schedule; an invalid one is never applied."""
    prog = compile_small().prog
    rules = schedule(prog, "train")
    assert schedule(prog, "train", choices=forced(prog, 1)) != rules
    assert schedule(prog, "train", choices=forced(prog, 2)) != rules
    broken = {fp: {"tile": "four", "jam": -3} for fp in tunable(prog)}
    assert schedule(prog, "train", choices=broken) == rules


def test_choices_are_stored_and_reused_without_timing(monkeypatch):
    """A tuned compile stores a choice for every tunable kernel; the next tuned compile of the
    network times nothing and builds the schedule of the stored choices."""
    first = compile_small(tune=True, tune_seconds=600)
    fps = tunable(first.prog)
    stored = {fp: tuner.load_choice(fp) for fp in fps}
    assert all(c is not None and c in fps[fp] for fp, c in stored.items()), first.tune_report
    monkeypatch.setattr(tuner, "clock", no_timing)
    for fp, cands in fps.items():  # stored choices that are surely not the rules'
        tuner.store_choice(fp, cands[1], [])
    again = compile_small(tune=True)
    assert f"{len(fps)} chosen before (stored), 0 to time" in again.tune_report[0]
    assert schedule(again.prog, "train", choices=forced(again.prog, 1)) != schedule(again.prog, "train")
    assert again.executable.ir_text != compile_small().executable.ir_text
    def no_lowering(*args, **kw):
        raise AssertionError("a stored program's kernels were gone through again")
    monkeypatch.setattr(tuner.Tuner, "choices", no_lowering)
    cached = compile_small(tune=True)  # (the program's list of choices, then its program under the tuned key)
    assert cached.warm_start and cached.executable.ir_text == again.executable.ir_text


@pytest.mark.parametrize("damage", ["bytes", "foreign", "invalid"])
def test_a_damaged_stored_choice_is_timed_again(monkeypatch, damage):
    """A stored choice whose entry is garbled, another kernel's, or not a valid choice is never
    used: that kernel, and only it, is tuned again."""
    prog = compile_small().prog
    fps = list(tunable(prog))
    for fp in fps:
        tuner.store_choice(fp, {"jam": 0}, [])
    victim, other = fps[0], fps[1]
    path = diskcache.cache_dir() / tuner.entry_name(victim)
    if damage == "bytes":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        path.write_bytes((diskcache.cache_dir() / tuner.entry_name(other)).read_bytes())
    else:
        diskcache.write(tuner.entry_name(victim),
                        f'{{"format": "{tuner.FORMAT}", "kernel": "{victim}", "choice": {{"tile": 99}}}}'.encode())
    assert tuner.load_choice(victim) is None and tuner.load_choice(other) == {"jam": 0}
    asked = []

    def tune(self, missing, known, labels, started):
        asked.append(set(missing))
        return {}
    monkeypatch.setattr(tuner.Tuner, "tune", tune)
    compile_small(tune=True)
    assert asked == [{victim}]


def test_cli_tune_prints_its_choices(capsys, monkeypatch):
    """`cnncompile tune FILE` tunes LeNet-5 within a tiny budget and says what it chose (its
    kernels counted for the 8-lane target, whatever this host's default)."""
    monkeypatch.setenv("CNNCOMPILE_TARGET", SCHEDULE_TARGET)
    lenet = Path(__file__).parent.parent / "examples" / "lenet5.py"
    cli.main(["tune", str(lenet), "--seconds", "1"])
    out = capsys.readouterr().out
    assert f"{lenet}: tuned for avx" in out
    assert "12 kernels with candidates" in out and "budget 1 s: compiled 1 of 3 rounds" in out
    assert "chosen: 0 of 12 kernels off the rules" in out
