"""The command line: help for every command and option, one-line errors and warnings, bench on
several heads, and --epochs meaning what fit(epochs=N) means."""
import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import cli

TINY = '''
import numpy as np
from cnncompile import nn, optim

net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
input_shape = (1, 8, 8)
optimizer = optim.SGD(lr=0.1)
epochs = 2
batch_size = 8


def dataset():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    return {"train": (PIXELS, y), "val": (x[:8], y[:8]), "test": (x[:8], y[:8])}
'''

HEADS = '''
from cnncompile import nn, optim


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten())
        self.cls = nn.Linear(72, 3)
        self.box = nn.Linear(72, 4)

    def forward(self, x):
        h = self.trunk(x)
        return HEAD_OUTPUT


net = TwoHeads()
input_shape = (1, 8, 8)
loss = HEAD_LOSS
optimizer = optim.Adam(lr=1e-3)
'''


def network_file(tmp_path, text, name="net.py", **replace):
    for key, value in replace.items():
        text = text.replace(key, value)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run(argv, capsys):
    """Exit status (0 when main returns), stdout, stderr."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def subcommands():
    action = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    commands = subcommands()
    assert {"train", "explain", "summary", "emit", "bench", "show"} <= set(commands)
    for name in commands:
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), f"`cnncompile --help` does not describe {name}"


def test_every_option_has_help_text():
    for name, sub in subcommands().items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"`cnncompile {name}` option {action.dest} has no help"


@pytest.fixture
def tiny(tmp_path):
    return network_file(tmp_path, TINY, PIXELS="x")


def test_an_unknown_layer_is_one_line_naming_the_layers(capsys, tiny):
    code, _, err = run(["show", tiny, "--backend", "numpy", "--patches", "p.png", "--layer", "99"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("cnncompile: no layer named '99'") and "'0'" in lines[0]
    assert "Traceback" not in err and not lines[0].startswith('cnncompile: "')


def test_missing_data_is_one_line(capsys, tmp_path):
    path = network_file(tmp_path, TINY.replace("def dataset", "def unused"), "mnist_net.py", PIXELS="x")
    code, _, err = run(["train", path, "--backend", "numpy", "--data", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"cnncompile: {tmp_path / 'nowhere'}: no such file or directory; --data takes "
                                        "a directory of MNIST IDX files or a mnist.pkl.gz"]


def test_warnings_are_one_line_without_python_source(capsys, tmp_path):
    raw = "(rng.uniform(0, 255, x.shape)).astype(np.uint8)"
    path = network_file(tmp_path, TINY, "raw.py", PIXELS=raw)
    code, _, err = run(["train", path, "--backend", "numpy", "--epochs", "1"], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "uint8" in line]
    assert warned and all(line.startswith("cnncompile: warning: ") for line in warned), err
    assert "UserWarning" not in err and "warnings.warn" not in err and ".py:" not in err


@pytest.mark.parametrize("heads", ["dict", "tuple"])
def test_bench_runs_several_heads(heads, capsys, tmp_path):
    output, loss = {"dict": ('{"cls": self.cls(h), "box": self.box(h)}',
                             '{"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()}'),
                    "tuple": ("(self.box(h), self.cls(h))", "(nn.L1Loss(), nn.CrossEntropyLoss())")}[heads]
    path = network_file(tmp_path, HEADS, HEAD_OUTPUT=output, HEAD_LOSS=loss)
    code, out, err = run(["bench", path, "--backend", "numpy", "--batch-size", "4", "--steps", "1",
                          "--rounds", "1"], capsys)
    assert code == 0, err
    assert "batch 4: train step" in out and "img/s" in out


def test_random_targets_fit_each_head(tmp_path):
    spec = cli.runpy.run_path(network_file(tmp_path, HEADS, "h.py",
                                           HEAD_OUTPUT='{"cls": self.cls(h), "box": self.box(h)}',
                                           HEAD_LOSS='{"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()}'))
    model = cc.compile(spec["net"], (1, 8, 8), loss=spec["loss"], optimizer=spec["optimizer"], backend="numpy")
    y = cli.random_targets(model, 5, np.random.default_rng(0))
    assert y["cls"].shape == (5,) and y["cls"].dtype.kind == "i" and 0 <= y["cls"].min() and y["cls"].max() < 3
    assert y["box"].shape == (5, 4) and y["box"].dtype == np.float32


def test_epochs_means_more_epochs_in_the_api_and_the_cli(capsys, tmp_path, tiny):
    ckpt = str(tmp_path / "run.ckpt")
    code, out, err = run(["train", tiny, "--backend", "numpy", "--epochs", "1", "--checkpoint", ckpt],
                         capsys)
    assert code == 0 and "after 1 epochs" in out, err
    code, out, err = run(["train", tiny, "--backend", "numpy", "--resume", ckpt, "--epochs", "2"], capsys)
    assert code == 0 and "after 3 epochs" in out, err  # 1 done + 2 more

    spec = cli.load_spec(tiny)
    model = cc.load(ckpt, net=spec["net"], backend="numpy")
    x, y = spec["dataset"]()["train"]
    model.fit((x, y), epochs=2, batch_size=8, verbose=False)
    assert model.epoch == 3  # the same: 2 more after the checkpoint's 1


def test_resume_without_epochs_finishes_the_files_epochs(capsys, tmp_path, tiny):
    ckpt = str(tmp_path / "run.ckpt")
    assert run(["train", tiny, "--backend", "numpy", "--epochs", "1", "--checkpoint", ckpt], capsys)[0] == 0
    code, out, err = run(["train", tiny, "--backend", "numpy", "--resume", ckpt], capsys)
    assert code == 0 and "after 2 epochs" in out, err  # the file says epochs = 2


def test_bench_runs_the_bbox_example(capsys):
    path = str(Path(__file__).resolve().parent.parent / "examples" / "bbox.py")
    code, out, err = run(["bench", path, "--backend", "numpy", "--batch-size", "2", "--steps", "1", "--rounds", "1"],
                         capsys)
    assert code == 0 and "batch 2: train step" in out, err


def test_show_graph_compiles_no_machine_code(capsys, tmp_path, tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("show --graph compiled the network")
    monkeypatch.setattr(cli, "compile_spec", refuse)
    code, out, err = run(["show", tiny, "--graph", str(tmp_path / "g.dot")], capsys)
    assert code == 0, err
    assert (tmp_path / "g.dot").read_text().startswith("digraph") and out.startswith("wrote ")


def test_show_curves_without_a_checkpoint_says_how_to_get_one(capsys, tiny, tmp_path):
    code, _, err = run(["show", tiny, "--curves", str(tmp_path / "c.png")], capsys)
    assert code != 0 and err.strip().splitlines() == [
        "cnncompile show --curves needs a trained network's history: pass --checkpoint P written by "
        "`cnncompile train FILE --checkpoint P`"]


def test_an_interrupt_is_one_line(capsys, tmp_path):
    path = network_file(tmp_path, TINY.replace("    rng = np.random.default_rng(0)\n", "    raise KeyboardInterrupt\n"),
                        PIXELS="x")
    code, _, err = run(["train", path, "--backend", "numpy"], capsys)
    assert code == 130 and err.strip().splitlines() == ["cnncompile: interrupted"]


@pytest.mark.parametrize("source, expected", [
    ("from cnncompile import nn\n\nnet = nn.Sequential(nn.Conv2d(1, 6, 5), nn.NoSuchLayer(6))\n",
     "line 3: AttributeError: "),
    ("from cnncompile import nn\nnet = nn.Sequential(nn.Conv2d(1, 6, 5)\n", "line 2: '(' was never closed"),
])
def test_an_error_in_the_network_file_is_one_line_naming_its_line(source, expected, capsys, tmp_path):
    path = network_file(tmp_path, source, "broken.py")
    code, _, err = run(["summary", path], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"cnncompile: {path}, {expected}"), lines[0]
