"""The register templates beyond the plain row (schedule: `templates`): a max pool's row, merged
residue classes interleaved, elementwise rows, tiles of output channels (and example pairs),
reduction rows (tiled, blocked, and sibling sums side by side)."""
from __future__ import annotations

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import tensor_of

from .access import ELEMENT, running_max
from .emit import FAST
from .rows import RegisterRow


class MaxRow(RegisterRow):
    """A max pool's row: per lane the running maximum and, per window variable, where it was
    found, in registers across the window loops; stored once (no initialisation pass). The
    comparison is the plain loops' own: greater, or the first NaN, so ties keep the first."""

    def __init__(self, *args, nest, epilogue=()):
        super().__init__(*args, fresh=True, epilogue=epilogue)
        self.partials, self.accs = 1, self.accs[:1]
        self.nest, self.it = nest, f"<{self.lanes} x i32>"  # window positions, as stored (int32)
        self.winners = {name: self.new_row(self.it) for name in nest.stage.argmax}

    def begin(self) -> None:
        lowest = self.splat(self.fw.fconst(float("-inf")))
        for slot in self.accs[0]:
            self.fw.raw(f"store {self.vt} {lowest}, ptr {slot}")
        for row in self.winners.values():
            for slot in row:
                self.fw.raw(f"store {self.it} zeroinitializer, ptr {slot}")

    def accumulate_row(self, vals, bounds, accs) -> None:
        fw, vt = self.fw, self.vt
        lo, hi = bounds
        where = {name: self.splat(fw.op(f"trunc i64 {fw.affine(self.nest.subst[r], vals)} to i32"), "i32")
                 for (r, _), name in zip(self.nest.stage.reduce, self.nest.stage.argmax)}
        for c, slot in enumerate(accs):
            mask = self.lane_mask(c, lo, hi)
            vals[self.v] = str(c * self.lanes)
            value = self.emit(self.term, vals, mask)
            take, larger = running_max(fw, vt, self.mt, value, fw.op(f"load {vt}, ptr {slot}"))
            fw.raw(f"store {vt} {larger}, ptr {slot}")
            for name, rows in self.winners.items():
                old = fw.op(f"load {self.it}, ptr {rows[c]}")
                fw.raw(f"store {self.it} {fw.op(f'select {self.mt} {take}, {self.it} {where[name]}, {self.it} {old}')}, "
                       f"ptr {rows[c]}")
        del vals[self.v]

    def end(self, vals) -> None:
        fw = self.fw
        for c in range(self.chunks):
            vals[self.v] = str(c * self.lanes)
            for name, rows in self.winners.items():
                p = self.address(name, self.out_index, vals, "i32")
                self.store_lanes(p, fw.op(f"load {self.it}, ptr {rows[c]}"), min(self.lanes, self.extent - c * self.lanes),
                                 "i32")
        del vals[self.v]
        super().end(vals)


class InterleavedRow(RegisterRow):
    """Pairs of residue classes writing ``out[..., 2v]`` and ``out[..., 2v + 1]`` (a max-pool
    gradient's window columns), W values of ``v`` at a time: each class's term as a vector
    (index tensors loaded as i64 vectors, KroneckerDelta as a lane comparison), the two
    interleaved into one contiguous masked store of 2W. Nothing accumulates."""

    def __init__(self, writer, fw, out, pairs, shapes, ptr, v, extent):
        super().__init__(writer, fw, out, pairs[0][0].terms[0].term, pairs[0][0].out_index, shapes, ptr, v, extent,
                         first_reduce=None, fresh=True)
        self.pairs, self.partials, self.accs = pairs, 1, []
        n = self.lanes
        for ty in ("i32", "i64"):
            fw.declares.add(f"declare <{n} x {ty}> @llvm.masked.load.v{n}{ty}.p0(ptr, i32, {self.mt}, <{n} x {ty}>)")
        self.zip = ", ".join(f"i32 {k // 2 + (k % 2) * n}" for k in range(2 * n))

    def innermost(self, vals, row_bounds) -> None:
        lo, hi = row_bounds()
        whole = lo == "0" and hi.isdigit()  # the whole row: each chunk's pairs known, stored without masks
        for c in range(self.chunks):
            mask = self.lane_mask(c, lo, hi)
            vals[self.v] = str(c * self.lanes)
            for even, odd in self.pairs:
                halves = tuple(self.emit(nest.terms[0].term, vals, mask) for nest in (even, odd))
                p = self.address(self.out, even.out_index, vals)
                if whole:
                    zipped = self.fw.op(f"shufflevector {self.vt} {halves[0]}, {self.vt} {halves[1]}, "
                                        f"<{2 * self.lanes} x i32> <{self.zip}>")
                    self.store_lanes(p, zipped, 2 * min(self.lanes, int(hi) + 1 - c * self.lanes), lanes=2 * self.lanes)
                else:
                    self.store_two(p, halves, (mask, mask), self.zip)
        del vals[self.v]

    def index_vector(self, e, vals, mask) -> str:
        """An integer operand of a comparison, as a vector of i64 lanes (int32 tensors widened)."""
        fw, n = self.fw, self.lanes
        if not isinstance(e, sympy.Indexed):
            return self.splat(fw.affine(Affine.from_sympy(e), vals), "i64")
        ty = ELEMENT[self.w.prog.tensors[tensor_of(e)].dtype]
        index = [Affine.from_sympy(i) for i in e.indices]
        p = self.address(tensor_of(e), index, vals, ty)
        if index[-1].coeff(self.v):
            value = fw.op(f"call <{n} x {ty}> @llvm.masked.load.v{n}{ty}.p0(ptr {p}, i32 {int(ty[1:]) // 8}, "
                          f"{self.mt} {self.guard(p, mask)}, <{n} x {ty}> zeroinitializer)")
        else:
            value = self.splat(fw.op(f"load {ty}, ptr {self.guard_scalar(p)}"), ty)
        return value if ty == "i64" else fw.op(f"sext <{n} x {ty}> {value} to <{n} x i64>")

    def emit_operation(self, e, vals, mask, made) -> str:
        if isinstance(e, sympy.KroneckerDelta):
            a, b = (self.index_vector(x, vals, mask) for x in e.args)
            same = self.fw.op(f"icmp eq <{self.lanes} x i64> {a}, {b}")
            return self.fw.op(f"uitofp {self.mt} {same} to {self.vt}")
        return super().emit_operation(e, vals, mask, made)


class MapRow(RegisterRow):
    """An elementwise stage's row (schedule.map_row_vectorizable): each chunk of W lanes computed
    from its reads, added to the output where the stage accumulates, stored, and handed to the
    epilogue stages; no accumulators, nothing carried between rows."""

    def __init__(self, *args, fresh, epilogue=()):
        super().__init__(*args, fresh=fresh, epilogue=epilogue)
        self.partials, self.accs = 1, []

    def begin(self) -> None:
        pass

    def innermost(self, vals, row_bounds) -> None:
        for c in range(self.chunks):
            vals[self.v] = str(c * self.lanes)
            mask = self.lane_mask(c, "0", str(self.extent - 1))
            value = self.emit(self.term, vals, mask)
            if not self.fresh:
                value = self.fw.op(f"fadd {FAST} {self.vt} {self.load_row(self.out, vals, mask)}, {value}")
            self.finish_chunk(vals, value, mask, min(self.lanes, self.extent - c * self.lanes))
        del vals[self.v]

    def end(self, vals) -> None:
        pass


class TiledRow(RegisterRow):
    """Register rows for a block of values of an output variable (output channels): the reads
    along the row (the input) are loaded once for the whole block, the reads with the block's
    variable (weights) are broadcast per row; block × vectors accumulators, each an independent
    FMA chain. The nest steps the block's variable by the block size (``block``)."""

    def __init__(self, *args, tile, fresh, epilogue, pair=None):
        super().__init__(*args, fresh=fresh, epilogue=epilogue)
        self.block = tile  # (variable, size, extent)
        self.pair = pair  # the batch variable, two examples at once (schedule.batch_pair), or None
        self.partials, self.accs = 1, self.accs[:1]
        members = tile[1] * (2 if pair else 1)
        self.tiles = [self.accs[0]] + [self.new_row() for _ in range(members - 1)]

    def shares_load(self, e) -> bool:
        if self.pair:  # two blocked variables: every read, once per value of the variables it carries
            return True
        return not any(Affine.from_sympy(i).coeff(self.block[0]) for i in e.indices)

    def rows(self) -> list[list[str]]:
        return self.tiles

    def each_row(self, vals, action, stores: bool = False) -> None:
        """``action`` on each member's accumulators, the block's (and pair's) variables set to its
        values. A pair's second example past the batch's end is the first again (its reads stay
        in range), and where ``stores``, its action is skipped."""
        fw, u, base = self.fw, self.block[0], vals[self.block[0]]
        examples = [(None, None)]
        if self.pair:
            first = vals[self.pair]
            after = fw.iadd(first, 1)
            inside = fw.op(f"icmp sle i64 {after}, %Bm1")
            examples = [(first, None), (fw.op(f"select i1 {inside}, i64 {after}, i64 {first}"), inside)]
        for t in range(self.block[1]):
            for q, (example, inside) in enumerate(examples):
                accs = self.tiles[t * len(examples) + q]
                vals[u] = fw.iadd(base, t)
                if example is not None:
                    vals[self.pair] = example
                if stores and inside is not None:
                    fw.when(inside, lambda accs=accs: action(accs))
                else:
                    action(accs)
        vals[u] = base
        if self.pair:
            vals[self.pair] = examples[0][0]

    def innermost(self, vals, row_bounds) -> None:
        bounds = row_bounds()  # no constraint mentions the block's (or the pair's) variable
        self.shared = {}
        self.each_row(vals, lambda accs: self.accumulate_row(vals, bounds, accs))
        self.shared = None

    def end(self, vals) -> None:
        def finish(accs):
            self.accs = [accs]
            super(TiledRow, self).end(vals)

        self.each_row(vals, finish, stores=True)
        self.accs = [self.tiles[0]]


class ReductionRow(RegisterRow):
    """Vector partial sums over the innermost reduction variable, kept across every reduction
    loop and summed across lanes once per output element."""

    def __init__(self, *args, several: bool, epilogue=()):
        super().__init__(*args, epilogue=epilogue)
        if not several:  # no other reduction loop to unroll for independent chains
            self.partials = 1
            self.accs = self.accs[:1]

    def end(self, vals) -> None:
        fw = self.fw
        total = None
        for row in self.accs:  # fixed order: deterministic
            for slot in row:
                value = fw.op(f"load {self.vt}, ptr {slot}")
                total = value if total is None else fw.op(f"fadd {FAST} {self.vt} {total}, {value}")
        fw.declares.add(f"declare {fw.ft} @llvm.vector.reduce.fadd.{self.suffix}({fw.ft}, {self.vt})")
        scalar = fw.op(f"call {FAST} {fw.ft} @llvm.vector.reduce.fadd.{self.suffix}({fw.ft} {fw.fconst(0.0)}, "
                       f"{self.vt} {total})")
        _, p = self.w.address(fw, self.out, self.out_index, vals, self.shapes, self.ptr)
        total = fw.fbin('fadd', fw.op(f'load {fw.ft}, ptr {p}'), scalar)
        fw.raw(f"store {fw.ft} {total}, ptr {p}")
        self.w.scalar_epilogue(fw, self.out, self.out_index, vals, self.shapes, self.ptr, self.epilogue, total)


class Siblings:
    """Reduction rows of several sums over the same loops (schedule.sibling), driven by one
    nest: each adds its term into its own accumulator at every step and finishes on its own."""

    partials, block = 1, None

    def __init__(self, rows: list):
        self.rows, self.first_reduce = rows, rows[0].first_reduce

    def begin(self) -> None:
        for row in self.rows:
            row.begin()

    def innermost(self, vals, row_bounds) -> None:
        bounds = row_bounds()
        for row in self.rows:
            row.innermost(vals, lambda: bounds)

    def end(self, vals) -> None:
        for row in self.rows:
            row.end(vals)


class TiledReductionRow(ReductionRow):
    """A reduction row for each value of a small output variable at once (a kernel column), and
    optionally for a block of another one (output channels, stepped by the nest): a read free of
    a tile's or block's variable is loaded once for all of its rows; the rows are independent
    chains. Reads with the block's variable (the output gradient) are loaded over the row's whole
    extent, so that one load serves every kernel column; each column's read carries its exact mask."""

    def __init__(self, *args, tile, block=None, epilogue=()):
        super().__init__(*args, several=False, epilogue=epilogue)
        self.tile_var, self.tile_extent = tile
        self.block = block
        self.grid = [(b, t) for b in range(block[1] if block else 1) for t in range(self.tile_extent)]
        # with a block, the rows' chunks add into one accumulator each: kernel columns × block chains
        # are independent enough, and the block may then be as large as one chunk's would be
        self.collapsed = block is not None and self.chunks > 1
        self.tiles = {key: (self.accs[0] if k == 0 else self.new_row())[:1 if self.collapsed else None]
                      for k, key in enumerate(self.grid)}

    def rows(self) -> list[list[str]]:
        return list(self.tiles.values())

    def shares_load(self, e) -> bool:
        return self.block is not None  # the cache key tells a kernel column's reads apart

    def whole_row_mask(self, e, vals):
        """Reads with the block's variable: the row's whole extent (they are inside it there)."""
        if self.block is None or not any(Affine.from_sympy(i).coeff(self.block[0]) for i in e.indices):
            return None
        return self.lane_mask(int(vals[self.v]) // self.lanes, "0", str(self.extent - 1))

    def each(self, vals, action) -> None:
        base = vals.get(self.block[0]) if self.block else None
        for b, t in self.grid:
            vals[self.tile_var] = str(t)
            if self.block:
                vals[self.block[0]] = self.fw.iadd(base, b)
            action((b, t))
        del vals[self.tile_var]
        if self.block:
            vals[self.block[0]] = base

    def innermost(self, vals, row_bounds) -> None:
        bounds = {}

        def accumulate(key):
            if key[1] not in bounds:  # the row's range depends on the kernel column only
                bounds[key[1]] = row_bounds()
            self.accumulate_row(vals, bounds[key[1]], self.tiles[key])

        self.shared = {}
        self.each(vals, accumulate)
        self.shared = None

    def end(self, vals) -> None:
        def finish(key):
            self.accs = [self.tiles[key]]
            ReductionRow.end(self, vals)

        self.each(vals, finish)
        self.accs = [self.tiles[self.grid[0]]]
