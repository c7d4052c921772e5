"""Loop nests: what a stage's loops are, before any decision about how they run.

A stage becomes one nest per residue class (see `residue`): a box grid of outer and reduction
variables, the output index over that grid, and per term of the body the constraints under
which it contributes (the class's own, plus every read's range: out of range, the term is
skipped). `fm_bounds` turns constraints into loop bounds for a given loop order, Fourier–Motzkin
style, so no test runs inside the loops and no load can leave its buffer. Loop order, vectors,
threads and fusion are the schedule's business (`schedule`).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .affine import Affine, Box
from .expr import BATCH_LAST, Program, Stage, extent_minus_one, fm_bounds, tensor_of  # noqa: F401 (re-exported)
from .residue import residue_classes, substitute


@dataclass(frozen=True)
class TermNest:
    term: sympy.Expr  # over the grid variables
    constraints: tuple  # Boxes over the grid that bound this term's loops


@dataclass(frozen=True)
class ClassNest:
    """One residue class of a stage as a loop nest."""

    stage: Stage
    grid: tuple  # (name, extent): outer variables first, then reduction ones
    n_outer: int
    subst: dict  # stage variable → affine map over the grid
    out_index: tuple  # the output index over the grid
    terms: tuple  # TermNest per term of the body (several when their read ranges differ)
    needs_init: bool  # the output is first set to the reduction's identity by a nest of its own
    identity: float
    empty: bool  # no term at all: only the initialisation runs

    @property
    def outer(self) -> list:
        return list(self.grid[: self.n_outer])

    @property
    def reduce(self) -> list:
        return list(self.grid[self.n_outer:])


def shapes_of(prog: Program, tensors) -> dict[str, list]:
    """Tensor shapes with the batch extent written ``"B"`` (it is a runtime value)."""
    return {t: [d if isinstance(d, int) else "B" for d in prog.tensors[t].shape] for t in tensors}


def stage_tensors(stage: Stage) -> list[str]:
    return sorted({tensor_of(r) for r in stage.body.atoms(sympy.Indexed)} | {stage.out} | set(stage.argmax)
                  | set(stage.packed))


def lower(stage: Stage, prog: Program) -> list[ClassNest]:
    """The stage's residue classes as loop nests."""
    shapes = shapes_of(prog, stage_tensors(stage))
    nests = []
    for geo in residue_classes(stage):
        grid = tuple(geo.grid)
        outer = grid[: geo.n_outer]
        body = substitute(stage.body, geo.subst) if not geo.empty else sympy.S.Zero
        split_terms = stage.combine != "max" and body.is_Add and bool(read_ranges(body, grid, shapes))
        terms = sympy.Add.make_args(body) if split_terms else (body,)
        needs_init = not stage.accumulate and (bool(grid[geo.n_outer:]) or len(terms) > 1 or geo.empty
                                                or any(set(c.expr.vars) <= {v for v, _ in outer}
                                                       for c in geo.constraints))
        nests.append(ClassNest(
            stage=stage, grid=grid, n_outer=geo.n_outer, subst=geo.subst,
            out_index=tuple(e.subs(geo.subst) for e in stage.out_index),
            terms=tuple(TermNest(t, tuple(c for c in list(geo.constraints) + read_ranges(t, grid, shapes)
                                          if not implied(c, grid))) for t in terms),
            needs_init=needs_init, identity={"sum": 0.0, "max": float("-inf")}.get(stage.combine) or 0.0,
            empty=geo.empty))
    return nests


def read_ranges(term, grid, shapes) -> list[Box]:
    """Every read's index must stay inside its tensor: out of range, the term is skipped."""
    extents = dict(grid)
    out = []
    for r in term.atoms(sympy.Indexed):
        for e, size in zip((Affine.from_sympy(i) for i in r.indices), shapes[tensor_of(r)]):
            if size == "B":
                if len(e.coeffs) == 1 and e.const == 0 and e.coeffs[0][1] == 1 and \
                        not isinstance(extents[e.coeffs[0][0]], int):
                    continue
                raise NotImplementedError(f"internal: batch index {e} is not the batch variable")
            if all(isinstance(extents.get(v), int) for v in e.vars):
                lo, hi = e.interval(extents)
                if lo >= 0 and hi <= size - 1:
                    continue
            out.append(Box(e, 0, size - 1))
    return out


def implied(c: Box, grid) -> bool:
    """Does the box alone guarantee the constraint (so it need not bound any loop)?"""
    extents = dict(grid)
    if not c.expr.is_integral() or not all(isinstance(extents.get(v), int) for v in c.expr.vars):
        return False
    lo, hi = c.expr.interval(extents)
    return c.lo <= lo and hi <= c.hi


def covers_outputs(nest: ClassNest, term: TermNest) -> bool:
    """Does this term's nest visit every output point of the class (no constraint restricts the
    outer variables alone)? Then a register schedule may write its outputs without a prior
    initialisation."""
    outer = {v for v, _ in nest.outer}
    return len(nest.terms) == 1 and not any(set(c.expr.vars) <= outer for c in term.constraints)


