"""Lowering, the derivation and `explain` reuse work across ops and stages that differ only in tensor
names; what they produce is exactly what lowering, deriving and printing every one afresh produces."""
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings

import cnncompile as cc
from cnncompile import cli
from cnncompile import nn as cnn
from cnncompile.compiler import derivation
from cnncompile.ir import autodiff
from cnncompile.ir.ops import base as ops_base
from cnncompile import explain as explain_module
from random_nets import build, networks

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))


class Args:
    backend = None


def example(name: str):
    return cli.derive_spec(cli.load_spec(str(ROOT / "examples" / f"{name}.py")), Args())


def derived_both_ways(d, monkeypatch):
    """The program derived with memoization (tables as earlier derivations left them) and afresh."""
    monkeypatch.setattr(autodiff, "MEMO", True)
    memo = d.derive(d.optimizer)
    monkeypatch.setattr(autodiff, "MEMO", False)
    return memo, d.derive(d.optimizer)


def assert_same_program(memo, plain):
    for part in ("forward", "loss", "backward", "update"):
        assert len(getattr(memo, part)) == len(getattr(plain, part)), part
        for a, b in zip(getattr(memo, part), getattr(plain, part)):
            assert a == b, f"{part} {a.layer}: {a.out}"  # every field; sympy bodies argument for argument
            assert str(a) == str(b)
    assert memo.tensors == plain.tensors


def test_examples_are_named_as_expected():
    assert {"lenet5", "alexnet", "resnet18", "resnet20", "densenet", "mobilenet", "bbox", "pose"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_derives_the_same_program_with_and_without_memoization(name, monkeypatch):
    memo, plain = derived_both_ways(example(name), monkeypatch)
    assert_same_program(memo, plain)


def test_repeated_blocks_are_derived_once():
    """ResNet-20's eighteen 3×3 convolutions come in three sizes: far fewer transpositions are
    computed than reads transposed."""
    autodiff._transposed.clear()
    prog = example("resnet20").prog
    assert len(autodiff._transposed) < len(prog.backward) / 2
    assert len(autodiff._derivatives) < len(autodiff._transposed)


def test_repeated_layers_are_lowered_once(monkeypatch):
    """ResNet-18's twenty batch norms and sixteen 3×3 convolutions come in few (kind, attributes,
    shapes): most ops are renamed from another's stages, and the program is the one lowered afresh."""
    monkeypatch.setattr(autodiff, "MEMO", True)
    ops_base._lowered.clear()
    d = example("resnet18")
    graph, outputs = d.tracer.graph, [t.name for _, t in d.heads]
    memo = graph.lower(outputs, d.loss_name)
    assert 0 < len(ops_base._lowered) < len(graph.ops) / 2
    monkeypatch.setattr(autodiff, "MEMO", False)
    assert_same_program(memo, graph.lower(outputs, d.loss_name))


def test_a_renaming_that_changes_the_order_of_names_is_lowered_afresh(monkeypatch):
    """Two joins of the same shapes whose inputs sort the other way round: the second is not a
    renaming of the first (sympy orders a sum's terms by name), and both print as lowered afresh."""
    monkeypatch.setattr(autodiff, "MEMO", True)
    ops_base._lowered.clear()

    class Net(cnn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = cnn.ReLU(), cnn.Tanh()

        def forward(self, x):
            r, t = self.a(x), self.b(x)
            return (r + t) + (t + r)

    d = derivation(Net(), (2, 3, 3), cnn.MSELoss())
    graph, outputs = d.tracer.graph, [t.name for _, t in d.heads]
    memo = graph.lower(outputs, d.loss_name)
    monkeypatch.setattr(autodiff, "MEMO", False)
    assert_same_program(memo, graph.lower(outputs, d.loss_name))


def test_random_networks_derive_the_same_program_with_and_without_memoization(monkeypatch):
    """The memo tables are kept across the networks: a stage is often renamed from another
    network's (other layer names, other order of names)."""
    tried = []

    @settings(max_examples=25, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(networks())
    def check(desc):
        try:
            net = build(cnn, desc, cc.cat)
        except ValueError:
            assume(False)
        two = desc["two_heads"]
        loss = (cnn.CrossEntropyLoss(), cnn.MSELoss()) if two else cnn.CrossEntropyLoss()
        d = derivation(net, (desc["channels"], desc["size"], desc["size"]), loss,
                       cc.optim.SGD(lr=0.1, momentum=0.9), loss_weights=(1.0, 0.5) if two else None)
        memo, plain = derived_both_ways(d, monkeypatch)
        assert_same_program(memo, plain)
        assert explained_both_ways(d, monkeypatch) is True
        tried.append(desc)

    check()
    assert len(tried) >= 10


def explained_both_ways(d, monkeypatch):
    """True where `explain` prints the same text with memoization (printed lines as earlier
    networks left them) and without; else the two texts."""
    texts = []
    for memo in (True, False):
        monkeypatch.setattr(autodiff, "MEMO", memo)
        d._prog = None
        texts.append(d.explain())
    return texts[0] == texts[1] or texts


@pytest.mark.parametrize("size", [13, 15, 18])
def test_strided_dilated_windows_of_several_sizes_derive_the_same_program(size, monkeypatch):
    """Lattice transpositions (stride and dilation sharing a factor) reuse gradient bodies across
    map sizes: the ranges are solved again for each."""
    net = cnn.Sequential(cnn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), cnn.ReLU(),
                         cnn.Conv2d(3, 3, (2, 3), stride=2, padding=1, dilation=2), cnn.MaxPool2d(2, 1),
                         cnn.AvgPool2d(2, 1, 1), cnn.Flatten())
    shape = (2, size, size)
    d = derivation(net, shape, cnn.MSELoss())
    memo, plain = derived_both_ways(d, monkeypatch)
    assert_same_program(memo, plain)
    assert any(s.guards for s in plain.backward) or any(v for s in plain.backward for v, ext in s.reduce if ext is None)


def explained(name: str) -> str:
    """Every layer in both notations and as LaTeX, and one layer from its own derivation."""
    d = example(name)
    one = d.explain(d.tracer.graph.ops[1].name)
    return "\n".join([one, d.explain(), d.explain(notation="lecture"), d.explain(latex=True)])


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in ("densenet", "resnet20", "resnet18")
                                              else []) for n in EXAMPLES])  # (the three largest: 7-10 s each)
def test_explain_prints_the_same_text_with_and_without_memoization(name, monkeypatch):
    explain_module._printed.clear()
    monkeypatch.setattr(autodiff, "MEMO", True)
    memo = explained(name)
    monkeypatch.setattr(autodiff, "MEMO", False)
    plain = explained(name)
    assert memo == plain
    assert "∂L/∂W" in memo and "dDiv/d" in memo and "\\documentclass" in memo


def test_repeated_blocks_are_printed_once(monkeypatch):
    monkeypatch.setattr(autodiff, "MEMO", True)
    explain_module._printed.clear()
    d = example("resnet20")
    text = d.explain()
    stages = len(d.prog.forward) + len(d.prog.loss) + len(d.prog.backward)
    assert text and len(explain_module._printed) < stages / 2


@pytest.mark.parametrize("command", [["summary"], ["explain"], ["explain", "conv1", "--latex"],
                                     ["explain", "--notation", "lecture"]])
def test_summary_and_explain_import_no_backend(command):
    """In a fresh process: the command prints, and neither llvmlite nor a backend was imported."""
    script = (f"import sys, io, contextlib\nfrom cnncompile import cli\n"
              f"out = io.StringIO()\n"
              f"with contextlib.redirect_stdout(out):\n"
              f"    cli.main({[command[0], str(ROOT / 'examples' / 'resnet20.py'), *command[1:]]!r})\n"
              f"loaded = [m for m in sys.modules if m.split('.')[0] == 'llvmlite' or m.startswith('cnncompile.backends')]\n"
              f"print(len(out.getvalue()), loaded)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    size, loaded = done.stdout.split(" ", 1)
    assert int(size) > 1000 and loaded.strip() == "[]"
