"""Residue classes: how any backend turns a gather stage's dependent bounds into boxes.

A gather stage from a strided map has bounds like ``x ∈ [⌈(u+p−K+1)/s⌉, ⌊(u+p)/s⌋]``. Split
each output variable into classes ``u = M·q + ρ``; within a class each such bound becomes
``x = α·q + base + t`` with ``t`` in a fixed box ``[0, n)``, and lattice guards ``g | (u+p)``
become true or false for the whole class. What a class's box does not enforce is returned
as constraints over the grid, for the backend to mask (NumPy) or to bound loops with (LLVM).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from math import ceil, floor, gcd, lcm

import sympy

from cnncompile.ir.affine import Affine, Box
from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import Stage, var


@dataclass
class ClassGeometry:
    grid: tuple  # (name, extent): outer grid variables first, then one per reduction variable
    n_outer: int
    subst: dict  # each stage variable → an affine map over the grid
    constraints: tuple  # the stage's constraints the box does not enforce, over the grid
    empty: bool  # no term at all in this class


def substitute(expr, subst: dict):
    return expr.xreplace({var(v): e.to_sympy() for v, e in subst.items()})


def residue_classes(stage: Stage, resolve=lambda e: e) -> list[ClassGeometry]:
    outer = [(v, resolve(e)) for v, e in stage.domain]
    reduce_ = [(v, None if e is None else resolve(e)) for v, e in stage.reduce]
    names = [v for v, _ in reduce_]
    primary = {v: choose_primary(stage, v, ext, names) for v, ext in reduce_}
    moduli = residue_moduli(stage, outer, primary)
    split = [v for v, _ in outer if moduli[v] > 1]
    return [class_geometry(stage, dict(zip(split, rho)), outer, reduce_, primary, moduli)
            for rho in itertools.product(*(range(moduli[v]) for v in split))]


def choose_primary(stage: Stage, v: str, ext, reduce_names) -> Box | None:
    """The tightest constraint on ``v`` that mentions no other reduction variable (None: its own box)."""
    best, width = None, Fraction(ext) if isinstance(ext, int) else None
    for c in stage.constraints:
        a = c.expr.coeff(v)
        if a == 0 or any(c.expr.coeff(w) != 0 for w in reduce_names if w != v):
            continue
        w = Fraction(c.hi - c.lo + 1) / abs(a)
        if width is None or w < width:
            best, width = c, w
    if best is None and ext is None:
        raise CompileError(f"internal: reduction variable {v} of stage {stage.out} has no bound")
    return best


def residue_moduli(stage: Stage, outer, primary) -> dict[str, int]:
    """``M_u`` per output variable so that every primary bound and guard is affine in ``q``."""
    moduli = {v: 1 for v, _ in outer}
    for r, box in primary.items():
        if box is None:
            continue
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


def class_geometry(stage, rho, outer, reduce_, primary, moduli) -> ClassGeometry:
    grid, subst, empty = [], {}, False
    for u, ext in outer:
        m = moduli[u]
        if m == 1:
            grid.append((u, ext))
            continue
        n = ceil((ext - rho[u]) / m) if ext > rho[u] else 0
        grid.append((f"{u}_q", n))
        empty |= n == 0
        subst[u] = Affine.make({f"{u}_q": m}, rho[u])
    for g in stage.guards:
        expr = g.expr.scale(g.expr.denominator_lcm()).subs(subst)
        if any(c % g.modulus for _, c in expr.coeffs):
            raise CompileError(f"internal: guard {g} of stage {stage.out} is not constant per class")
        empty |= expr.const % g.modulus != 0
    n_outer = len(grid)
    for r, ext in reduce_:
        box, t = primary[r], f"{r}_t"
        if box is None:
            grid.append((t, ext))
            subst[r] = Affine.var(t)
            continue
        a = box.expr.coeff(r)
        rest = (box.expr - Affine.make({r: a})).subs(subst)
        lo, hi = (box.lo - rest.const) / a, (box.hi - rest.const) / a
        if a < 0:
            lo, hi = hi, lo
        base, top = ceil(lo), floor(hi)
        step = rest.scale(Fraction(-1) / a) - rest.scale(Fraction(-1) / a).const  # the q part
        if not step.is_integral() or any(v not in dict(grid) for v in step.vars):
            raise CompileError(f"internal: bound of {r} in stage {stage.out} is not affine per class")
        grid.append((t, max(0, top - base + 1)))
        empty |= top < base
        subst[r] = step + Affine.make({t: 1}, base)
    rest = [c for c in stage.constraints if c not in primary.values()]
    rest += [Box(Affine.var(r), 0, e - 1) for r, e in reduce_ if primary[r] is not None and e is not None]
    constraints = () if empty else tuple(Box(c.expr.subs(subst), c.lo, c.hi) for c in rest)
    return ClassGeometry(tuple(grid), n_outer, subst, constraints, empty)
