"""The operations a vector row can hold: one table, read by the emitter and by the schedule.

A register template (`rows.RegisterRow.emit`) writes a stage body as vectors: reads, numbers and
runtime scalars itself, every other head through its row of `VECTOR_OPS` (or, for a scalar
function, its row of `ir/functions.py` with a vector lowering). The schedule asks `vector_safe`
whether a body may run on a row, and `vector_safe` walks the same table: an operation the emitter
cannot write is never scheduled on a row, and there is no second list to keep in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from cnncompile.ir.functions import function_of

from .emit import FAST

RELATIONS = (sympy.StrictGreaterThan, sympy.StrictLessThan, sympy.GreaterThan, sympy.LessThan)
PREDICATES = {">": "ogt", "<": "olt", ">=": "oge", "<=": "ole"}


@dataclass(frozen=True)
class VectorOp:
    """``admits(e)``: the node itself can be written (its operands are checked on their own);
    ``operands(e)``: the subexpressions written as vectors; ``emit(row, e, vals, mask, made)``:
    the vector value; ``epilogue_only``: admitted in epilogue bodies, not in sums."""

    admits: Callable
    operands: Callable
    emit: Callable
    epilogue_only: bool = False


def emit_chain(row, e, vals, mask, made) -> str:
    """A sum or product, left to right."""
    args = [row.emit(a, vals, mask, made) for a in e.args]
    total = args[0]
    for a in args[1:]:
        total = row.fw.op(f"{'fadd' if isinstance(e, sympy.Add) else 'fmul'} {FAST} {row.vt} {total}, {a}")
    return total


def pow_admits(e) -> bool:
    """1/x, x² to x⁴, and ±1/2, ±3/2 (batch norm's σ, 1/σ, 1/σ³)."""
    return e.exp == -1 or (e.exp.is_Integer and 1 < e.exp <= 4) or (e.exp.is_Rational and e.exp.q == 2
                                                                      and abs(e.exp.p) <= 3)


def emit_pow(row, e, vals, mask, made) -> str:
    fw = row.fw
    base = row.emit(e.base, vals, mask, made)
    if e.exp == -1:
        return fw.op(f"fdiv {FAST} {row.vt} {row.splat(fw.fconst(1.0))}, {base}")
    if e.exp.q == 2:  # integer powers of a square root
        fw.declares.add(f"declare {row.vt} @llvm.sqrt.{row.suffix}({row.vt})")
        root = fw.op(f"call {FAST} {row.vt} @llvm.sqrt.{row.suffix}({row.vt} {base})")
        total = root
        for _ in range(abs(int(e.exp.p)) // 2):
            total = fw.op(f"fmul {FAST} {row.vt} {total}, {base}")
        if e.exp < 0:
            total = fw.op(f"fdiv {FAST} {row.vt} {row.splat(fw.fconst(1.0))}, {total}")
        return total
    total = base
    for _ in range(int(e.exp) - 1):
        total = fw.op(f"fmul {FAST} {row.vt} {total}, {base}")
    return total


def piecewise_admits(e) -> bool:
    """Branches chosen by comparisons (ReLU and its derivative)."""
    return all(p.cond is sympy.true or isinstance(p.cond, RELATIONS) for p in e.args)


def piecewise_operands(e) -> list:
    return [x for p in e.args for x in [p.expr, *(() if p.cond is sympy.true else p.cond.args)]]


def emit_piecewise(row, e, vals, mask, made) -> str:
    """Selects from the last branch back, each on a lane comparison."""
    fw = row.fw
    result = row.emit(e.args[-1].expr, vals, mask, made)
    for pair in reversed(e.args[:-1]):
        a, b = (row.emit(x, vals, mask, made) for x in pair.cond.args)
        cond = fw.op(f"fcmp {PREDICATES[pair.cond.rel_op]} {row.vt} {a}, {b}")
        result = fw.op(f"select {row.mt} {cond}, {row.vt} {row.emit(pair.expr, vals, mask, made)}, "
                       f"{row.vt} {result}")
    return result


def emit_function(row, e, vals, mask, made) -> str:
    """A scalar function's vector lowering (its row of `ir/functions.py`)."""
    return function_of(e).vector(row.fw, row.vt, row.suffix, row.emit(e.args[0], vals, mask, made))


VECTOR_OPS: dict[type, VectorOp] = {
    sympy.Add: VectorOp(lambda e: True, lambda e: e.args, emit_chain),
    sympy.Mul: VectorOp(lambda e: True, lambda e: e.args, emit_chain),
    sympy.Pow: VectorOp(pow_admits, lambda e: [e.base], emit_pow),
    sympy.Piecewise: VectorOp(piecewise_admits, piecewise_operands, emit_piecewise, epilogue_only=True),
}
FUNCTION = VectorOp(lambda e: function_of(e).vector is not None, lambda e: [e.args[0]], emit_function)


def vector_op(e) -> VectorOp | None:
    """The row of ``e``'s head: the table's, or a scalar function's; None where none exists."""
    if function_of(e) is not None:
        return FUNCTION
    return VECTOR_OPS.get(type(e))


def vector_safe(e, loop_vars, piecewise: bool = False) -> bool:
    """Can a vector row hold ``e``: reads, numbers, runtime scalars (not loop variables), and
    operations whose row above admits them (``piecewise``: in an epilogue, where comparisons
    may choose branches)?"""
    if isinstance(e, sympy.Indexed) or e.is_number:
        return True
    if isinstance(e, sympy.Symbol):
        return e.name not in loop_vars
    op = vector_op(e)
    if op is None or (op.epilogue_only and not piecewise) or not op.admits(e):
        return False
    return all(vector_safe(a, loop_vars, piecewise) for a in op.operands(e))
