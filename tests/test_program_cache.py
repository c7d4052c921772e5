"""Warm starts: a second compile of the same network loads the derived program and its generated
code from the disk cache, derives nothing, and trains bit for bit like the cold compile."""
import importlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import diskcache, nn, program_cache

COMPILE_AND_TRAIN = textwrap.dedent("""
    import sys, numpy as np, cnncompile as cc
    from cnncompile import nn
    if sys.argv[2] == "forbid-derivation":
        import cnncompile.compiler as compiler
        def refuse(*args, **kwargs):
            raise AssertionError("a warm start derived formulas again")
        compiler.derive = compiler.build_program = refuse
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Dropout(0.3), nn.Linear(4 * 7 * 7, 10))
    m = cc.compile(net, input_shape=(1, 16, 16), loss=nn.CrossEntropyLoss(),
                   optimizer=cc.optim.SGD(lr=float(sys.argv[3]), momentum=0.9), seed=4)
    rng = np.random.default_rng(0)
    losses = [m.train_step(rng.standard_normal((9, 1, 16, 16)), rng.integers(0, 10, 9)) for _ in range(3)]
    sympy_imported = "sympy" in sys.modules  # (a warm start runs the stored program without it)
    first = sorted(m.executable.code.facts)  # the phases compiled so far
    x, y = rng.standard_normal((5, 1, 16, 16)), rng.integers(0, 10, 5)
    grads_loss, grads = m.loss_and_grads(x, y)  # a phase compiled on first use (sympy: it is written then)
    np.savez(sys.argv[1], warm=m.warm_start, sympy=sympy_imported, losses=losses, explained=m.explain(),
             first=first, grads_loss=grads_loss, **{"grad " + k: v for k, v in grads.items()}, **m.state_dict())
""")


def run(tmp_path, tag: str, mode: str = "", lr: float = 0.1, **env):
    out = tmp_path / f"{tag}.npz"
    subprocess.run([sys.executable, "-c", COMPILE_AND_TRAIN, str(out), mode, str(lr)], check=True,
                   env=dict(os.environ, CNNCOMPILE_CACHE_DIR=str(tmp_path / "cache"), **env))
    return np.load(out)


def assert_same_training(a, b):
    assert set(a.files) == set(b.files)
    for key in a.files:
        if key not in ("warm", "sympy"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_warm_start_derives_nothing_and_trains_identically(tmp_path):
    """A second process loads the stored program: it derives nothing, imports no sympy, trains to
    the same bits and explains the same formulas; a phase compiled on first use there (the
    gradients alone, written from the stored program, calling the stored kernels) gives the cold
    process's bits too."""
    cold = run(tmp_path, "cold")
    assert not cold["warm"]
    assert len(list((tmp_path / "cache").glob("*.program"))) == 1
    warm = run(tmp_path, "warm", "forbid-derivation")
    assert warm["warm"]
    # import, compile from the stored program and train without sympy (half a second to import);
    # the stored formulas load, with it, only when something reads them: explain's text is the same
    assert cold["sympy"] and not warm["sympy"]
    assert list(cold["first"]) == ["loss_eval", "predict", "train"]
    assert_same_training(cold, warm)


def test_importing_cnncompile_imports_no_sympy():
    assert "sympy" not in subprocess.run([sys.executable, "-c", "import sys, cnncompile; print(list(sys.modules))"],
                                         check=True, capture_output=True, text=True).stdout


def test_the_sympy_version_is_read_without_importing_sympy():
    import sympy
    assert program_cache.sympy_version() == sympy.__version__


def small_net(width: int):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.Flatten(), nn.Linear(width * 4 * 4, 3))


def key(optimizer, width=2):
    tracer, heads, _, loss_name = cc.compiler.trace(small_net(width), (1, 6, 6), nn.CrossEntropyLoss())
    return program_cache.key(tracer.graph, [t.name for _, t in heads], loss_name, optimizer, "llvm",
                             np.dtype("float32"), ())


def test_learning_rate_is_not_part_of_the_key_but_momentum_is():
    base = key(cc.optim.SGD(lr=0.1, momentum=0.9))
    assert key(cc.optim.SGD(lr=0.01, momentum=0.9)) == base
    assert key(cc.optim.SGD(lr=0.1, momentum=0.5)) != base
    assert key(cc.optim.Adam(lr=0.1)) != base
    assert key(cc.optim.SGD(lr=0.1, momentum=0.9), width=3) != base


def test_a_different_learning_rate_reuses_the_entry_and_uses_the_new_rate(tmp_path):
    run(tmp_path, "cold", lr=0.1)
    slow = run(tmp_path, "slow", lr=0.01)
    assert slow["warm"]
    assert_same_training(slow, run(tmp_path, "reference", lr=0.01, CNNCOMPILE_PROGRAM_CACHE="0"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign-pickle"])
def test_a_damaged_program_entry_is_a_miss(tmp_path, monkeypatch, damage):
    cold = run(tmp_path, "cold")
    [entry] = (tmp_path / "cache").glob("*.program")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-1000])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(3000))
    else:  # checksummed and well framed, but not one of our entries
        monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
        diskcache.write(entry.name, b"\x80\x04K\x01.")  # the pickle of the integer 1
        assert diskcache.read(entry.name) == b"\x80\x04K\x01."
    again = run(tmp_path, "again")
    assert not again["warm"]
    assert_same_training(cold, again)
    assert run(tmp_path, "repaired")["warm"]  # the cold compile wrote a good entry back


@pytest.mark.parametrize("module", ["sympy", "numpy", "llvmlite", "python"])
def test_the_key_changes_with_each_library_version(monkeypatch, module):
    """A new sympy or NumPy (whose objects entries pickle), llvmlite or Python makes a new key."""
    base = key(cc.optim.SGD(lr=0.1))
    if module == "python":
        monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    elif module == "sympy":  # (read from its source: a warm start does not import it)
        monkeypatch.setattr(program_cache, "sympy_version", lambda: "0.0.0-another")
    else:
        monkeypatch.setattr(importlib.import_module(module), "__version__", "0.0.0-another")
    assert key(cc.optim.SGD(lr=0.1)) != base


def test_an_entry_under_another_networks_key_is_a_miss_and_is_replaced(tmp_path, monkeypatch):
    """Net B's entry copied to net A's name is not loaded for A (A keeps its own shapes), and A's
    cold compile writes A's entry back over it."""
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))

    def compile_width(width):
        return cc.compile(small_net(width), input_shape=(1, 6, 6), loss=nn.CrossEntropyLoss(), backend="numpy")

    a = compile_width(2)
    [a_entry] = tmp_path.glob("*.program")
    compile_width(5)
    [b_entry] = set(tmp_path.glob("*.program")) - {a_entry}
    a_entry.write_bytes(b_entry.read_bytes())

    again = compile_width(2)
    assert not again.warm_start
    shapes = {name: value.shape for name, value in a.state_dict().items()}
    assert {name: value.shape for name, value in again.state_dict().items()} == shapes
    assert again.predict(np.zeros((3, 1, 6, 6))).shape == (3, 3)
    assert a_entry.read_bytes() != b_entry.read_bytes()
    repaired = compile_width(2)
    assert repaired.warm_start
    assert {name: value.shape for name, value in repaired.state_dict().items()} == shapes


def test_a_loaded_program_keeps_the_one_batch_symbol():
    """Shapes compare their batch axis by identity: a loaded program's is the one `BATCH`, whatever
    sympy's symbol cache has kept meanwhile."""
    import pickle

    import sympy

    from cnncompile.ir.expr import BATCH

    model = cc.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), input_shape=(1, 5, 5), backend="numpy")
    data = pickle.dumps(model.prog)
    sympy.core.cache.clear_cache()
    loaded = pickle.loads(data)
    batched = [n for n, s in model.prog.tensors.items() if s.shape and s.shape[0] is BATCH]
    assert batched and all(loaded.tensors[n].shape[0] is BATCH for n in batched)
