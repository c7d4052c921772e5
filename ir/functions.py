"""The scalar functions a stage body may hold: one row each, read by every consumer.

A body is a sympy expression. Its arithmetic (+, ×, powers, comparisons, Piecewise, Max/Min,
KroneckerDelta) is the expression language's own; every *function* head in it (exp, tanh, σ, ...)
is a row of `FUNCTIONS`: how NumPy evaluates it, how the LLVM backend emits it as a scalar and,
where it can, on a vector row, and how `explain` prints it. A head missing here is refused by
every backend with the same message. Derivatives are sympy's, except where a row's own function
class states a stabler one (σ′ = σ(1 − σ), softplus′ = σ). To add a function: write its row (and,
for a new head, a `sympy.Function` subclass below); nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy


class sigmoid(sympy.Function):
    """σ(x) = 1/(1+e^(−x)); its derivative is stated as σ(1−σ), which stays finite for large |x|."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _sympystr(self, printer):
        return f"σ({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\sigma\left({printer._print(self.args[0])}\right)"


class softplus(sympy.Function):
    """softplus(x) = log(1 + e^x), evaluated as max(x, 0) + log1p(e^(−|x|)) (no overflow); its
    derivative is σ(x)."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _latex(self, printer):
        return rf"\operatorname{{softplus}}\left({printer._print(self.args[0])}\right)"


@dataclass(frozen=True)
class ScalarFunction:
    head: type
    numpy: Callable  # arrays → array
    llvm: Callable  # (FunctionWriter, scalar SSA value) → scalar SSA value
    vector: Callable | None = None  # (FunctionWriter, vector type, suffix, vector value) → value; None: scalar only


def _intrinsic(name):
    return lambda fw, x: fw.intrinsic(name, x)


def _vector_intrinsic(name):
    def emit(fw, vt, suffix, x):
        fw.declares.add(f"declare {vt} @llvm.{name}.{suffix}({vt})")
        return fw.op(f"call {vt} @llvm.{name}.{suffix}({vt} {x})")
    return emit


def _np_sigmoid(x):
    return 0.5 * (np.tanh(0.5 * x) + 1.0)  # stable for large |x|, no overflow warnings


def _np_softplus(x):
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _np_erf(x):
    from math import erf
    return np.vectorize(erf, otypes=[np.result_type(x, np.float32)])(x) if np.ndim(x) else erf(x)


def _llvm_sigmoid(fw, x):
    ex = fw.intrinsic("exp", fw.op(f"fneg {fw.fast} {fw.ft} {x}"))
    return fw.fbin("fdiv", fw.fconst(1.0), fw.fbin("fadd", fw.fconst(1.0), ex))


def _llvm_softplus(fw, x):
    magnitude = fw.intrinsic("fabs", x)
    tail = fw.intrinsic("exp", fw.op(f"fneg {fw.fast} {fw.ft} {magnitude}"))
    return fw.fbin("fadd", fw.intrinsic("maxnum", x, fw.fconst(0)), fw.libm("log1p", tail))


def _llvm_sign(fw, x):
    pos = fw.op(f"fcmp ogt {fw.ft} {x}, {fw.fconst(0)}")
    neg = fw.op(f"fcmp olt {fw.ft} {x}, {fw.fconst(0)}")
    inner = fw.op(f"select i1 {neg}, {fw.ft} {fw.fconst(-1)}, {fw.ft} {fw.fconst(0)}")
    return fw.op(f"select i1 {pos}, {fw.ft} {fw.fconst(1)}, {fw.ft} {inner}")


ROWS = [
    ScalarFunction(sympy.exp, np.exp, _intrinsic("exp")),
    ScalarFunction(sympy.log, np.log, _intrinsic("log")),
    ScalarFunction(sympy.tanh, np.tanh, _intrinsic("tanh")),
    ScalarFunction(sympy.Abs, np.abs, _intrinsic("fabs"), _vector_intrinsic("fabs")),
    ScalarFunction(sympy.sign, np.sign, _llvm_sign),
    ScalarFunction(sympy.erf, _np_erf, lambda fw, x: fw.libm("erf", x)),
    ScalarFunction(sigmoid, _np_sigmoid, _llvm_sigmoid),
    ScalarFunction(softplus, _np_softplus, _llvm_softplus),
]
FUNCTIONS: dict[type, ScalarFunction] = {row.head: row for row in ROWS}
STRUCTURE = (sympy.Piecewise, sympy.KroneckerDelta, sympy.Max, sympy.Min)  # the language's own heads, not rows


def function_of(e) -> ScalarFunction | None:
    """The row of ``e``'s head, if ``e`` is a function application the table knows."""
    return FUNCTIONS.get(type(e))


def unknown(e, backend: str) -> NotImplementedError:
    return NotImplementedError(f"the {backend} backend cannot evaluate {type(e).__name__} in {e}: it is not a row "
                               f"of ir/functions.py (known: {', '.join(sorted(h.__name__ for h in FUNCTIONS))})")
