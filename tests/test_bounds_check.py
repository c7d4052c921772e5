"""The bounds-checked build (CNNCOMPILE_CHECK=1) runs the schedule that normally runs (vector
rows, tiles, channel lanes, even/odd copies) with every access checked: a deliberately wrong
stage that writes past its buffer from inside a vector template is caught and named."""
import dataclasses

import numpy as np
import pytest

import cnncompile as cc
from helpers import SCHEDULE_TARGET
from cnncompile import nn
from cnncompile.backends.llvm.codegen import code_program
from cnncompile.backends.llvm.program import LLVMExecutable
from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, Stage, TensorSpec, read, var
from cnncompile.backends.llvm.schedule import Scheduler


def kinds(prog, out):
    """The templates the schedule gives the stage writing ``out``."""
    [stage] = [s for s in code_program(prog, "float", SCHEDULE_TARGET).all_stages() if s.out == out]
    return {t.kind for terms in Scheduler(code_program(prog, "float", SCHEDULE_TARGET), target=SCHEDULE_TARGET).single(stage).templates for t in terms}


def test_out_of_bounds_store_of_a_vector_row_is_caught(monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    prog = Program()
    prog.add_tensor(TensorSpec("a", (4, 8), "param"))
    prog.add_tensor(TensorSpec("out", (4, 8), "activation"))
    prog.forward.append(Stage(out="out", out_index=(Affine.var("y"), Affine.var("x")),
                              domain=(("y", 4), ("x", 8)), body=read("a", var("y"), var("x")) * 2, layer="broken"))
    assert kinds(prog, "out") == {"map_row"}
    prog.tensors["out"] = TensorSpec("out", (4, 7), "activation")  # declared a column short
    exe = LLVMExecutable(prog, np.float32, use_cache=False)
    exe.state["a"][...] = np.arange(32).reshape(4, 8)
    with pytest.raises(IndexError, match=r"writing 'out' \(forward of layer 'broken'\) touched out at flat offset 2"):
        exe.run("predict", 1, {})
    out = exe.bound[(1, True)][0]["out"]
    np.testing.assert_array_equal(out.ravel()[:7], 2 * np.arange(7))  # the accesses inside still happened


def test_out_of_bounds_convolution_row_is_caught(monkeypatch):
    """A convolution whose output buffer is declared one column short: its tiled vector rows
    would store past the end of the buffer."""
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    model = cc.compile(nn.Sequential(nn.Conv2d(2, 8, 3)), input_shape=(2, 12, 12), backend="numpy")
    prog = model.prog
    out = prog.forward[0].out
    spec = prog.tensors[out]
    assert kinds(prog, out) & {"row", "tiled_row"}
    prog.tensors[out] = dataclasses.replace(spec, shape=(*spec.shape[:-1], spec.shape[-1] - 1))
    exe = LLVMExecutable(prog, np.float32, use_cache=False)
    with pytest.raises(IndexError, match=rf"bounds check .* writing '{out}' \(forward of layer '0'\)"):
        exe.run("predict", 2, {"input": np.ones((2, 2, 12, 12), np.float32)})


def test_checked_build_schedules_like_the_plain_one(monkeypatch):
    net = nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, stride=2),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))
    monkeypatch.delenv("CNNCOMPILE_CHECK", raising=False)  # (the suite may itself run under the checked build)
    plain = cc.compile(net, input_shape=(1, 28, 28), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1))
    monkeypatch.setenv("CNNCOMPILE_CHECK", "1")
    checked = cc.compile(net, input_shape=(1, 28, 28), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1))
    assert checked.executable.checked and not plain.executable.checked
    assert checked.executable.steps == plain.executable.steps  # the same kernels, in the same phases
    assert [t for t in checked.prog.tensors] == [t for t in plain.prog.tensors]  # packed copies included
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.standard_normal((5, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 5)
        assert checked.train_step(x, y) == pytest.approx(plain.train_step(x, y), rel=1e-5)
    for name, value in plain.state_dict().items():
        np.testing.assert_allclose(checked.state_dict()[name], value, rtol=1e-4, atol=1e-6)
