"""The layering holds: ir/ imports no backend and no training module; compiling never loads training."""
import subprocess
import sys

from import_graph import area, graph

# Modules that stand between the user and training: they may reach cnncompile.training (lazily).
USER_LAYER = {"cnncompile", "cnncompile.model", "cnncompile.cli", "cnncompile.distributed"}


def test_ir_imports_no_backend_and_no_training():
    offenders = [f"{m} -> {t}" for m, targets in graph().items() if area(m) == "ir"
                 for t in targets if area(t) in ("backends", "training")]
    assert offenders == []


def test_no_compiler_module_imports_training():
    offenders = [f"{m} -> {t}" for m, targets in graph().items()
                 if area(m) in ("ir", "backends", "cnncompile") and m not in USER_LAYER
                 for t in targets if area(t) == "training"]
    assert offenders == []


def test_the_scan_sees_lazy_imports():
    """The graph includes imports made inside functions (model.fit's), so the checks above can fail."""
    assert "cnncompile.training.fit" in graph()["cnncompile.model"]


def test_compiling_and_training_a_step_loads_no_training_module():
    code = """
import sys, numpy as np
import cnncompile as cc
from cnncompile import nn
net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
model = cc.compile(net, input_shape=(1, 6, 6), loss=nn.CrossEntropyLoss(),
                     optimizer=cc.optim.SGD(lr=0.1), backend="numpy")
model.train_step(np.zeros((2, 1, 6, 6), np.float32), np.array([0, 2]))
loaded = sorted(m for m in sys.modules if m.startswith("cnncompile.training"))
print(loaded)
cc.callbacks
print(sorted(m for m in sys.modules if m.startswith("cnncompile.training")) != [])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
