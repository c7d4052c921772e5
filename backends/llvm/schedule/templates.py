"""A register template per loop nest: how one residue class's loops run (docs/architecture.md, §5).

Per term nest (`loops`), a loop order and a register template, every size from the `Target`:
- ``row`` (output-stationary): the innermost loop is the output's last, unit-stride variable
  (MIN_ROW to the target's ``max_row`` long); that output row lives in vector registers across
  every reduction loop;
- ``tiled_row``: the same for a block of another output variable at once (output channels), the
  row's loads shared by the block (`blocks.output_tile`), two examples at once where a row is one
  vector (`blocks.batch_pair`), or along a packed channel axis (`lanes_row`, see `lanes`);
- ``reduction_row``: the innermost loop is a reduction variable the output does not depend on;
  vector partial sums over it live across the reductions (a filter gradient over a map row);
- ``tiled_reduction_row``: the same for each value of a small output variable at once (a kernel
  column), optionally for a block of output channels too, so loads are shared;
- ``max_row``: a max pool's running maximum and argmax per lane;
- ``map_row``: an elementwise stage, a row of vectors computed and stored at once;
- ``scalar``: plain loops, left to LLVM's vectorizers (ordered so that no large read is walked
  at a stride, and dense layers' weights are read once per batch; blocks jammed around long loops).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, tensor_of
from cnncompile.ir.loops import ClassNest, TermNest, covers_outputs

from ..target import Target
from ..vector_ops import vector_safe
from .blocks import (apart_innermost, batch_pair, dot_block, lanes_tile, mentions, output_tile, reduction_block,
                     row_tile, tiled_order)
from .choices import jam_sizes, resized
from .vectors import (map_row_vectorizable, max_row_vectorizable, reduction_vectorizable, unit_stride_reads,
                      vectorizable)

REGISTER_ROWS = ("row", "tiled_row", "map_row")  # templates that finish each output row in registers, whole


@dataclass(frozen=True)
class Template:
    kind: str  # scalar | row | tiled_row | reduction_row | tiled_reduction_row | max_row | map_row
    order: tuple  # loop variables, outermost first (a tiled row's own variable is not a loop)
    accumulate: bool  # add into the output (initialised by a nest of its own, or by other stages)
    row: str | None = None  # the vector variable (innermost)
    extent: int | None = None
    first_reduce: int = 0  # loop level where registers start to live
    tile: tuple | None = None  # a tiled reduction row's (variable, extent); a tiled row's (variable, size, extent)
    several: bool = False  # a reduction row with other reduction loops around it
    fresh: bool = False  # every output is written once, whole: no initialisation, no reload
    block: tuple | None = None  # a tiled reduction row's blocked output variable: (variable, size, extent)
    scatter: bool = False  # the row variable is not the output's last index: written lane by lane
    pair: str | None = None  # a tiled row's second block: this (batch) variable's values two at a time

    @property
    def split(self) -> tuple:
        """The threads' variable (the outermost loop) and the unit they share it in: a block's
        size where it is a block's variable. Every nest writing the same outputs without a barrier
        between (initialisation, terms) must split the same way."""
        blocked = self.block or (self.tile if self.kind == "tiled_row" else None)
        first = self.order[0] if self.order else None
        return first, (blocked[1] if blocked and blocked[0] == first else 1)


def template(nest: ClassNest, term: TermNest, prog: Program, target: Target, lanes: int,
             choice: dict | None = None) -> Template:
    """``lanes``: elements per vector register of the program's float type on ``target``. A class
    with several terms keeps its first output variable outermost and unblocked in every term's
    nest, so that all of them (and the initialisation) give each thread the same outputs.
    ``choice``: the tuner's overrides of the blocks (`choices`; None or {}: the rules)."""
    choice = choice or {}
    stage, outer, reduce_ = nest.stage, nest.outer, nest.reduce
    free = len(nest.terms) == 1 and bool(outer)
    movable = [v for v, _ in outer] if free else [v for v, _ in outer[1:]]  # may be blocked or reordered
    accumulate = stage.accumulate or nest.needs_init
    order = loop_order(outer, reduce_, lambda v: strided_reads(term.term, v), 2 * target.lanes)
    if nest.empty:  # no term reaches this class: its initialisation alone writes it (zeros), never skipped
        return Template("scalar", tuple(order), accumulate)
    if map_row_vectorizable(nest, term, prog, target.max_row):
        return Template("map_row", tuple(order), stage.accumulate, order[-1], dict(outer)[order[-1]],
                        len(order) - 1, fresh=not stage.accumulate)
    if not accumulate:
        return Template("scalar", tuple(order), accumulate)
    if single_term_per_output(nest, term):  # (max pooling's gradient: one gather per output)
        return Template("scalar", tuple(order), False, fresh=True)
    if stage.lanes:
        lanes_template = lanes_row(nest, term, prog, lanes, accumulate, target, choice)
        if lanes_template is not None:
            return lanes_template
    row_order = [o for o, _ in outer[:-1]] + [r for r, _ in reduce_] + [outer[-1][0]] if outer else order
    if max_row_vectorizable(nest, term, row_order, lanes):
        return Template("max_row", tuple(row_order), accumulate, row_order[-1], dict(nest.grid)[row_order[-1]],
                        len(outer) - 1, fresh=True)
    if vectorizable(stage, term.term, nest.out_index, outer, reduce_, row_order, prog, target.max_row):
        fresh = not stage.accumulate and covers_outputs(nest, term) and not nest.empty  # (empty: zeros to write)
        row, extent = row_order[-1], dict(nest.grid)[row_order[-1]]
        tile = output_tile(term, [(v, e) for v, e in outer if v in movable], row, extent, lanes, target.accumulators)
        if tile is not None:
            initialised = nest.needs_init and not fresh  # (by a nest of its own, split by the block's unit)
            pair = batch_pair(term, outer, row, extent, tile, lanes, target.accumulators) \
                if free and not initialised and choice.get("pair", True) else None
            if pair is not None:
                tile = (tile[0], tile[1] // 2, tile[2])
            else:
                tile = resized(tile, choice.get("tile"), -(-extent // lanes), target.accumulators)
            return Template("tiled_row", tuple(tiled_order(outer, reduce_, row, tile[0], free)), accumulate, row,
                            extent, len(outer) - 1, tile=tile, fresh=fresh, pair=pair)
        return Template("row", tuple(row_order), accumulate, row, extent, len(outer) - 1, fresh=fresh)
    if reduction_vectorizable(stage, term.term, nest.out_index, outer, reduce_, order, prog, target.max_row):
        r, extent = order[-1], dict(nest.grid)[order[-1]]
        tile = row_tile(term.term, outer, r, term.constraints, target.accumulators)
        if tile is not None:
            block = reduction_block(term, [(v, e) for v, e in outer if v in movable], r, extent, tile, target)
            return Template("tiled_reduction_row", tuple(o for o in order if o != tile[0]), accumulate, r, extent,
                            len(outer) - 1, tile=tile, block=block)
        return Template("reduction_row", tuple(order), accumulate, r, extent, len(outer),
                        several=len(reduce_) > 1)
    order = batch_inward(order, nest, term, prog) if free else order
    jam = dot_block(nest, term, order, jam_sizes(target, choice)) if free else None
    if jam is not None and jam[0] in dict(outer):  # outermost: the threads share it in whole blocks
        order = [jam[0]] + [o for o in order if o != jam[0]]  # (a reduction's block stays where it was)
    return Template("scalar", tuple(order), accumulate, block=jam)


def lanes_row(nest: ClassNest, term: TermNest, prog: Program, lanes: int, accumulate: bool,
              target: Target, choice: dict) -> Template | None:
    """A tiled row along the stage's lane variable ``u`` (see `lanes`: output channels whose
    reads were packed with ``u`` last), which is not the output's last index: every read is
    unit-stride in ``u`` or free of it, ``u``'s extent is whole vectors, and the row is written
    once, lane by lane (``scatter``), after the whole reduction. The tile beside it (an output
    variable whose reads are broadcast: a kernel column, an output position) takes at most the
    target's ``wide_accumulators`` registers (a lanes row's loads: one vector per chunk and one
    broadcast)."""
    stage, outer, reduce_ = nest.stage, nest.outer, nest.reduce
    u = next((g for g, _ in outer if nest.subst.get(stage.lanes, Affine.var(stage.lanes)) == Affine.var(g)), None)
    if u is None or not reduce_ or stage.accumulate or nest.empty or not covers_outputs(nest, term):
        return None
    extent = dict(outer)[u]
    at = [k for k, e in enumerate(nest.out_index) if e.coeff(u)]
    if not isinstance(extent, int) or extent % lanes or len(at) != 1 or at[0] == len(nest.out_index) - 1 \
            or nest.out_index[at[0]] != Affine.var(u) or any(c.expr.coeff(u) for c in term.constraints):
        return None
    if not unit_stride_reads(term.term, u, prog) or not vector_safe(term.term, {n for n, _ in nest.grid}):
        return None
    tile = lanes_tile(term, outer, u, extent // lanes, target.wide_accumulators)
    tile = resized(tile, choice.get("tile"), extent // lanes, target.wide_accumulators)
    if tile is None:
        return None
    order = tiled_order(outer, reduce_, u, tile[0], True)
    return Template("tiled_row", tuple(apart_innermost(order, term, tile[0], len(outer))), accumulate, u, extent,
                    len(outer) - 1, tile=tile, fresh=True, scatter=True)


def batch_inward(order: list, nest: ClassNest, term: TermNest, prog: Program) -> list:
    """Plain loops of a sum whose largest read does not depend on the batch (a dense layer's
    weights): the batch loop goes innermost among the outputs, so that each weight row is read
    once from memory for the whole batch instead of once per example."""
    outer = [v for v, _ in nest.outer]
    batch = [v for v, e in nest.outer if not isinstance(e, int)]
    if not batch or not nest.reduce or set(order[:len(outer)]) != set(outer) or len(outer) < 2:
        return order
    reads = list(term.term.atoms(sympy.Indexed))
    size = {r: prod(d for d in prog.tensors[tensor_of(r)].shape if isinstance(d, int)) for r in reads}
    largest = max(reads, key=lambda r: size[r], default=None)
    if largest is None or mentions(largest, batch[0]):
        return order
    head = [v for v in order[:len(outer)] if v != batch[0]]
    return head + [batch[0]] + order[len(outer):]


def single_term_per_output(nest: ClassNest, term: TermNest) -> bool:
    """Does every output get exactly one term: a sum whose reduction variables each take one
    value, unconstrained, in a nest that visits every output? Then plain loops can store it
    without an initialisation pass or a reload."""
    reduce_ = {v for v, _ in nest.reduce}
    return (nest.stage.combine == "sum" and not nest.stage.accumulate and all(e == 1 for _, e in nest.reduce)
            and covers_outputs(nest, term) and not any(c.expr.coeff(r) for c in term.constraints for r in reduce_))


def strided_reads(term, v: str) -> int:
    """How many reads ``v`` moves through memory at a stride (it indexes a dimension before the last)."""
    return sum(1 for r in term.atoms(sympy.Indexed) if any(Affine.from_sympy(i).coeff(v) for i in r.indices[:-1]))


def loop_order(outer, reduce_, strided, long_row: int) -> list[str]:
    """Outer variables, then reductions; the last outer one goes innermost when it is the longer,
    unless it would stride through memory where the last reduction does not (a dense layer's
    weights: ``W[n, k]`` with ``n`` innermost reads a column). Against a sum over the batch, a
    row goes innermost from ``long_row`` (two float32 vectors) on."""
    names_out, names_red = [v for v, _ in outer], [v for v, _ in reduce_]
    if len(outer) >= 2 and reduce_ and strided(names_out[-1]) > strided(names_red[-1]):
        return names_out + names_red
    if len(outer) >= 2 and reduce_:
        last_out, last_red = outer[-1][1], reduce_[-1][1]
        batch_red = not isinstance(last_red, int)  # a sum over the batch (weight gradients): rows win
        if isinstance(last_out, int) and (last_out >= long_row if batch_red else last_out >= last_red):
            return names_out[:-1] + names_red + names_out[-1:]
    return names_out + names_red
