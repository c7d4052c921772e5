"""The derived formulas are the lecture's: checked as sympy expressions, not as strings."""
import sympy

import cnncompile as cc
from cnncompile import nn
from cnncompile.explain import display_only
from cnncompile.ir.expr import read, var, var_bounds


def lenet_model():
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 10))
    return cc.compile(net, input_shape=(1, 32, 32), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1))


def bounds_as_sympy(stage, v):
    lowers, uppers = var_bounds(stage)[v]
    lo = sympy.Max(*[sympy.ceiling(n.to_sympy() / d) for n, d in lowers])
    hi = sympy.Min(*[sympy.floor(n.to_sympy() / d) for n, d in uppers])
    return lo, hi


def test_conv_input_gradient_is_the_lecture_formula():
    model = lenet_model()
    conv = model.prog.forward[0]
    (dx,) = [s for s in display_only(model.prog, conv, set()) if s.out == "dL/dinput"]
    b, m, n, u, v, x, y = (var(c) for c in "bmnuvxy")
    expected = read("dL/d0.out.conv", b, n, x, y) * read("0.weight", n, m, u - x, v - y)
    assert sympy.simplify(dx.body - expected) == 0
    assert [name for name, _ in dx.domain] == ["b", "m", "u", "v"]
    assert [name for name, _ in dx.reduce] == ["n", "x", "y"]
    assert bounds_as_sympy(dx, "x") == (sympy.Max(0, u - 4), sympy.Min(27, u))
    assert bounds_as_sympy(dx, "y") == (sympy.Max(0, v - 4), sympy.Min(27, v))
    text = model.explain("0")
    assert "∂L/∂X[b, m, u, v] = Σ_{n=0..5} Σ_{x=max(0, u - 4)..min(27, u)} Σ_{y=max(0, v - 4)..min(27, v)}" in text


def test_filter_gradient_is_a_correlation_of_dz_with_x():
    model = lenet_model()
    (dw,) = [s for s in model.prog.backward if s.out == "dL/d3.weight"]
    b, m, n, i, j, x, y = (var(c) for c in "bmnijxy")
    assert sympy.simplify(dw.body - read("dL/d3.out.conv", b, n, x, y) * read("2.out", b, m, x + i, y + j)) == 0
    assert dict(dw.reduce) == {"b": dw.reduce[0][1], "x": 10, "y": 10}
    assert not dw.constraints


def test_strided_padded_input_gradient_bounds():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, stride=2, padding=1))
    model = cc.compile(net, input_shape=(1, 11, 11), loss=nn.MSELoss())
    (dx,) = [s for s in model.prog.backward if s.out == "dL/d0.out"]
    u = var("u")
    lo, hi = bounds_as_sympy(dx, "x")
    # x ∈ [⌈(u + p − K + 1)/s⌉, ⌊(u + p)/s⌋] ∩ [0, OH − 1], with no mod in the body
    assert lo == sympy.Max(0, sympy.ceiling((u - 1) / 2)) and hi == sympy.Min(4, sympy.floor((u + 1) / 2))
    assert not dx.body.has(sympy.Mod)


def test_max_pool_routes_to_the_recorded_winner():
    model = lenet_model()
    (dpool,) = [s for s in model.prog.backward if s.out == "dL/d1.out"]
    b, c, u, v, x, y = (var(n) for n in "bcuvxy")
    expected = (read("dL/d2.out", b, c, x, y) * sympy.KroneckerDelta(u - 2 * x, read("2.out.argmax_i", b, c, x, y))
                * sympy.KroneckerDelta(v - 2 * y, read("2.out.argmax_j", b, c, x, y)))
    assert sympy.simplify(dpool.body - expected) == 0


def test_mean_pool_spreads_one_over_k_squared():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2))
    model = cc.compile(net, input_shape=(1, 9, 9), loss=nn.MSELoss())
    (dx,) = [s for s in model.prog.backward if s.out == "dL/d0.out"]
    b, c, x, y = (var(n) for n in "bcxy")
    assert sympy.simplify(dx.body - read("dL/d1.out", b, c, x, y) / 4) == 0


def test_linear_gradients():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))
    model = cc.compile(net, input_shape=(1, 2, 2), loss=nn.MSELoss())
    b, k, n = var("b"), var("k"), var("n")
    (dx,) = [s for s in model.prog.backward if s.out == "dL/d1.out"]
    (dw,) = [s for s in model.prog.backward if s.out == "dL/d2.weight"]
    assert sympy.simplify(dx.body - read("2.weight", n, k) * read("dL/d2.out.mm", b, n)) == 0
    assert sympy.simplify(dw.body - read("1.out", b, k) * read("dL/d2.out.mm", b, n)) == 0


def test_explain_latex_and_all_layers():
    model = lenet_model()
    assert "\\sum_{n=0}^{5}" in model.explain("0", latex=True)
    text = model.explain()
    for name in ["'0' (Conv2d)", "'2' (MaxPool2d)", "'7' (Linear)", "'loss' (CrossEntropyLoss)"]:
        assert name in text
