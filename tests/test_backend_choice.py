"""Which backend runs: NumPy only when llvmlite itself cannot load; a broken module of ours is an error."""
import subprocess
import sys

NET = """
import warnings, cnncompile as cc
from cnncompile import nn
net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = cc.compile(net, input_shape=(1, 2, 2))
print(type(model.executable).__name__, [str(w.message)[:40] for w in caught])
"""


def run(prelude: str):
    return subprocess.run([sys.executable, "-c", prelude + NET], capture_output=True, text=True, timeout=300)


def test_without_llvmlite_numpy_runs_with_one_warning():
    out = run("import sys; sys.modules['llvmlite'] = None\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("NumpyExecutable ['llvmlite cannot be loaded")


def test_a_broken_backend_module_is_an_error_not_a_silent_switch():
    out = run("import sys; sys.modules['cnncompile.backends.llvm.program'] = None\n")
    assert out.returncode != 0
    assert "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr
    assert "NumpyExecutable" not in out.stdout
