"""One bounds rule: what explain prints (var_bounds) and what the code's loops run (fm_bounds
in the loop nests) come from the same function, so they cannot drift apart."""
import cnncompile as cc
import cnncompile.ir.expr as expr
from cnncompile import nn
from cnncompile.ir import loops


def test_explain_and_the_loops_share_one_bounds_function(monkeypatch):
    assert loops.fm_bounds is expr.fm_bounds
    model = cc.compile(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Flatten()), input_shape=(2, 7, 7),
                       loss=nn.MSELoss(), backend="numpy", input_grad=True)
    stage = next(s for s in model.prog.backward if s.reduce and s.constraints)
    seen = []
    real = expr.fm_bounds
    monkeypatch.setattr(expr, "fm_bounds", lambda *a, **k: seen.append(a) or real(*a, **k))
    bounds = expr.var_bounds(stage)
    assert seen and set(bounds) == {v for v, _ in stage.reduce}
    lowers, uppers = bounds[stage.reduce[-1][0]]
    assert len(lowers) >= 2 and len(uppers) >= 2  # the box and the transposed read's range
