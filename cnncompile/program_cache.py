"""Warm starts: a compiled program stored on disk under a hash of the traced network.

A second ``cc.compile`` of the same network (same layers, shapes, loss, optimizer constants,
dtype, backend, and the same compiler source) loads the derived stages and the backend's
generated code from here instead of lowering, deriving, scheduling and writing IR again.
The key is made from the graph IR alone, before any formula exists, and from the versions of
the libraries whose objects the entry pickles or whose behaviour shaped it. Entries are pickles
in the checksummed frame of :mod:`diskcache` that record their own key; one that does not load,
or that was stored under another key (a copied or renamed file), is a miss and is replaced.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
from pathlib import Path

from . import diskcache

FORMAT = "program-4"
_source_hash: str | None = None


def source_hash() -> str:
    """A hash of the compiler's own source files: a changed compiler never reads old entries."""
    global _source_hash
    if _source_hash is None:
        import cnncompile.backends
        import cnncompile.ir

        h = hashlib.sha256()
        for package in (Path(__file__).parent, Path(cnncompile.ir.__file__).parent,
                        Path(cnncompile.backends.__file__).parent):
            for path in sorted(package.rglob("*.py")):
                h.update(str(path.relative_to(package)).encode())
                h.update(path.read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


def describe_graph(graph) -> list:
    """Everything about the traced graph that the compiled program depends on, as plain values."""
    tensors = [(s.name, repr(s.shape), s.role, s.dtype) for s in graph.tensors.values()]
    ops = [(n.name, n.kind, repr(sorted(n.attrs.items())), n.inputs, n.output, sorted(n.params.items()))
           for n in graph.ops]
    return [tensors, ops, graph.inputs, graph.params, graph.buffers, graph.state_order, sorted(graph.noise.items())]


def library_versions() -> list[str]:
    """Python's, sympy's, NumPy's and llvmlite's versions: entries pickle sympy and NumPy objects,
    and the generated code depends on llvmlite's LLVM (absent: the NumPy backend runs). sympy's
    is read from its source, not imported (a warm start never imports it)."""
    import numpy
    try:
        import llvmlite
        llvm_version = llvmlite.__version__
    except ImportError:
        llvm_version = "none"
    return [sys.version, sympy_version(), numpy.__version__, llvm_version]


def sympy_version() -> str:
    """``sympy.__version__`` without importing sympy (its ``release.py`` holds it)."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("sympy")
    try:
        text = Path(spec.submodule_search_locations[0], "release.py").read_text()
        return re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text).group(1)
    except (AttributeError, OSError, TypeError, IndexError):  # laid out otherwise: ask sympy itself
        import sympy
        return sympy.__version__


def key(graph, outputs, loss_name, optimizer, backend, dtype, codegen_options=()) -> str:
    """The entry's name. The learning rate is a runtime scalar, so it is not part of the key."""
    hyper = None
    if optimizer is not None:
        hyper = (type(optimizer).__name__, sorted((k, repr(v)) for k, v in optimizer.hyper().items() if k != "lr"))
    description = [FORMAT, source_hash(), library_versions(), describe_graph(graph), list(outputs), loss_name,
                   hyper, backend, str(dtype), list(codegen_options)]
    return hashlib.sha256(repr(description).encode()).hexdigest()


def enabled() -> bool:
    return os.environ.get("CNNCOMPILE_PROGRAM_CACHE", "1") != "0"


def header(name: str) -> bytes:
    """What an entry starts with: the format and its own key, checked before anything is unpickled."""
    return f"{FORMAT} {name}\n".encode()


def load(name: str) -> dict | None:
    """The entry stored under ``name``, or None: missing, damaged, or recorded under another key."""
    if not enabled():
        return None
    payload = diskcache.read(f"{name}.program")
    if payload is None or not payload.startswith(header(name)):
        return None
    try:
        entry = pickle.loads(payload[len(header(name)):])
    except Exception:  # noqa: BLE001 - an entry from an incompatible library version is a miss
        return None
    return entry if isinstance(entry, dict) else None


def store(name: str, entry: dict) -> None:
    """Write the entry with its own key in front, so a file under a wrong name is never trusted."""
    if enabled():
        diskcache.write(f"{name}.program", header(name) + pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL))
