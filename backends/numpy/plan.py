"""Plan one stage for NumPy: residue classes, grids, views and masks (the schedule).

A gather stage from a strided map has bounds like ``x ∈ [⌈(u+p−K+1)/s⌉, ⌊(u+p)/s⌋]``. Split
each output variable into residue classes ``u = M·q + ρ``; within a class every such bound is
``x = α·q + t`` with ``t`` in a fixed box, so the stage becomes a dense sum over a box grid
that NumPy does in a few whole-array operations (an einsum when the body is a product).
Constraints that the box does not enforce become masks, unless a read's own range guard
(zero padding) already enforces them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from math import ceil, floor, gcd, lcm

import sympy

from cnncompile.ir.affine import Affine, Box
from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import Stage, tensor_of, var


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
    return int(ext.subs(sizes)) if isinstance(ext, sympy.Basic) else ext


def plan_stage(stage: Stage, sizes: dict, shapes: dict) -> list[ClassPlan]:
    outer = [(v, resolve(e, sizes)) for v, e in stage.domain]
    reduce_ = [(v, None if e is None else resolve(e, sizes)) for v, e in stage.reduce]
    rnames = [v for v, _ in reduce_]
    primary = {v: choose_primary(stage, v, ext, rnames) for v, ext in reduce_}
    moduli = residue_moduli(stage, outer, primary)
    classes = []
    split = [v for v, _ in outer if moduli[v] > 1]
    for rho in itertools.product(*(range(moduli[v]) for v in split)):
        classes.append(plan_class(stage, dict(zip(split, rho)), outer, reduce_, primary, moduli, shapes))
    return classes


def choose_primary(stage: Stage, v: str, ext, reduce_names) -> Box:
    """The tightest constraint on ``v`` that mentions no other reduction variable."""
    best = Box(Affine.var(v), 0, ext - 1) if ext is not None else None
    for c in stage.constraints:
        a = c.expr.coeff(v)
        if a == 0 or any(c.expr.coeff(w) != 0 for w in reduce_names if w != v):
            continue
        if best is None or Fraction(c.hi - c.lo + 1) / abs(a) < Fraction(best.hi - best.lo + 1) / abs(best.expr.coeff(v)):
            best = c
    if best is None:
        raise CompileError(f"internal: reduction variable {v} of stage {stage.out} has no bound")
    return best


def residue_moduli(stage: Stage, outer, primary) -> dict[str, int]:
    """``M_u`` per output variable so that every primary bound and guard is affine in ``q``."""
    moduli = {v: 1 for v, _ in outer}
    for r, box in primary.items():
        a = box.expr.coeff(r)
        for u in moduli:
            moduli[u] = lcm(moduli[u], (box.expr.coeff(u) / a).denominator)
    for g in stage.guards:
        expr = g.expr.scale(g.expr.denominator_lcm())
        for u in moduli:
            k = int(expr.coeff(u))
            if k:
                moduli[u] = lcm(moduli[u], g.modulus // gcd(k, g.modulus))
    return moduli


def plan_class(stage, rho, outer, reduce_, primary, moduli, shapes) -> ClassPlan:
    grid, subst, empty = [], {}, False
    for u, ext in outer:
        m = moduli[u]
        if m == 1:
            grid.append((u, ext))
            continue
        q = f"{u}_q"
        n = ceil((ext - rho[u]) / m) if ext > rho[u] else 0
        grid.append((q, n))
        empty |= n == 0
        subst[u] = Affine.make({q: m}, rho[u])
    for g in stage.guards:
        expr = g.expr.scale(g.expr.denominator_lcm()).subs(subst)
        if any(c % g.modulus for _, c in expr.coeffs):
            raise CompileError(f"internal: guard {g} of stage {stage.out} is not constant per class")
        empty |= expr.const % g.modulus != 0
    n_outer = len(grid)
    for r, _ in reduce_:
        box = primary[r]
        a = box.expr.coeff(r)
        rest = (box.expr - Affine.make({r: a})).subs(subst)
        lo, hi = (box.lo - rest.const) / a, (box.hi - rest.const) / a
        if a < 0:
            lo, hi = hi, lo
        base, top = ceil(lo), floor(hi)
        step = rest.scale(Fraction(-1) / a) - rest.scale(Fraction(-1) / a).const  # the q part
        if not step.is_integral() or any(v not in dict(grid) for v in step.vars):
            raise CompileError(f"internal: bound of {r} in stage {stage.out} is not affine per class")
        t = f"{r}_t"
        grid.append((t, max(0, top - base + 1)))
        empty |= top < base
        subst[r] = step + Affine.make({t: 1}, base)
    out_index = tuple(e.subs(subst) for e in stage.out_index)
    if empty:
        return ClassPlan(tuple(grid), n_outer, out_index, sympy.S.Zero, {}, (), (), True)
    extents = dict(grid)
    body = stage.body.xreplace({var(v): e.to_sympy() for v, e in subst.items()})
    reads = {}
    for r in body.atoms(sympy.Indexed):
        index = tuple(Affine.from_sympy(i) for i in r.indices)
        if not all(e.is_integral() for e in index):
            raise CompileError(f"internal: read {r} of stage {stage.out} is fractional in a class")
        reads[r] = ReadView(tensor_of(r), index, fill_value(stage, body, r))
    masks = []
    constraints = list(stage.constraints) + [Box(Affine.var(r), 0, e - 1) for r, e in reduce_ if e is not None]
    for c in constraints:
        if c in primary.values():
            continue
        expr = c.expr.subs(subst)
        lo, hi = expr.interval(extents)
        if lo >= c.lo and hi <= c.hi:
            continue
        if any(v.fill is not None and guarded(v, expr, c, shapes) for v in reads.values()):
            continue
        masks.append(Box(expr, c.lo, c.hi))
    for v in reads.values():
        if v.fill is None:  # a read whose guard cannot be a fill value: mask its range explicitly
            for e, size in zip(v.index, shapes[v.tensor]):
                lo, hi = e.interval(extents)
                if lo < 0 or hi >= size:
                    masks.append(Box(e, 0, size - 1))
    argmax_of = tuple(subst[r] for r, _ in reduce_)
    return ClassPlan(tuple(grid), n_outer, out_index, body, reads, tuple(masks), argmax_of, empty)


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
