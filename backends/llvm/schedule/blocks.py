"""Blocks beside a register row or around plain loops: which variable, how many at once.

Each block keeps its accumulators within the `Target`'s register budget (``accumulators``: half
the vector registers, the rest for loads; ``wide_accumulators`` where the loads are one vector and
a broadcast); a block's size divides its variable's extent, so no block has a tail.
"""
from __future__ import annotations

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.loops import ClassNest, TermNest

from ..target import Target


def output_tile(term: TermNest, outer, row: str, extent: int, lanes: int, budget: int):
    """An output variable ``u`` to block beside a register row (output channels of a convolution):
    every read that depends on ``u`` is free of the row (a weight: broadcast once per row), and
    some read is, so that every read along the row (the input) is loaded once for the whole
    block; no constraint mentions ``u``. The block size divides ``u``'s extent and keeps block ×
    vectors per row within ``budget`` accumulators. Returns (u, block size, extent) or None."""
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
        size = max((t for t in range(2, budget + 1) if ext % t == 0 and t * chunks <= budget), default=None)
        if size is not None and (best is None or size > best[1]):
            best = (u, size, ext)
    return best


def batch_pair(term: TermNest, outer, row: str, extent: int, tile: tuple, lanes: int, budget: int) -> str | None:
    """The batch variable, to block two at a time beside a one-vector row whose tile is a block
    of ``budget`` output channels (every accumulator): half the channels for two examples keeps as many
    accumulators, and each step loads two input vectors and half the weight broadcasts (six
    loads per eight FMAs, not nine). The batch's variable must be free of the constraints and
    of the tile's reads (the weights), and the reads along the row must carry it."""
    if -(-extent // lanes) != 1 or tile[1] != budget:
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


def reduction_block(term: TermNest, outer, r: str, extent: int, tile: tuple, target: Target):
    """A second output variable ``u`` to block beside a tiled reduction row (output channels of a
    filter gradient, beside its kernel column): the reads with ``u`` (the output gradient) are
    free of the tile's variable, so one load serves every kernel column; they run along the row
    at offset 0 and stay inside their tensor over the whole row, so that load may take the row's
    full extent (the term is still 0 outside each column's range: it is a product with a read
    that carries the tile's variable and its exact mask). Each (column, block member) keeps one
    accumulator for all the row's chunks (the code generator adds the chunks into it), so
    columns × block ≤ the target's ``wide_accumulators``, the block at most ``accumulators``.
    Returns (u, size, extent) or None."""
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
        size = max((t for t in range(2, target.accumulators + 1)
                    if ext % t == 0 and t * tile_extent <= target.wide_accumulators), default=None)
        if size is not None:
            return u, size, ext
    return None


def row_tile(term, outer, r, constraints, budget: int):
    """An output variable to unroll beside a reduction row (a filter gradient's kernel column):
    not the threads' variable, at most ``budget`` long, every read that is broadcast free of it (so one
    load serves every tile), and every constraint on it also on the row variable (so it only
    moves the row's bounds). Returns (variable, extent) or None."""
    if len(outer) < 2:
        return None
    u, extent = outer[-1]
    if not isinstance(extent, int) or not 2 <= extent <= budget:
        return None
    for read_ in term.atoms(sympy.Indexed):
        index = [Affine.from_sympy(i) for i in read_.indices]
        if not index[-1].coeff(r) and any(e.coeff(u) for e in index):
            return None
    if any(c.expr.coeff(u) and not c.expr.coeff(r) for c in constraints):
        return None
    return u, extent


def lanes_tile(term: TermNest, outer, u: str, chunks: int, budget: int):
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
        size = max((d for d in range(2, budget + 1) if ext % d == 0 and d * chunks <= budget), default=None)
        if size is None:
            continue
        rest = [e for v, e in outer if v not in (u, t)]
        first = max(rest, key=lambda e: 10 ** 9 if not isinstance(e, int) else e, default=None)
        even = first is None or not isinstance(first, int) or first % 2 == 0
        ranked.append(((even, size, k), (t, size, ext)))
    return max(ranked)[1] if ranked else None


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


def dot_block(nest: ClassNest, term: TermNest, order, sizes: tuple) -> tuple | None:
    """Plain loops ending in a long loop (a dense layer's dot product, out[b, n] += X[b, k]·W[n, k],
    or its weight gradient's row, dW[n, k] += dY[b, n]·X[b, k]): several values of an output
    variable ``n`` computed together in the innermost loop (unroll and jam), so each load of the
    read free of ``n`` serves the whole block (once from L2 per block, not per ``n``); each
    output's own sum keeps its order. ``sizes``: the blocks to try, largest first (the target's
    `jam_sizes`). Returns (n, block size, extent) or None."""
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
        if shared and any(e.coeff(u) for e in nest.out_index) and jam_size(size, sizes):
            return u, jam_size(size, sizes), size
    if r in dict(nest.outer):  # a row of outputs (a dense input gradient, out[b, k] += W[n, k]·dY[b, n]):
        for u, size in nest.reduce:  # a block of the sum around it keeps each output in a register
            if isinstance(size, int) and not any(c.expr.coeff(u) for c in term.constraints) and jam_size(size, sizes):
                return u, jam_size(size, sizes), size
    return None


def jam_size(extent: int, sizes: tuple) -> int | None:
    """The largest of ``sizes`` dividing ``extent`` (an unroll-and-jam block), or None."""
    return next((d for d in sizes if extent % d == 0), None)


def mentions(read: sympy.Indexed, v: str) -> bool:
    return any(Affine.from_sympy(i).coeff(v) for i in read.indices)


def whole_row(read: sympy.Indexed, r: str, extent: int) -> bool:
    """Is the read's last index the row variable itself, in range over the whole row?"""
    last = Affine.from_sympy(read.indices[-1])
    return last == Affine.var(r) and not any(Affine.from_sympy(i).coeff(r) for i in read.indices[:-1])
