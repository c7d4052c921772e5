"""Plan one stage for NumPy: per residue class (see `backends.residue`), views and masks.

Within a class the stage is a dense sum over a box grid that NumPy does in a few whole-array
operations (an einsum when the body is a product). Constraints that the box does not enforce
become masks, unless a read's own range guard (zero padding) already enforces them.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from cnncompile.ir.affine import Affine, Box
from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import BATCH, Stage, tensor_of
from cnncompile.ir.residue import ClassGeometry, residue_classes, substitute


@dataclass
class ReadView:
    """Where one read lands: the tensor, and its index as affine maps over the grid."""

    tensor: str
    index: tuple[Affine, ...]
    fill: float  # value outside the tensor (the term is skipped: 0 for sums, −∞ for max)


@dataclass
class ClassPlan:
    """One residue class of a stage: a dense grid and how every read and the output map onto it."""

    grid: tuple[tuple[str, int], ...]  # outer grid variables first, then reduction ones
    n_outer: int
    out_index: tuple[Affine, ...]
    body: sympy.Expr  # over grid variables
    reads: dict  # sympy.Indexed → ReadView
    masks: tuple[Box, ...]
    argmax_of: tuple[Affine, ...]  # each reduction variable as an affine map over the grid
    empty: bool  # no term at all: the output is zero (or untouched when accumulating)


def resolve(ext, sizes):
    if ext is BATCH:
        return sizes[BATCH]
    return int(ext.subs(sizes)) if isinstance(ext, sympy.Basic) else ext


def plan_stage(stage: Stage, sizes: dict, shapes: dict) -> list[ClassPlan]:
    return [plan_class(stage, geo, shapes) for geo in residue_classes(stage, lambda e: resolve(e, sizes))]


def plan_class(stage: Stage, geo: ClassGeometry, shapes) -> ClassPlan:
    grid, n_outer, subst = geo.grid, geo.n_outer, geo.subst
    out_index = tuple(e.subs(subst) for e in stage.out_index)
    if geo.empty:
        return ClassPlan(tuple(grid), n_outer, out_index, sympy.S.Zero, {}, (), (), True)
    extents = dict(grid)
    body = substitute(stage.body, subst)
    reads = {}
    for r in body.atoms(sympy.Indexed):
        index = tuple(Affine.from_sympy(i) for i in r.indices)
        if not all(e.is_integral() for e in index):
            raise CompileError(f"internal: read {r} of stage {stage.out} is fractional in a class")
        reads[r] = ReadView(tensor_of(r), index, fill_value(stage, body, r))
    masks = []
    for c in geo.constraints:
        lo, hi = c.expr.interval(extents)
        if lo >= c.lo and hi <= c.hi:
            continue
        if any(v.fill is not None and guarded(v, c.expr, c, shapes) for v in reads.values()):
            continue
        masks.append(c)
    for v in reads.values():
        if v.fill is None:  # a read whose guard cannot be a fill value: mask its range explicitly
            for e, size in zip(v.index, shapes[v.tensor]):
                lo, hi = e.interval(extents)
                if lo < 0 or hi >= size:
                    masks.append(Box(e, 0, size - 1))
    argmax_of = tuple(subst[r] for r, _ in stage.reduce)
    return ClassPlan(tuple(grid), n_outer, out_index, body, reads, tuple(masks), argmax_of, False)


def guarded(view: ReadView, expr: Affine, box: Box, shapes) -> bool:
    """Does this read's range guard (out of range ⇒ term skipped) already enforce the box?"""
    return box.lo == 0 and any(e == expr and size == box.hi + 1
                               for e, size in zip(view.index, shapes[view.tensor]))


def fill_value(stage: Stage, body, r):
    """The value that makes an out-of-range read skip its term, or None if no value does."""
    if stage.combine == "max":
        return float("-inf") if body == r else None
    terms = sympy.Add.make_args(sympy.expand(body)) if body.is_Add else (body,)
    if all(r in sympy.Mul.make_args(t) for t in terms):
        return 0.0
    return None
