"""The README's Python blocks run as written, in order, in one namespace (as a reader pasting them
into one session would): the README cannot drift from the code. Models compile for the NumPy
backend here (no machine code to build); a block that imports an optional package (torch, onnx)
runs where that package is installed."""
import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from cnncompile import compiler
import torchvision_models

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def missing_modules(code: str) -> list[str]:
    """Top-level modules the block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if not usable(n))


def usable(name: str) -> bool:
    """Is the module importable here? torchvision's compiled operators do not load beside this
    machine's torch build, but its model definitions do: `torchvision_models` makes them importable."""
    if name in sys.modules:
        return True
    if name == "torchvision":
        try:
            torchvision_models.models()
        except ImportError:
            return False
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_python_blocks_are_found():
    text = "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = a + 1\n")]
    assert missing_modules("import numpy\nfrom no_such_package_xyz import a") == ["no_such_package_xyz"]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's Use section has Python blocks"
    monkeypatch.chdir(tmp_path)  # files the blocks write (checkpoints, logs) land here
    numpy_default = compiler.backend_class
    monkeypatch.setattr(compiler, "backend_class", lambda backend=None: numpy_default(backend or "numpy"))
    namespace = {"__name__": "__readme__"}
    ran, left_out = 0, []
    for line, code in blocks:
        missing = missing_modules(code)
        if missing:
            left_out.append(f"README.md:{line} needs {', '.join(missing)}")
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as exc:
            pytest.fail(f"the README's Python block at line {line} fails: {type(exc).__name__}: {exc}")
        ran += 1
    assert ran >= 2, left_out
    if left_out:
        print("not run (package not installed): " + "; ".join(left_out))
