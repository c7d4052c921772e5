"""The project's import graph from the source (``ast``), lazy imports inside functions included.

``python tests/import_graph.py`` prints which top-level areas import which: the closing notes' evidence
that ``ir/`` imports no backend and no compiler module imports the training package.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package name (pyproject's package-dir)
PACKAGES = {"cnncompile": "cnncompile", "ir": "cnncompile.ir", "backends": "cnncompile.backends"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def source_files():
    for folder in PACKAGES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute names (``from . import x`` resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("cnncompile")}


def area(module: str) -> str:
    """The coarse area a module belongs to: ir, backends, training, or cnncompile (the compiler's surface)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("ir", "backends", "training"):
        return parts[1]
    return "cnncompile"


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    return {module_name(p): imports_of(p) for p in source_files()}


def area_edges() -> dict[tuple[str, str], list[str]]:
    edges = defaultdict(list)
    for module, targets in graph().items():
        for target in targets:
            a, b = area(module), area(target)
            if a != b:
                edges[a, b].append(f"{module} -> {target}")
    return edges


if __name__ == "__main__":
    for (a, b), examples in sorted(area_edges().items()):
        importers = sorted({e.split(" -> ")[0] for e in examples})
        print(f"{a:10s} -> {b:10s} {len(examples):3d} imports, from: {', '.join(importers)}")
