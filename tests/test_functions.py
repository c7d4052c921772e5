"""The table of scalar functions (ir/functions.py) and the activations written over it: each
matches PyTorch in float64 on both backends (loss and every gradient), float32 LLVM too, and
finite differences; a head missing from the table is refused by both backends alike."""
import numpy as np
import pytest
import sympy
import torch

import cnncompile as cc
from cnncompile import nn
from cnncompile.ir.functions import FUNCTIONS, STRUCTURE
from helpers import check_gradients

ACTIVATIONS = {
    "silu": lambda m: m.SiLU(), "gelu": lambda m: m.GELU(), "gelu_tanh": lambda m: m.GELU(approximate="tanh"),
    "elu": lambda m: m.ELU(0.7), "softplus": lambda m: m.Softplus(2.0, 5.0), "relu6": lambda m: m.ReLU6(),
    "hardtanh": lambda m: m.Hardtanh(-0.5, 0.8),
}


def build(m, name):
    return m.Sequential(m.Conv2d(2, 3, 3), ACTIVATIONS[name](m), m.Flatten(), m.Linear(3 * 6 * 6, 4))


def against_torch(name, backend, dtype):
    model = cc.compile(build(nn, name), input_shape=(2, 8, 8), loss=nn.CrossEntropyLoss(), dtype=dtype,
                       backend=backend, seed=4)
    ref = build(torch.nn, name).to(torch.float64)
    ref.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((3, 2, 8, 8)) * 3, np.array([0, 1, 3])  # ×3: every branch of the activation
    loss, grads = model.loss_and_grads(x.astype(dtype), y)
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
    ref_loss.backward()
    errors = [abs(loss - ref_loss.item()) / abs(ref_loss.item())]
    errors += [np.abs(grads[n] - p.grad.numpy()).max() / np.abs(p.grad.numpy()).max() for n, p in ref.named_parameters()]
    return max(errors)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_matches_pytorch_in_float64(name, backend):
    assert against_torch(name, backend, "float64") < 1e-12


@pytest.mark.parametrize("name", ["gelu", "softplus", "silu"])
def test_activation_in_float32_on_llvm(name):
    assert against_torch(name, "llvm", "float32") < 1e-4


@pytest.mark.parametrize("name", ["gelu", "elu", "softplus"])
def test_activation_finite_differences(name):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), ACTIVATIONS[name](nn), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    rng = np.random.default_rng(1)
    check_gradients(net, (1, 5, 5), nn.CrossEntropyLoss(), rng.standard_normal((2, 1, 5, 5)) * 2, np.array([0, 2]))


def test_every_function_in_derived_stages_is_a_row_of_the_table():
    for name in ACTIVATIONS:
        model = cc.compile(build(nn, name), input_shape=(2, 8, 8), loss=nn.CrossEntropyLoss(), backend="numpy")
        for stage in model.prog.all_stages():
            heads = {type(f) for f in stage.body.atoms(sympy.Function) if not isinstance(f, STRUCTURE)}
            assert heads <= set(FUNCTIONS), (name, stage.out, heads - set(FUNCTIONS))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_a_head_missing_from_the_table_is_refused_by_name(backend):
    from cnncompile.ir.affine import Affine
    from cnncompile.ir.expr import Program, Stage, TensorSpec, read, var
    prog = Program()
    prog.add_tensor(TensorSpec("a", (4,), "param"))
    prog.add_tensor(TensorSpec("out", (4,), "activation"))
    prog.forward.append(Stage(out="out", out_index=(Affine.var("x"),), domain=(("x", 4),),
                              body=sympy.cosh(read("a", var("x"))), layer="odd"))
    if backend == "numpy":
        from cnncompile.backends.numpy.program import NumpyExecutable as Executable
    else:
        from cnncompile.backends.llvm.program import LLVMExecutable as Executable
    with pytest.raises(NotImplementedError, match="cosh .*not a row of ir/functions.py"):
        Executable(prog, np.float64).run("predict", 1, {})


def test_a_max_stage_without_recorded_winners_fails_loudly():
    from cnncompile.ir.affine import Affine
    from cnncompile.ir.autodiff import transpose
    from cnncompile.ir.expr import Stage, read, var
    stage = Stage(out="y", out_index=(Affine.var("x"),), domain=(("x", 3),), reduce=(("i", 2),), combine="max",
                  body=read("t", var("x") + var("i")), layer="pool")
    with pytest.raises(cc.CompileError, match="max stage y of layer 'pool' records 0 winner tensors"):
        transpose(stage, read("t", var("x") + var("i")), False, (4,))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_the_softmax_shift_cancels(backend):
    """Cross-entropy subtracts the row's maximum before exp and does not differentiate it: the
    derived gradient with respect to the logits equals central differences of the whole loss,
    also when the perturbed logit is the maximum (which moves the shift)."""
    model = cc.compile(nn.Flatten(), input_shape=(5,), loss=nn.CrossEntropyLoss(), dtype="float64",
                       backend=backend, input_grad=True)
    assert any(s.combine == "max" and not s.differentiable for s in model.prog.loss)
    logits, y = np.array([[0.3, 2.5, -1.0, 0.7, 1.9], [4.0, -2.0, 0.1, 3.9, 0.0]]), np.array([2, 3])
    derived = model.input_gradient(logits, y)
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[idx] += 1e-6
        minus[idx] -= 1e-6
        numeric[idx] = (model.evaluate_loss(plus, y) - model.evaluate_loss(minus, y)) / 2e-6
    np.testing.assert_allclose(derived, numeric, atol=1e-8)
    assert abs(derived[0, 1]) > 0.1 and abs(derived[1, 0]) > 0.1  # the maxima's own gradients are checked too
