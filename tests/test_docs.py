"""The repository documents itself: docs/architecture.md names paths that exist and covers every
folder; no file points to a design document outside the repository; test docstrings and comments
say what they check, not which numbered issue asked for it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
FOLDERS = ("cnncompile", "ir", "backends", "tests", "bench", "examples")
OUTSIDE = ("DESIGN" + ".md", "API" + ".md")  # split, so that this file does not name them itself


def repository_files():
    for folder in FOLDERS:
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".toml", ".txt")
                    and "__pycache__" not in p.parts and p != Path(__file__).resolve())
    yield from (ROOT / name for name in ("README.md", "pyproject.toml"))


def test_no_file_points_to_a_design_document_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}: {name}" for p in repository_files() for name in OUTSIDE
             if name in p.read_text(errors="replace")]
    assert not found, "point to docs/architecture.md instead: " + "; ".join(found)


def test_tests_say_what_they_check_not_which_issue_asked():
    numbered = re.compile(r"\bissue\s*#?\d+", re.I)
    found = [f"{p.relative_to(ROOT)}:{k + 1}" for p in sorted((ROOT / "tests").rglob("*.py"))
             for k, line in enumerate(p.read_text().splitlines()) if numbered.search(line)]
    assert not found, found


def test_architecture_names_paths_that_exist():
    text = ARCHITECTURE.read_text()
    paths = set(re.findall(r"`((?:cnncompile|ir|backends|tests|bench|examples|docs)/[\w/.\-]*)`", text))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_architecture_covers_every_folder_and_the_worked_example():
    text = ARCHITECTURE.read_text()
    table = text[text.index("## 2. What each folder owns"):text.index("## 3.")]
    for folder in ("cnncompile/", "ir/", "backends/", "tests/", "bench/"):
        assert f"| `{folder}`" in table, folder
    for heading in ("data flow", "derivation", "loops", "add a layer", "add a scalar function"):
        assert re.search(rf"^## .*{heading}", text, re.M | re.I), heading
    assert "residue class" in text.lower() and "Fourier–Motzkin" in text


def doc_block(text: str, marker: str) -> str:
    """The first fenced block after ``marker``."""
    start = text.index("```", text.index(marker))
    body = text.index("\n", start) + 1
    return text[body:text.index("```", body)]


def test_the_worked_example_is_what_the_compiler_prints():
    import cnncompile as cc
    from cnncompile.compiler import derivation
    from cnncompile.ir.residue import residue_classes
    text = ARCHITECTURE.read_text()
    spec = {}
    exec(doc_block(text, "**Worked example"), spec)
    derived = derivation(spec["net"], input_shape=spec["input_shape"], loss=cc.nn.CrossEntropyLoss())
    printed = derived.explain("2")
    shown = doc_block(text, "`cnncompile explain strided.py 2`")
    for line in shown.splitlines():
        if line.strip() != "...":
            assert line in printed.splitlines(), line
    stage = next(s for s in derived.prog.backward if s.layer == "2" and s.out.startswith("dL/d1"))
    classes = residue_classes(stage)
    assert len(classes) == 4  # row and column parity
    x_t = sorted({dict(c.grid)["x_t"] for c in classes})
    assert x_t == [1, 2]  # even rows: one kernel row, odd rows: two (the table)
