"""What `summary`, `explain` and `schedule` print, and that printing them never builds machine code."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import cnncompile as cc
from helpers import SCHEDULE_TARGET
from cnncompile import cli, nn
from cnncompile.backends.llvm import program as llvm_program
from cnncompile.backends.numpy import program as numpy_program
from cnncompile.backends.sources import _llvm_text
from cnncompile.compiler import derivation

EXAMPLES = Path(__file__).parent.parent / "examples"


def small_net():
    return nn.Sequential(nn.Conv2d(1, 6, 5, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(6 * 14 * 14, 10))


def small():
    return derivation(small_net(), (1, 32, 32), nn.CrossEntropyLoss(), cc.optim.SGD(lr=0.1))


@pytest.fixture
def no_executable(monkeypatch):
    """Any attempt to build an executable (LLVM or NumPy) fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("an executable was built")
    monkeypatch.setattr(llvm_program.LLVMExecutable, "__init__", refuse)
    monkeypatch.setattr(numpy_program.NumpyExecutable, "__init__", refuse)


def run_cli(capsys, *argv) -> str:
    cli.main(list(argv))
    return capsys.readouterr().out


# ----- summary and explain need the graph and the derivation only ----------------------------------------

def test_cli_summary_of_resnet18_builds_no_executable(no_executable, capsys):
    out = run_cli(capsys, "summary", str(EXAMPLES / "resnet18.py"))
    assert "total: 11,689,512 parameters" in out  # torchvision's ResNet-18 count
    assert re.search(r"layer4\.1\.conv2\s+Conv2d\s+\(N, 512, 7, 7\)\s+2,359,296", out)


def test_cli_explain_of_resnet18_builds_no_executable(no_executable, capsys):
    out = run_cli(capsys, "explain", str(EXAMPLES / "resnet18.py"), "fc")
    assert "layer 'fc' (Linear), forward:" in out
    assert "Zc[b, n] = Σ_{k=0..511} W[n, k]·X[b, k]" in out
    assert "∂L/∂W[n, k] = Σ_{b=0..B - 1}" in out


def test_summary_never_derives(no_executable, monkeypatch):
    import cnncompile.compiler as compiler
    monkeypatch.setattr(compiler, "build_program", lambda *a, **k: (_ for _ in ()).throw(AssertionError("derived")))
    text = small().summary()
    assert "total: 11,920 parameters" in text  # 6·25 + 1176·10 + 10


class Joined(nn.Module):
    """A residual add (a tensor read twice: its gradient accumulates), batch norm (train and eval
    gradients), a concatenation, max pooling, dropout and a dense layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)
        self.pool, self.drop, self.fc = nn.MaxPool2d(2), nn.Dropout(0.5), nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        y = nn.functional.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(self.drop(self.pool(cc.cat([y, self.conv2(y)]))).flatten(1))


def test_one_layers_derivation_prints_what_the_whole_derivation_prints():
    args = (Joined(), (1, 6, 6), nn.CrossEntropyLoss(), cc.optim.SGD(lr=0.1, momentum=0.9))
    whole = derivation(*args)
    whole.prog  # derived in full: explain then reads this program
    layers = [n.name for n in whole.tracer.graph.ops]
    assert len(layers) >= 9
    for layer in layers:
        one = derivation(*args)
        assert one.explain(layer) == whole.explain(layer), layer
        assert one._prog is None  # only the layer's gradients were derived
    # (y is read by the residual add and twice by conv2: its later gradients accumulate)
    assert [layer for layer in layers if layer != "bn" and " += " in whole.explain(layer)]


# ----- explain reads like the lecture ----------------------------------------------------------------------

def test_relu_prints_as_max_and_its_derivative_as_the_indicator():
    text = small().explain("1")
    assert "Z[b, c, x, y] = max(0, X[b, c, x, y])" in text
    assert "∂L/∂X[b, c, x, y] = [X[b, c, x, y] > 0]·∂L/∂Z[b, c, x, y]" in text
    assert "Piecewise" not in text and "e0" not in text


def test_elementwise_stages_use_the_layers_index_names():
    text = small().explain("3")
    assert "Z[b, 196·c + 14·x + y] = X[b, c, x, y]" in text
    assert "∂ through the read X[b, c, x, y]:" in text
    assert not re.search(r"\be\d\b", text)


def test_leaky_relu_prints_its_cases():
    d = derivation(nn.Sequential(nn.LeakyReLU(0.1)), (1, 2, 2), nn.MSELoss())
    text = d.explain("0")
    assert "Z[b, c, x, y] = {X[b, c, x, y] if X[b, c, x, y] > 0; 0.1·X[b, c, x, y] otherwise}" in text


def test_relu6_prints_as_a_clamp_and_its_derivative_as_the_range_indicator():
    d = derivation(nn.Sequential(nn.ReLU6()), (1, 2, 2), nn.MSELoss())
    text = d.explain("0")
    assert "Z[b, c, x, y] = min(max(0, X[b, c, x, y]), 6.0)" in text
    assert "∂L/∂X[b, c, x, y] = [X[b, c, x, y] ≤ 6.0 and X[b, c, x, y] ≥ 0]·∂L/∂Z[b, c, x, y]" in text


def test_lecture_notation_names():
    d = small()
    text = d.explain("0", notation="lecture")
    assert "z(l, n, x, y) = Σ_{m=0..0} Σ_{i=0..4} Σ_{j=0..4} w_l(m, n, i, j)·y(l-1, m, x+i, y+j)" in text
    assert "dDiv/dw_l(m, n, i, j) = Σ_{x=0..27} Σ_{y=0..27} dDiv/dz(l, n, x, y)·y(l-1, m, i+x, j+y)" in text
    assert "(per example; the code also sums over the batch b)" in text
    assert "dDiv/dy(l-1, m, u, v) = Σ_{n=0..5} Σ_{x=max(0, u-4)..min(27, u)}" in text
    relu = d.explain("1", notation="lecture")
    assert "y(l, c, x, y) = max(0, z(l, c, x, y))" in relu
    assert "dDiv/dz(l, c, x, y) = [z(l, c, x, y) > 0]·dDiv/dy(l, c, x, y)" in relu


def test_model_explain_lecture_notation_and_bad_notation():
    model = cc.compile(small_net(), (1, 32, 32), loss=nn.CrossEntropyLoss(), backend="numpy")
    assert "w_l(k, n)" in model.explain("4", notation="lecture")
    with pytest.raises(cc.CompileError, match="notation must be one of"):
        model.explain("4", notation="paper")


def test_cli_lecture_notation(no_executable, capsys):
    out = run_cli(capsys, "explain", str(EXAMPLES / "lenet5.py"), "0", "--notation", "lecture")
    assert "w_l(m, n, i, j)·y(l-1, m, x+i, y+j)" in out and "dDiv/dz(l, n, x, y)" in out


@pytest.mark.parametrize("notation", ["code", "lecture"])
def test_latex_is_a_whole_document(notation, tmp_path):
    doc = small().explain(latex=True, notation=notation)
    assert doc.startswith("\\documentclass") and doc.rstrip().endswith("\\end{document}")
    assert doc.isascii(), sorted({c for c in doc if not c.isascii()})
    assert "\\subsection*{Layer \\texttt{1} (ReLU)}" in doc
    assert "\\max\\left(0, " in doc and "\\left[" in doc
    assert doc.count("\\[") == doc.count("\\]")
    if notation == "code":
        assert "\\frac{\\partial L}{\\partial {W}_{n, m, i, j}}" in doc
        assert "\\sum_{x=\\max\\left(0, u - 4\\right)}^{\\min\\left(27, u\\right)}" in doc
    else:
        assert "\\frac{\\partial \\mathrm{Div}}{\\partial w_{l}(m, n, i, j)}" in doc
    engine = shutil.which("pdflatex")
    if engine:  # where a TeX engine is installed, the document must compile
        (tmp_path / "f.tex").write_text(doc)
        done = subprocess.run([engine, "-interaction=nonstopmode", "-halt-on-error", "f.tex"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
        assert (tmp_path / "f.pdf").stat().st_size > 0


def test_cli_latex_document(no_executable, capsys):
    out = run_cli(capsys, "explain", str(EXAMPLES / "lenet5.py"), "0", "--latex")
    assert out.startswith("\\documentclass") and "\\end{document}" in out and out.isascii()


# ----- the schedule ----------------------------------------------------------------------------------------

def test_schedule_lists_every_kernel_with_its_fused_stages_and_loops():
    from cnncompile.backends.llvm.codegen import code_program
    from cnncompile.backends.llvm.names import stage_label
    from cnncompile.backends.llvm.schedule import Scheduler
    d = small()
    text = d.schedule("train")
    plan = Scheduler(code_program(d.prog, "float", SCHEDULE_TARGET), target=SCHEDULE_TARGET).kernels("train")
    assert text.startswith(f"phase train: {sum(len(k.stages) for k in plan)} stages in {len(plan)} kernels")
    for k, kernel in enumerate(plan):
        assert f"kernel {k}: {stage_label(kernel.main)}" in text
    conv = text.split("kernel 0: ")[1].split("\nkernel 1: ")[0]
    assert "layer '0' forward 0.out" in conv and "fuses in its epilogue: layer '1' forward 1.out" in conv  # ReLU
    template = plan[0].templates[0][0]
    assert f"template {template.kind}" in conv
    assert f"parallel {template.split[0]} in 0.." in conv
    if template.row:
        assert f"vectorized {template.row} in 0..27" in conv


def test_schedule_of_every_phase_and_an_unknown_phase():
    d = small()
    text = d.schedule()
    for phase in ("predict", "loss", "grads", "train"):
        assert f"phase {phase}:" in text
    with pytest.raises(cc.CompileError, match="no phase 'step'"):
        d.schedule("step")


def test_model_schedule_and_cli_schedule(no_executable, capsys):
    out = run_cli(capsys, "explain", str(EXAMPLES / "lenet5.py"), "--schedule", "--phase", "predict")
    assert out.startswith("phase predict:") and "template tiled_row" in out and "phase train" not in out


def test_model_schedule_matches_derivation():
    model = cc.compile(small_net(), (1, 32, 32), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    assert model.schedule("train") == small().schedule("train")


def test_llvm_functions_are_named_and_commented_after_their_stages():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    d = derivation(net, (4, 6, 6), nn.CrossEntropyLoss(), cc.optim.SGD(lr=0.1))
    text = _llvm_text(d.prog, "float32")
    names = re.findall(r"define internal void (@cc_source_f\d+_\w+)\(", text)
    assert "@cc_source_f0_0_forward_out_conv" in names
    assert any(n.endswith("_0_backward_d_weight") or "_backward_d_weight" in n for n in names)
    # identical kernels (the two bias gradients) share one function; its header names every caller
    shared = re.search(r"((?:; layer [^\n]*\n){2,})define internal void (@\w+)\(", text)
    assert shared is not None
    labels, name = shared[1].strip().split("\n"), shared[2]
    grads = text.split("define void @cc_source_grads(")[1].split("\n}\n")[0]
    assert len(labels) >= 2 and grads.count(f"call void {name}(") == len(labels)
    assert "; for b (this thread's share)" in text and "; vector row " in text
    import llvmlite.binding as llvm
    llvm.parse_assembly(text).verify()
