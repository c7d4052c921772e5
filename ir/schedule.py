"""The schedule: how each stage's loops run, and which stages run together.

Templates. Per term nest (`loops`), a loop order and a register template:
- ``row`` (output-stationary): the innermost loop is the output's last, unit-stride variable
  (4 to MAX_ROW long); that output row lives in vector registers across every reduction loop;
- ``tiled_row``: the same for a block of another output variable at once (output channels), the
  row's loads shared by the block;
- ``reduction_row``: the innermost loop is a reduction variable the output does not depend on;
  vector partial sums over it live across the reductions (a filter gradient over a map row);
- ``tiled_reduction_row``: the same for each value of a small output variable at once (a kernel
  column), optionally for a block of output channels too, so loads are shared;
- ``map_row``: an elementwise stage, a row of vectors computed and stored at once;
- ``scalar``: plain loops, left to LLVM's vectorizers (ordered so that no large read is walked
  at a stride, and dense layers' weights are read once per batch).

Kernels. Per phase, stages are grouped into kernels: a main stage that finishes each output
value at one place in its loops (in registers, for the vector templates), and the elementwise
stages that only need that value (bias, ReLU, batch norm's output, a ReLU′ mask, the optimizer's
update of the parameter whose gradient it completes) computed in its epilogue, right where the
value is, instead of in passes of their own behind a barrier. An epilogue stage may move up to its
producer only if no stage in between touches what it reads or writes. Kernels are separated by
the threads' barrier.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import sympy

from .affine import Affine
from .expr import Program, Stage, tensor_of, var
from .functions import function_of
from .loops import ClassNest, TermNest, covers_outputs, lower, read_ranges, shapes_of
from .residue import substitute

MAX_ROW = 64  # longest output row held in registers (8 ymm accumulators for float)
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


def template(nest: ClassNest, term: TermNest, prog: Program, lanes: int = 8) -> Template:
    """``lanes``: floats per vector register (8 for float32, 4 for float64 on AVX2). A class with
    several terms keeps its first output variable outermost and unblocked in every term's nest,
    so that all of them (and the initialisation) give each thread the same outputs."""
    stage, outer, reduce_ = nest.stage, nest.outer, nest.reduce
    free = len(nest.terms) == 1 and bool(outer)
    movable = [v for v, _ in outer] if free else [v for v, _ in outer[1:]]  # may be blocked or reordered
    accumulate = stage.accumulate or nest.needs_init
    order = loop_order(outer, reduce_, lambda v: strided_reads(term.term, v))
    if nest.empty:  # no term reaches this class: its initialisation alone writes it (zeros), never skipped
        return Template("scalar", tuple(order), accumulate)
    if map_row_vectorizable(nest, term, prog):
        return Template("map_row", tuple(order), stage.accumulate, order[-1], dict(outer)[order[-1]],
                        len(order) - 1, fresh=not stage.accumulate)
    if not accumulate:
        return Template("scalar", tuple(order), accumulate)
    if single_term_per_output(nest, term):  # (max pooling's gradient: one gather per output)
        return Template("scalar", tuple(order), False, fresh=True)
    if stage.lanes:
        lanes_template = lanes_row(nest, term, prog, lanes, accumulate)
        if lanes_template is not None:
            return lanes_template
    row_order = [o for o, _ in outer[:-1]] + [r for r, _ in reduce_] + [outer[-1][0]] if outer else order
    if max_row_vectorizable(nest, term, row_order, lanes):
        return Template("max_row", tuple(row_order), accumulate, row_order[-1], dict(nest.grid)[row_order[-1]],
                        len(outer) - 1, fresh=True)
    if vectorizable(stage, term.term, nest.out_index, outer, reduce_, row_order, prog):
        fresh = not stage.accumulate and covers_outputs(nest, term) and not nest.empty  # (empty: zeros to write)
        row, extent = row_order[-1], dict(nest.grid)[row_order[-1]]
        tile = output_tile(term, [(v, e) for v, e in outer if v in movable], row, extent, lanes)
        if tile is not None:
            initialised = nest.needs_init and not fresh  # (by a nest of its own, split by the block's unit)
            pair = batch_pair(term, outer, row, extent, tile, lanes) if free and not initialised else None
            if pair is not None:
                tile = (tile[0], tile[1] // 2, tile[2])
            return Template("tiled_row", tuple(tiled_order(outer, reduce_, row, tile[0], free)), accumulate, row,
                            extent, len(outer) - 1, tile=tile, fresh=fresh, pair=pair)
        return Template("row", tuple(row_order), accumulate, row, extent, len(outer) - 1, fresh=fresh)
    if reduction_vectorizable(stage, term.term, nest.out_index, outer, reduce_, order, prog):
        r, extent = order[-1], dict(nest.grid)[order[-1]]
        tile = row_tile(stage, term.term, outer, reduce_, r, term.constraints, prog)
        if tile is not None:
            block = reduction_block(term, [(v, e) for v, e in outer if v in movable], r, extent, tile)
            return Template("tiled_reduction_row", tuple(o for o in order if o != tile[0]), accumulate, r, extent,
                            len(outer) - 1, tile=tile, block=block)
        return Template("reduction_row", tuple(order), accumulate, r, extent, len(outer),
                        several=len(reduce_) > 1)
    order = batch_inward(order, nest, term, prog) if free else order
    jam = dot_block(nest, term, order) if free else None
    if jam is not None and jam[0] in dict(outer):  # outermost: the threads share it in whole blocks
        order = [jam[0]] + [o for o in order if o != jam[0]]  # (a reduction's block stays where it was)
    return Template("scalar", tuple(order), accumulate, block=jam)


def lanes_row(nest: ClassNest, term: TermNest, prog: Program, lanes: int, accumulate: bool) -> Template | None:
    """A tiled row along the stage's lane variable ``u`` (see `layout`: output channels whose
    reads were packed with ``u`` last), which is not the output's last index: every read is
    unit-stride in ``u`` or free of it, ``u``'s extent is whole vectors, and the row is written
    once, lane by lane (``scatter``), after the whole reduction. The tile beside it (an output
    variable whose reads are broadcast: a kernel column, an output position) takes at most
    MAX_LANE_ACCUMULATORS registers."""
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
    tile = lanes_tile(term, outer, u, extent // lanes)
    if tile is None:
        return None
    order = tiled_order(outer, reduce_, u, tile[0], True)
    return Template("tiled_row", tuple(apart_innermost(order, term, tile[0], len(outer))), accumulate, u, extent,
                    len(outer) - 1, tile=tile, fresh=True, scatter=True)


def apart_innermost(order: list, term: TermNest, t: str, n_outer: int) -> list:
    """The reductions reordered so that the innermost one shares no index with the tile's
    variable ``t``: inside it, the tile's broadcasts then never repeat an address, which LLVM,
    unrolling the loop fully, would otherwise keep in registers across iterations (and spill
    the accumulators: LeNet-5's second convolution ran at 28 % of a core, not 70 %)."""
    reduce_ = order[n_outer - 1:-1]
    indices = [Affine.from_sympy(i) for r in term.term.atoms(sympy.Indexed) for i in r.indices]
    apart = [r for r in reduce_ if not any(e.coeff(r) and e.coeff(t) for e in indices)]
    if not apart or apart[-1] == reduce_[-1]:
        return order
    last = apart[-1]
    return order[:n_outer - 1] + [r for r in reduce_ if r != last] + [last] + order[-1:]


MAX_LANE_ACCUMULATORS = 12  # (a lanes row's loads: one vector per chunk and one broadcast)


def lanes_tile(term: TermNest, outer, u: str, chunks: int):
    """The output variable to block beside a lanes row: its reads are broadcast (free of ``u``),
    the reads along ``u`` are free of it, and no constraint mentions it. Preferred: a block that
    leaves the threads an even share (the outermost remaining variable's extent), then the
    larger block, then the later variable (neighbouring broadcasts). Returns (t, size, extent)."""
    reads = list(term.term.atoms(sympy.Indexed))
    along = {r for r in reads if mentions(r, u)}
    ranked = []
    for k, (t, ext) in enumerate(outer):
        if t == u or not isinstance(ext, int) or any(c.expr.coeff(t) for c in term.constraints):
            continue
        across = {r for r in reads if mentions(r, t)}
        if not across or across & along:
            continue
        size = max((d for d in range(2, MAX_LANE_ACCUMULATORS + 1) if ext % d == 0
                    and d * chunks <= MAX_LANE_ACCUMULATORS), default=None)
        if size is None:
            continue
        rest = [e for v, e in outer if v not in (u, t)]
        first = max(rest, key=lambda e: 10 ** 9 if not isinstance(e, int) else e, default=None)
        even = first is None or not isinstance(first, int) or first % 2 == 0
        ranked.append(((even, size, k), (t, size, ext)))
    return max(ranked)[1] if ranked else None


def dot_block(nest: ClassNest, term: TermNest, order) -> tuple | None:
    """Plain loops ending in a long loop (a dense layer's dot product, out[b, n] += X[b, k]·W[n, k],
    or its weight gradient's row, dW[n, k] += dY[b, n]·X[b, k]): several values of an output
    variable ``n`` computed together in the innermost loop (unroll and jam), so each load of the
    read free of ``n`` serves the whole block (once from L2 per block, not per ``n``); each
    output's own sum keeps its order. Returns (n, block size, extent) or None."""
    stage = nest.stage
    if stage.combine != "sum" or stage.argmax or not order:
        return None
    r = order[-1]
    extent = dict(nest.grid).get(r)
    if not isinstance(extent, int) or extent < 32:
        return None
    reads = list(term.term.atoms(sympy.Indexed))
    for u, size in nest.outer:
        if u == r or not isinstance(size, int) or any(c.expr.coeff(u) for c in term.constraints):
            continue
        shared = [x for x in reads if not mentions(x, u) and mentions(x, r)]
        if shared and any(e.coeff(u) for e in nest.out_index) and jam_size(size):
            return u, jam_size(size), size
    if r in dict(nest.outer):  # a row of outputs (a dense input gradient, out[b, k] += W[n, k]·dY[b, n]):
        for u, size in nest.reduce:  # a block of the sum around it keeps each output in a register
            if isinstance(size, int) and not any(c.expr.coeff(u) for c in term.constraints) and jam_size(size):
                return u, jam_size(size), size
    return None


def jam_size(extent: int) -> int | None:
    """The largest of 8, 4, 2 dividing ``extent`` (an unroll-and-jam block), or None."""
    return next((d for d in (8, 4, 2) if extent % d == 0), None)


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


def loop_order(outer, reduce_, strided=lambda v: 0) -> list[str]:
    """Outer variables, then reductions; the last outer one goes innermost when it is the longer,
    unless it would stride through memory where the last reduction does not (a dense layer's
    weights: ``W[n, k]`` with ``n`` innermost reads a column)."""
    names_out, names_red = [v for v, _ in outer], [v for v, _ in reduce_]
    if len(outer) >= 2 and reduce_ and strided(names_out[-1]) > strided(names_red[-1]):
        return names_out + names_red
    if len(outer) >= 2 and reduce_:
        last_out, last_red = outer[-1][1], reduce_[-1][1]
        batch_red = not isinstance(last_red, int)  # a sum over the batch (weight gradients): rows win
        if isinstance(last_out, int) and (last_out >= 16 if batch_red else last_out >= last_red):
            return names_out[:-1] + names_red + names_out[-1:]
    return names_out + names_red


def vectorizable(stage, term, out_index, outer, reduce_, order, prog) -> bool:
    """Can the innermost output variable run as a row of vector accumulators kept in registers
    across the reduction loops? Needs: a sum with reductions, the innermost loop an output
    variable that is the output's last index (unit stride, or 2: stored every other element) and at
    most MAX_ROW long, every read either free of it or unit-stride in it on its last index, float
    reads only, and a body of +, ×, constants and runtime scalars."""
    if stage.combine != "sum" or not reduce_ or len(outer) < 2 or stage.argmax:
        return False
    v, extent = order[-1], dict(outer).get(order[-1])
    if extent is None or not isinstance(extent, int) or extent > MAX_ROW or extent < 4:
        return False
    if out_index[-1].coeff(v) not in (1, 2) or any(e.coeff(v) for e in out_index[:-1]):
        return False  # (stride 2: a stride-2 input gradient's residue class, stored every other element)
    return unit_stride_reads(term, v, prog) and vector_safe(term, {name for name, _ in outer + reduce_})


def map_row_vectorizable(nest: ClassNest, term: TermNest, prog: Program) -> bool:
    """An elementwise stage (no reduction: batch norm's output, ReLU, its derivative, a gradient's
    accumulation) as vector rows along the output's last variable, each chunk computed and stored
    once. Needs that variable unit-stride in the output and in every read (or absent), 4 to
    MAX_ROW long, no constraint, float tensors and a body the vector templates emit. (Left to
    LLVM, such loops got their 16-wide rows fully unrolled first and the loop around them
    vectorized instead: gathers and scatters at a stride of a row, 1.4 cycles an element.)"""
    stage, outer = nest.stage, nest.outer
    if stage.reduce or nest.reduce or stage.argmax or len(nest.terms) != 1 or term.constraints or len(outer) < 2:
        return False  # (one variable: the row would be every thread's, unsplit)
    if prog.tensors[stage.out].dtype != "float" or nest.empty or not covers_outputs(nest, term):
        return False
    v, extent = outer[-1]
    if not isinstance(extent, int) or not 4 <= extent <= MAX_ROW:
        return False
    try:
        if nest.out_index[-1] != Affine.var(v) or any(e.coeff(v) for e in nest.out_index[:-1]):
            return False
        if not unit_stride_reads(term.term, v, prog):
            return False
    except (TypeError, ValueError, NotImplementedError):  # a read at a non-affine index (a reshape)
        return False
    return vector_safe(term.term, {name for name, _ in outer}, piecewise=True)


def max_row_vectorizable(nest: ClassNest, term: TermNest, order, lanes: int) -> bool:
    """A max pool as vector rows: the running maximum and each reduction variable's argmax
    held per lane across the window loops (in the window's order, so ties go to the first, as
    in plain loops), then stored once. Needs one read, unit or stride 2 along the row (the
    output's last index), no constraint (no padding), and a row at least a vector long (LeNet-5's
    5-wide pooled rows: 0.19 ms as vectors, 0.15 as plain loops; its 14-wide: 0.27 against 0.36)."""
    stage, outer = nest.stage, nest.outer
    if stage.combine != "max" or len(nest.terms) != 1 or len(outer) < 2 or term.constraints:
        return False
    v, extent = order[-1], dict(outer).get(order[-1])
    if not isinstance(extent, int) or extent < lanes or not isinstance(term.term, sympy.Indexed):
        return False
    if nest.out_index[-1] != Affine.var(v) or any(e.coeff(v) for e in nest.out_index[:-1]):
        return False
    index = [Affine.from_sympy(i) for i in term.term.indices]
    return index[-1].coeff(v) in (1, 2) and not any(e.coeff(v) for e in index[:-1])


def reduction_vectorizable(stage, term, out_index, outer, reduce_, order, prog) -> bool:
    """The other way round: the innermost loop is a reduction variable ``r`` (4 to MAX_ROW long)
    that the output does not depend on, every read free of ``r`` or unit-stride in it."""
    if stage.combine != "sum" or not reduce_ or not outer or stage.argmax:
        return False
    r, extent = order[-1], dict(reduce_).get(order[-1])
    if extent is None or not isinstance(extent, int) or extent > MAX_ROW or extent < 4:
        return False
    if any(e.coeff(r) for e in out_index):
        return False
    return unit_stride_reads(term, r, prog) and vector_safe(term, {name for name, _ in outer + reduce_})


def unit_stride_reads(term, v, prog) -> bool:
    for r in term.atoms(sympy.Indexed):
        if prog.tensors[tensor_of(r)].dtype != "float":
            return False
        index = [Affine.from_sympy(i) for i in r.indices]
        if any(e.coeff(v) for e in index[:-1]) or index[-1].coeff(v) not in (0, 1, 2):
            return False
    return True


def vector_epilogue(body, row: str, loop_vars, prog) -> bool:
    """Can an epilogue body run on a register row along ``row`` (its operations ones the vector
    templates emit, its reads free of the row or unit-stride along it)?"""
    return vector_safe(body, loop_vars, piecewise=True) and unit_stride_reads(body, row, prog)


def vector_safe(e, loop_vars, piecewise: bool = False) -> bool:
    """A body the vector templates can emit: +, ×, small powers (and ±1/2, ±3/2: batch norm's σ),
    reads, numbers, runtime scalars, functions whose row in `functions` has a vector lowering
    (and, in epilogues, a Piecewise of comparisons: ReLU and its derivative)."""
    if isinstance(e, sympy.Indexed) or e.is_number:
        return True
    if isinstance(e, sympy.Symbol):
        return e.name not in loop_vars
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return all(vector_safe(a, loop_vars, piecewise) for a in e.args)
    if isinstance(e, sympy.Pow) and (e.exp == -1 or (e.exp.is_Integer and 1 < e.exp <= 4) or
                                     (e.exp.is_Rational and e.exp.q == 2 and abs(e.exp.p) <= 3)):
        return vector_safe(e.base, loop_vars, piecewise)
    row = function_of(e)
    if row is not None:
        return row.vector is not None and vector_safe(e.args[0], loop_vars, piecewise)
    if piecewise and isinstance(e, sympy.Piecewise):
        return all(vector_safe(p.expr, loop_vars, piecewise) and
                   (p.cond is sympy.true or (isinstance(p.cond, (sympy.StrictGreaterThan, sympy.StrictLessThan,
                                                                 sympy.GreaterThan, sympy.LessThan))
                                             and all(vector_safe(a, loop_vars, piecewise) for a in p.cond.args)))
                   for p in e.args)
    return False


MAX_ACCUMULATORS = 8  # vector accumulators of a tile: the rest of the 16 ymm registers hold loads


def output_tile(term: TermNest, outer, row: str, extent: int, lanes: int):
    """An output variable ``u`` to block beside a register row (output channels of a convolution):
    every read that depends on ``u`` is free of the row (a weight: broadcast once per row), and
    some read is, so that every read along the row (the input) is loaded once for the whole
    block; no constraint mentions ``u``. The block size divides ``u``'s extent and keeps block ×
    vectors per row within MAX_ACCUMULATORS. Returns (u, block size, extent) or None."""
    chunks = -(-extent // lanes)
    reads = list(term.term.atoms(sympy.Indexed))
    along = {r for r in reads if Affine.from_sympy(r.indices[-1]).coeff(row)}
    best = None
    for u, ext in outer:
        if u == row or not isinstance(ext, int) or any(c.expr.coeff(u) for c in term.constraints):
            continue
        across = {r for r in reads if mentions(r, u)}
        if not across or not along or along & across:
            continue
        size = max((t for t in range(2, MAX_ACCUMULATORS + 1) if ext % t == 0 and t * chunks <= MAX_ACCUMULATORS),
                   default=None)
        if size is not None and (best is None or size > best[1]):
            best = (u, size, ext)
    return best


def batch_pair(term: TermNest, outer, row: str, extent: int, tile: tuple, lanes: int) -> str | None:
    """The batch variable, to block two at a time beside a one-vector row whose tile is a block
    of MAX_ACCUMULATORS output channels: half the channels for two examples keeps as many
    accumulators, and each step loads two input vectors and half the weight broadcasts (six
    loads per eight FMAs, not nine). The batch's variable must be free of the constraints and
    of the tile's reads (the weights), and the reads along the row must carry it."""
    if -(-extent // lanes) != 1 or tile[1] != MAX_ACCUMULATORS:
        return None
    batch = next((v for v, e in outer if not isinstance(e, int)), None)
    if batch is None or batch in (row, tile[0]) or any(c.expr.coeff(batch) for c in term.constraints):
        return None
    reads = list(term.term.atoms(sympy.Indexed))
    across = [r for r in reads if mentions(r, tile[0])]
    along = [r for r in reads if Affine.from_sympy(r.indices[-1]).coeff(row)]
    if any(mentions(r, batch) for r in across) or not all(mentions(r, batch) for r in along):
        return None
    return batch


def tiled_order(outer, reduce_, row: str, u: str, free: bool) -> list[str]:
    """Outer variables (``free``: the longest other than the block's first, for the threads to
    split; else the first stays first), the block's variable (stepped by its size), then the
    reductions, then the row."""
    rest = [v for v, _ in outer if v not in (row, u)]
    extents = dict(outer)
    if rest and free:
        first = max(rest, key=lambda v: 10 ** 9 if not isinstance(extents[v], int) else extents[v])
        rest = [first] + [v for v in rest if v != first]
    return rest + [u] + [r for r, _ in reduce_] + [row]


MAX_BLOCK_ACCUMULATORS = 12


def reduction_block(term: TermNest, outer, r: str, extent: int, tile: tuple):
    """A second output variable ``u`` to block beside a tiled reduction row (output channels of a
    filter gradient, beside its kernel column): the reads with ``u`` (the output gradient) are
    free of the tile's variable, so one load serves every kernel column; they run along the row
    at offset 0 and stay inside their tensor over the whole row, so that load may take the row's
    full extent (the term is still 0 outside each column's range: it is a product with a read
    that carries the tile's variable and its exact mask). Each (column, block member) keeps one
    accumulator for all the row's chunks (the code generator adds the chunks into it), so
    columns × block ≤ MAX_BLOCK_ACCUMULATORS. Returns (u, size, extent) or None."""
    tile_var, tile_extent = tile
    term_ = term.term
    reads = list(term_.atoms(sympy.Indexed))
    precise = [x for x in reads if mentions(x, tile_var) and Affine.from_sympy(x.indices[-1]).coeff(r)]
    if not isinstance(term_, sympy.Mul) or not any(x in term_.args for x in precise):
        return None
    for u, ext in outer:
        if u == tile_var or not isinstance(ext, int) or any(c.expr.coeff(u) for c in term.constraints):
            continue
        with_u = [x for x in reads if mentions(x, u)]
        if not with_u or any(mentions(x, tile_var) for x in with_u):
            continue
        if not all(whole_row(x, r, extent) for x in with_u):
            continue
        size = max((t for t in range(2, 9) if ext % t == 0 and t * tile_extent <= MAX_BLOCK_ACCUMULATORS),
                   default=None)
        if size is not None:
            return u, size, ext
    return None


def mentions(read: sympy.Indexed, v: str) -> bool:
    return any(Affine.from_sympy(i).coeff(v) for i in read.indices)


def whole_row(read: sympy.Indexed, r: str, extent: int) -> bool:
    """Is the read's last index the row variable itself, in range over the whole row?"""
    last = Affine.from_sympy(read.indices[-1])
    return last == Affine.var(r) and not any(Affine.from_sympy(i).coeff(r) for i in read.indices[:-1])


def row_tile(stage, term, outer, reduce_, r, constraints, prog):
    """An output variable to unroll beside a reduction row (a filter gradient's kernel column):
    not the threads' variable, at most 8 long, every read that is broadcast free of it (so one
    load serves every tile), and every constraint on it also on the row variable (so it only
    moves the row's bounds). Returns (variable, extent) or None."""
    if len(outer) < 2:
        return None
    u, extent = outer[-1]
    if not isinstance(extent, int) or not 2 <= extent <= 8:
        return None
    for read_ in term.atoms(sympy.Indexed):
        index = [Affine.from_sympy(i) for i in read_.indices]
        if not index[-1].coeff(r) and any(e.coeff(u) for e in index):
            return None
    if any(c.expr.coeff(u) and not c.expr.coeff(r) for c in constraints):
        return None
    return u, extent


def interleaved_pairs(nests, tpl, lanes: int) -> tuple | None:
    """Vector rows for merged classes (a max-pool gradient with stride 2): the innermost loop
    variable ``v`` writes ``out[..., 2v]`` in one class and ``out[..., 2v + 1]`` in another with
    everything else alike, so a vector of each, interleaved, is one contiguous store of 2W.
    Returns (v, extent, ((even class, odd class), ...)) in class positions, or None where the
    classes do not pair up, a loop is constrained, the row is shorter than a vector (LeNet-5's
    5-wide pooled rows ran faster as plain loops: 0.13 against 0.18 ms), or a term is more than
    products of reads, numbers and index comparisons (`index_vector_safe`)."""
    v = tpl.order[-1]
    extent = dict(nests[0].grid)[v]
    if len(nests) % 2 or not isinstance(extent, int) or extent < lanes or nests[0].terms[0].constraints:
        return None
    if v not in {o for o, _ in nests[0].outer}:
        return None
    rows: dict = {}
    for k, nest in enumerate(nests):
        last = nest.out_index[-1]
        if last.coeffs != ((v, 2),) or last.const not in (0, 1) or \
                any(e.coeff(v) for e in nest.out_index[:-1]) or not index_vector_safe(nest.terms[0].term, v):
            return None
        rows.setdefault(nest.out_index[:-1], [None, None])[int(last.const)] = k
    if any(None in pair for pair in rows.values()):
        return None
    return v, extent, tuple(tuple(pair) for pair in rows.values())


def index_vector_safe(e, v: str) -> bool:
    """Products of reads (float or index tensors, read contiguously along ``v`` or free of it),
    numbers and KroneckerDelta comparisons of index reads with loop-variable expressions free of ``v``."""
    if e.is_Number:
        return True
    if isinstance(e, sympy.Indexed):
        index = [Affine.from_sympy(i) for i in e.indices]
        return index[-1].coeff(v) in (0, 1) and not any(i.coeff(v) for i in index[:-1])
    if isinstance(e, sympy.Mul):
        return all(index_vector_safe(a, v) for a in e.args)
    if isinstance(e, sympy.KroneckerDelta):
        return all(index_vector_safe(a, v) if isinstance(a, sympy.Indexed) else loop_affine_free_of(a, v)
                   for a in e.args)
    return False


def loop_affine_free_of(e, v: str) -> bool:
    """An integral affine expression of loop variables, ``v`` not among them."""
    try:
        affine = Affine.from_sympy(e)
    except (TypeError, ValueError, NotImplementedError):
        return False
    return affine.is_integral() and not affine.coeff(v) and all(s.is_integer for s in e.free_symbols)


# ----- kernels: fusion ------------------------------------------------------------------------------

@dataclass
class Kernel:
    """A main stage and the elementwise stages computed in its epilogue; ``epilogue[k]`` is
    stage k's body over the main's variables, with every read of a value the kernel just made
    left as a read of that tensor at the output point (the code generator puts the value there)."""

    main: Stage
    nests: list  # the main's ClassNests
    templates: list  # per nest, per term
    epilogue: list = field(default_factory=list)  # (Stage, body over the main's grid)
    lanes: int = 8  # vector width the code generator uses
    siblings: list = field(default_factory=list)  # Kernels of other sums run in the same loops (see `sibling`)

    @property
    def stages(self) -> list[Stage]:
        return [self.main] + [s for s, _ in self.epilogue] + [s for k in self.siblings for s in k.stages]

    @property
    def members(self) -> list[Kernel]:
        """This kernel and its siblings: each a sum with its own epilogue."""
        return [self] + self.siblings

    @property
    def made(self) -> set[str]:
        """What this kernel's own main and epilogue make (its siblings' outputs are theirs)."""
        return {self.main.out} | {s.out for s, _ in self.epilogue}

    @property
    def class_groups(self) -> list[tuple[list[int], tuple | None]]:
        """The nests to run in one loop nest, each group in order (see `merge_classes`), with
        the pairs of them whose rows a vector loop interleaves (see `interleaved_pairs`)."""
        if self.epilogue:
            return [([k], None) for k in range(len(self.nests))]
        return [(group, interleaved_pairs([self.nests[k] for k in group], self.templates[group[0]][0], self.lanes)
                 if len(group) > 1 else None) for group in merge_classes(self.nests, self.templates)]


def merge_classes(nests, templates) -> list[list[int]]:
    """Residue classes of one stage that run as one loop nest, each class's statement in turn
    at every point: consecutive classes over the same grid, each a single term stored fresh by
    plain loops in the same order under the same constraints (a max-pool gradient's four
    window positions). Their stores then sit side by side at every step (out[2x], out[2x+1]),
    which the loop vectorizer turns into interleaved, contiguous vector stores instead of
    four strided passes."""
    def key(k):
        nest, tpl = nests[k], templates[k]
        if len(tpl) != 1 or tpl[0].kind != "scalar" or not tpl[0].fresh:
            return None
        return nest.grid, tpl[0].order, nest.terms[0].constraints

    groups: list[list[int]] = []
    for k in range(len(nests)):  # noqa: SIM113
        if groups and key(k) is not None and key(k) == key(groups[-1][0]):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


class Scheduler:
    """Kernels for every phase of one program; each stage is lowered and templated once."""

    def __init__(self, prog: Program, fuse: bool = True, lanes: int = 8):
        self.prog, self.fuse, self.lanes = prog, fuse, lanes
        self.lowered: dict[int, tuple] = {}  # id(stage) → (nests, templates); stages live in prog
        self.read_sets: dict[int, set] = {}
        self.epilogues: dict[tuple, object] = {}

    def single(self, stage: Stage) -> Kernel:
        """One stage as a kernel of its own."""
        if id(stage) not in self.lowered:
            nests = lower(stage, self.prog)
            self.lowered[id(stage)] = nests, [[template(n, t, self.prog, self.lanes) for t in n.terms]
                                             for n in nests]
        return Kernel(stage, *self.lowered[id(stage)], lanes=self.lanes)

    def reads(self, stage: Stage) -> set[str]:
        if id(stage) not in self.read_sets:
            self.read_sets[id(stage)] = {tensor_of(r) for r in stage.reads()}
        return self.read_sets[id(stage)]

    def kernels(self, phase: str) -> list[Kernel]:
        """The phase's stages as kernels, in execution order."""
        remaining = [s for _, _, s in self.prog.phase_stages(phase)]
        out = []
        while remaining:
            kernel = self.single(remaining.pop(0))
            if self.fuse and sibling_host(kernel):
                self.gather_siblings(kernel, remaining)
            if self.fuse and epilogue_host(kernel):
                self.grow(kernel, remaining)
            out.append(kernel)
        return out

    def gather_siblings(self, kernel: Kernel, remaining: list) -> None:
        """Pull out of ``remaining`` the sums that can run in the kernel's own loops (`sibling`):
        batch norm's four backward reductions over one channel's values, each read once."""
        k = 0
        while k < min(len(remaining), SIBLING_WINDOW) and len(kernel.members) < MAX_SIBLINGS:
            stage = remaining[k]
            if not any(self.reads(stage) & m.made for m in kernel.members) and self.movable(remaining[:k], stage):
                other = self.single(stage)
                if sibling(kernel, other):
                    kernel.siblings.append(other)
                    remaining.pop(k)
                    continue
            k += 1

    def grow(self, kernel: Kernel, remaining: list) -> None:
        """Pull every stage that can run in the kernel's epilogue (or a sibling's) out of ``remaining``."""
        k = 0
        while k < len(remaining):
            stage = remaining[k]
            host = next((m for m in kernel.members if self.reads(stage) & m.made), None)
            if host is not None and not any(stage.out in self.reads(m.main) for m in kernel.members):
                body = self.epilogue_body(host, stage)
                if body is not None and self.movable(remaining[:k], stage):
                    host.epilogue.append((stage, body))
                    remaining.pop(k)
                    k = 0  # a later stage may now read what this one made
                    continue
            k += 1

    def epilogue_body(self, kernel: Kernel, stage: Stage):
        """`epilogue_body`, remembered: every phase asks again about the same stages."""
        key = (id(kernel.main), tuple(id(s) for s, _ in kernel.epilogue), id(stage))
        if key not in self.epilogues:
            self.epilogues[key] = epilogue_body(kernel, stage, self.prog)
        return self.epilogues[key]

    def movable(self, between: list[Stage], stage: Stage) -> bool:
        """May ``stage`` run before ``between``? Only if none of them writes what it reads or
        touches what it writes."""
        reads = self.reads(stage)
        for s in between:
            if s.out in reads or s.out == stage.out or set(s.argmax) & reads or stage.out in self.reads(s):
                return False
        return True


MAX_SIBLINGS = 4  # sums in one loop nest, one vector accumulator each (more chains spill, and gain little)
SIBLING_WINDOW = 8  # how far ahead siblings are looked for (the derivation writes them side by side)


def sibling_host(kernel: Kernel) -> bool:
    """A single vector reduction row (a per-channel sum over the batch and the map) that others
    may join."""
    if len(kernel.nests) != 1 or len(kernel.templates[0]) != 1 or kernel.nests[0].empty:
        return False
    return kernel.templates[0][0].kind == "reduction_row"


def sibling(kernel: Kernel, other: Kernel) -> bool:
    """May ``other`` run in ``kernel``'s loops, its own accumulator beside the kernel's? Both
    are vector reduction rows over the same grid, in the same order and under the same
    constraints, writing their outputs at the same points."""
    if not sibling_host(other) or other.main.combine != kernel.main.combine:
        return False
    a, b = kernel.nests[0], other.nests[0]
    ta, tb = kernel.templates[0][0], other.templates[0][0]
    return (a.grid == b.grid and a.out_index == b.out_index and a.terms[0].constraints == b.terms[0].constraints
            and (ta.order, ta.row, ta.extent, ta.first_reduce) == (tb.order, tb.row, tb.extent, tb.first_reduce)
            and a.needs_init == b.needs_init)


def epilogue_host(kernel: Kernel) -> bool:
    """Does the main finish each output value once, at one place in its loops, for every output
    point? Each class has one term whose loops visit all its outputs, the output index is the
    stage's own variables in order, and either a register template holds the value (at the
    row's end) or plain loops close their reductions somewhere (the values are final there; output
    loops inside the reductions are run again for the epilogue: see `reductions_closed`)."""
    main = kernel.main
    if main.accumulate or not main.domain or tuple(main.out_index) != tuple(Affine.var(v) for v, _ in main.domain):
        return False
    for nest, templates in zip(kernel.nests, kernel.templates):
        if nest.empty or len(nest.terms) != 1 or not covers_outputs(nest, nest.terms[0]):
            return False
        if templates[0].fresh and templates[0].kind == "scalar" and reductions_closed(nest, templates[0].order)[1]:
            return False  # (a max-pool gradient: its classes run merged, as vectors, only without one)
        if templates[0].kind not in ("scalar", "map_row") and main.combine != "sum":
            return False
    return True


def reductions_closed(nest: ClassNest, order) -> tuple[int, list]:
    """Where plain loops in ``order`` have finished every sum: the loop level after which the
    outputs of the enclosing loops are final, and the output variables of the loops inside it
    (the epilogue loops over those again: a dense weight gradient's row, order n, b, k)."""
    reduce_ = {r for r, _ in nest.reduce}
    level = min((k for k, v in enumerate(order) if v in reduce_), default=len(order))
    return level, [v for v in order[level:] if v not in reduce_]


def epilogue_body(kernel: Kernel, stage: Stage, prog: Program):
    """``stage``'s body over the main's variables if it can run in the epilogue, else None: it is
    elementwise over the main's output points (same extents, identity index), reads what the
    kernel made only at the output point, reads everything else in range, and writes nothing the
    main reads (earlier epilogue stages read it, if at all, at the same point: they run first)."""
    if stage.combine is not None or stage.reduce or stage.argmax or stage.accumulate:
        return None
    main = kernel.main
    if not any(tensor_of(r) in kernel.made for r in stage.reads()):
        return None
    if len(stage.domain) != len(main.domain) or any(e != ext for (_, e), (_, ext) in zip(stage.domain, main.domain)):
        return None
    if tuple(stage.out_index) != tuple(Affine.var(v) for v, _ in stage.domain):
        return None
    if stage.out in {tensor_of(r) for r in main.reads()}:
        return None
    body = stage.body.xreplace({var(v): var(m) for (v, _), (m, _) in zip(stage.domain, main.domain)})
    point = tuple(Affine.var(m) for m, _ in main.domain)

    def at_point(r):
        return tuple(Affine.from_sympy(i) for i in r.indices) == point

    if not all(at_point(r) for r in body.atoms(sympy.Indexed) if tensor_of(r) in kernel.made):
        return None
    if not all(at_point(r) for _, earlier in kernel.epilogue for r in earlier.atoms(sympy.Indexed)
               if tensor_of(r) == stage.out):
        return None
    others = [r for r in body.atoms(sympy.Indexed) if tensor_of(r) not in kernel.made]
    if read_ranges(sympy.Add(*others), main.domain, shapes_of(prog, {tensor_of(r) for r in others})):
        return None
    rest = body.xreplace({r: sympy.Symbol(f"made{k}") for k, r in enumerate(body.atoms(sympy.Indexed))
                          if tensor_of(r) in kernel.made})
    for nest, templates in zip(kernel.nests, kernel.templates):
        if templates[0].kind in REGISTER_ROWS and not templates[0].scatter:  # (scatter: lane by lane)
            if not vector_epilogue(substitute(rest, nest.subst), templates[0].row, {v for v, _ in nest.grid}, prog):
                return None
    return body
