"""sympy, imported on its first use.

The formulas are sympy objects, but running a stored program (a warm start: shapes, buffers and
machine code) needs none of them, and importing sympy costs about half a second. Modules that
a warm start imports write ``from cnncompile.ir.lazy import sympy`` and use it as the module:
the first attribute read imports it, and each attribute is then kept here as a plain one.
"""
from __future__ import annotations

import importlib


class LazySympy:
    def __getattr__(self, name: str):
        value = getattr(importlib.import_module("sympy"), name)
        setattr(self, name, value)
        return value

    def __repr__(self) -> str:
        return "<sympy, imported on first use>"


sympy = LazySympy()
