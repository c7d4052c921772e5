"""The register row: the vector template every other one builds on (docs/architecture.md, §5).

A row of an output (or of partial sums) held in vector accumulators across the loops around it;
lanes past the row's ends masked; loads and stores checked lane by lane in bounds-checked builds;
a stage body written as vectors through the vector emitter's table (`vector_ops`). Its width, its
independent FMA chains and everything else sized come from the writer's `Target`.
"""
from __future__ import annotations

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import tensor_of

from .emit import FAST
from .schedule import parity_name, vector_epilogue
from .vector_ops import vector_op


def zero_when_masked(e, v) -> bool:
    """Is the term 0 on lanes whose row loads were masked off (they read as 0)? True for a product
    with a row read among its factors, and sums of such; False for (X − μ)², where a masked lane
    would add μ² and so needs an explicit select."""
    if isinstance(e, sympy.Indexed):
        return bool(Affine.from_sympy(e.indices[-1]).coeff(v))
    if isinstance(e, sympy.Mul):
        return any(zero_when_masked(a, v) for a in e.args)
    if isinstance(e, sympy.Add):
        return all(zero_when_masked(a, v) for a in e.args)
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
        return zero_when_masked(e.base, v)
    return False


def even_lanes(n: int) -> str:
    """A shuffle pattern spreading W lanes onto the even lanes of 2W (odd lanes take lane 0 of a
    zero second operand: masked off), for rows that stride memory by 2."""
    return ", ".join(f"i32 {k // 2 if k % 2 == 0 else n}" for k in range(2 * n))


class RegisterRow:
    """Output-stationary schedule for one term: ``out[..., v0:v0+L]`` accumulates in ⌈L/W⌉ vector
    registers while the reduction loops run; reads free of ``v`` are broadcast, the others are
    loaded W lanes at a time with a mask from ``v``'s Fourier–Motzkin bounds (lanes outside are
    never touched), and the row is added to the output once at the end."""

    def __init__(self, writer, fw, out, term, out_index, shapes, ptr, v, extent, first_reduce, fresh=False,
                 epilogue=()):
        self.w, self.fw, self.out, self.term, self.out_index = writer, fw, out, term, out_index
        self.fresh, self.epilogue = fresh, epilogue
        self.shapes, self.ptr, self.v, self.extent, self.first_reduce = shapes, ptr, v, extent, first_reduce
        self.lanes = writer.lanes
        self.vt = f"<{self.lanes} x {fw.ft}>"
        self.mt = f"<{self.lanes} x i1>"
        self.chunks = (extent + self.lanes - 1) // self.lanes
        self.align = 4 if fw.ft == "float" else 8
        self.suffix = f"v{self.lanes}{'f32' if fw.ft == 'float' else 'f64'}"  # intrinsics' vector type
        self.load_fn = f"@llvm.masked.load.{self.suffix}.p0"
        fw.declares.add(f"declare {self.vt} {self.load_fn}(ptr, i32, {self.mt}, {self.vt})")
        chains = writer.target.chains  # independent FMA chains per output vector (one chunk: all of them)
        self.partials = {1: chains, 2: chains // 2}.get(self.chunks, 1)
        self.partial, self.valid = 0, None
        self.collapsed = False  # one accumulator per row for all its chunks (a reduction row's sum)
        self.shared = None  # a block's loads shared by its rows (see TiledRow)
        self.zero_outside = zero_when_masked(term, v)
        self.scatter = not out_index[-1].coeff(v)  # lanes along another axis (schedule.lanes_row)
        self.offsets = {}  # bounds-checked builds: pointer → (tensor, offset) it was made from
        self.accs = [self.new_row() for _ in range(self.partials)]

    def new_row(self, ty: str | None = None) -> list[str]:
        """Accumulators for one row: a vector register (an alloca LLVM promotes) per chunk."""
        row = []
        for _ in range(self.chunks):
            slot = self.fw.fresh("acc")
            self.fw.allocas.append(f"  {slot} = alloca {ty or self.vt}")
            row.append(slot)
        return row

    def splat(self, scalar: str, ty: str | None = None, lanes: int | None = None) -> str:
        ty, n = ty or self.fw.ft, lanes or self.lanes
        one = self.fw.op(f"insertelement <{n} x {ty}> poison, {ty} {scalar}, i64 0")
        return self.fw.op(f"shufflevector <{n} x {ty}> {one}, <{n} x {ty}> poison, <{n} x i32> zeroinitializer")

    def rows(self) -> list[list[str]]:
        """Every accumulator row this schedule holds."""
        return self.accs

    def begin(self) -> None:
        for row in self.rows():
            for slot in row:
                self.fw.raw(f"store {self.vt} zeroinitializer, ptr {slot}")

    def lane_mask(self, c: int, lo: str, hi: str) -> str:
        fw = self.fw
        lanes = ", ".join(f"i64 {c * self.lanes + k}" for k in range(self.lanes))
        index = f"<{lanes}>"
        ge = fw.op(f"icmp sge <{self.lanes} x i64> {index}, {self.splat(lo, 'i64')}")
        le = fw.op(f"icmp sle <{self.lanes} x i64> {index}, {self.splat(hi, 'i64')}")
        return fw.op(f"and {self.mt} {ge}, {le}")

    def innermost(self, vals, row_bounds) -> None:
        self.accumulate_row(vals, row_bounds(), self.accs[self.partial])

    def accumulate_row(self, vals, bounds, accs) -> None:
        fw = self.fw
        lo, hi = bounds
        for c in range(self.chunks):
            slot = accs[0] if self.collapsed else accs[c]
            mask = self.lane_mask(c, lo, hi)
            if self.valid is not None:  # an unrolled copy past the loop's end adds nothing
                mask = fw.op(f"and {self.mt} {mask}, {self.splat(self.valid, 'i1')}")
            vals[self.v] = str(c * self.lanes)
            value = self.emit(self.term, vals, mask)
            if self.valid is not None or not self.zero_outside:  # lanes outside the row add nothing
                value = fw.op(f"select {self.mt} {mask}, {self.vt} {value}, {self.vt} zeroinitializer")
            total = fw.op(f"fadd {FAST} {self.vt} {fw.op(f'load {self.vt}, ptr {slot}')}, {value}")
            fw.raw(f"store {self.vt} {total}, ptr {slot}")
        del vals[self.v]

    def end(self, vals) -> None:
        """Add the row to the output (or, fresh, write it), lanes past the row's end masked off;
        then the epilogue stages on the row while it is still in registers."""
        if self.scatter:
            self.scatter_end(vals)
            return
        for c in range(self.chunks):
            vals[self.v] = str(c * self.lanes)
            mask = self.lane_mask(c, "0", str(self.extent - 1))
            total = self.chunk_sum(c, None if self.fresh else self.load_row(self.out, vals, mask))
            self.finish_chunk(vals, total, mask, min(self.lanes, self.extent - c * self.lanes))
        del vals[self.v]

    def finish_chunk(self, vals, total, mask, count: int) -> None:
        """A finished chunk (``count`` of its lanes in the row) stored, then the epilogue stages
        on it, each stored."""
        if self.out not in self.w.elide:
            self.store_row(self.out, vals, total, count)
        made = {self.out: total}
        for stage, body in self.epilogue:
            made[stage.out] = self.emit(body, vals, mask, made)
            if stage.out not in self.w.elide:
                self.store_row(stage.out, vals, made[stage.out], count)

    def chunk_sum(self, c: int, total: str | None = None) -> str:
        """Chunk ``c`` of the row: its partial sums added (to ``total``) in a fixed order: deterministic."""
        for row in self.accs:
            value = self.fw.op(f"load {self.vt}, ptr {row[c]}")
            total = value if total is None else self.fw.op(f"fadd {FAST} {self.vt} {total}, {value}")
        return total

    def scatter_end(self, vals) -> None:
        """A row along a variable that is not the output's last index (see schedule.lanes_row):
        each lane written by itself, the epilogue stages run on it as scalars. Fresh rows only."""
        fw = self.fw
        names = {v for e in self.out_index for v in e.vars} | set(vals)
        as_vectors = all(vector_epilogue(body, self.v, names, self.w.prog) for _, body in self.epilogue)
        for c in range(self.chunks):
            made = {self.out: self.chunk_sum(c)}
            if as_vectors:  # the epilogue on the vector (its reads free of the row or along it)
                vals[self.v] = str(c * self.lanes)
                mask = self.lane_mask(c, "0", str(self.extent - 1))
                for stage, body in self.epilogue:
                    made[stage.out] = self.emit(body, vals, mask, made)

            def lane(k, made=made, c=c):
                vals[self.v] = fw.iadd(str(c * self.lanes), k)
                lanes = {t: fw.op(f"extractelement {self.vt} {value}, i64 {k}") for t, value in made.items()}
                for t, scalar in lanes.items():
                    self.w.store(fw, t, self.out_index, vals, self.shapes, self.ptr, scalar)
                if not as_vectors:
                    self.w.scalar_epilogue(fw, self.out, self.out_index, vals, self.shapes, self.ptr, self.epilogue,
                                           lanes[self.out])

            count = min(self.lanes, self.extent - c * self.lanes)
            if as_vectors:  # only stores per lane: unrolled (constant lane indices)
                for k in range(count):
                    lane(str(k))
            else:  # a scalar epilogue per lane: a loop (unrolled, its index code swamped LLVM)
                fw.loop("0", str(count - 1), lane)
        del vals[self.v]

    def load_row(self, tensor, vals, mask) -> str:
        """The row's lanes of ``tensor`` at the output index (see `store_row`)."""
        if self.out_index[-1].coeff(self.v) == 2:
            return self.strided_load(tensor, list(self.out_index), vals, mask)
        p = self.address(tensor, self.out_index, vals)
        return self.fw.op(f"call {self.vt} {self.load_fn}(ptr {p}, i32 {self.align}, {self.mt} {self.guard(p, mask)}, "
                          f"{self.vt} zeroinitializer)")

    def store_row(self, tensor, vals, value, count: int) -> None:
        """The first ``count`` lanes of the row into ``tensor`` at the output index: contiguous, or
        every other element when the row variable strides the output by 2 (a stride-2 input
        gradient's residue class), one element at a time."""
        p = self.address(tensor, self.out_index, vals)
        if self.out_index[-1].coeff(self.v) != 2:
            self.store_lanes(p, value, count)
            return
        for k in range(count):
            at = self.guard_scalar(p, 2 * k)
            self.fw.raw(f"store {self.fw.ft} {self.fw.op(f'extractelement {self.vt} {value}, i64 {k}')}, ptr {at}")

    def store_lanes(self, p, value, count: int, ty: str | None = None, lanes: int | None = None) -> None:
        """The first ``count`` lanes of ``value`` (``lanes`` of type ``ty``) at ``p``, as whole
        vectors of halving powers of two (8, 4, 2 and 1 lanes of an 8-lane row): a masked store
        costs ~16 cycles on Zen 4 (measured: 6.6 ns against 1.1 ns for a load, blend and store),
        these a cycle or two, and touch nothing else. With `Target.masked_tails` (an option: no
        faster on AVX-512 either, see there), one masked store."""
        fw = self.fw
        ty, lanes = ty or fw.ft, lanes or self.lanes
        vector = f"<{lanes} x {ty}>"
        size = {"float": 4, "double": 8, "i32": 4, "i64": 8}[ty]
        if self.w.checked or self.w.target.masked_tails:  # the first ``count`` lanes (checked: each)
            first = "<" + ", ".join(f"i1 {int(k < count)}" for k in range(lanes)) + ">"
            self.masked_store(p, value, self.guard(p, first, lanes), ty, lanes)
            return
        done = 0
        while done < count:
            piece = 1 << ((count - done).bit_length() - 1)
            at = fw.op(f"getelementptr {ty}, ptr {p}, i64 {done}", "p") if done else p
            if piece == lanes:
                fw.raw(f"store {vector} {value}, ptr {at}, align {size}")
            elif piece == 1:
                fw.raw(f"store {ty} {fw.op(f'extractelement {vector} {value}, i64 {done}')}, ptr {at}")
            else:
                part = fw.op(f"shufflevector {vector} {value}, {vector} poison, <{piece} x i32> "
                             f"<{', '.join(f'i32 {done + k}' for k in range(piece))}>")
                fw.raw(f"store <{piece} x {ty}> {part}, ptr {at}, align {size}")
            done += piece

    def store_two(self, p, values, masks, pattern) -> None:
        """Two W-lane vectors (and their masks) shuffled by ``pattern`` into 2W lanes, stored from
        ``p`` with one masked store (lanes whose mask is off are never touched)."""
        fw, n = self.fw, 2 * self.lanes
        value = fw.op(f"shufflevector {self.vt} {values[0]}, {self.vt} {values[1]}, <{n} x i32> <{pattern}>")
        mask = fw.op(f"shufflevector {self.mt} {masks[0]}, {self.mt} {masks[1]}, <{n} x i32> <{pattern}>")
        self.masked_store(p, value, self.guard(p, mask, n), fw.ft, n)

    def masked_store(self, p, value, mask, ty: str, n: int) -> None:
        """``n`` lanes of ``ty`` at ``p`` where ``mask`` is on (lanes off are never touched)."""
        fw = self.fw
        suffix = {"float": "f32", "double": "f64"}.get(ty, ty)
        store = f"@llvm.masked.store.v{n}{suffix}.p0"
        fw.declares.add(f"declare void {store}(<{n} x {ty}>, ptr, i32, <{n} x i1>)")
        align = {"float": 4, "double": 8, "i32": 4, "i64": 8}[ty]
        fw.raw(f"call void {store}(<{n} x {ty}> {value}, ptr {p}, i32 {align}, <{n} x i1> {mask})")

    def address(self, tensor, index, vals, ty: str | None = None) -> str:
        at = self.w.offset(self.fw, tensor, index, vals, self.shapes)
        p = self.fw.op(f"getelementptr {ty or self.fw.ft}, ptr {self.ptr[tensor]}, i64 {at}", "p")
        if self.w.checked:
            self.offsets[p] = (tensor, at, ty or self.fw.ft)
        return p

    def guard(self, p, mask, lanes: int | None = None, stride: int = 1) -> str:
        """Bounds-checked builds: the lanes of ``mask`` whose element (``p`` + stride·k) lies
        outside its tensor are reported (as a scalar access is) and switched off; otherwise the
        mask as it is. Every vector template's loads and stores go through here."""
        if not self.w.checked:
            return mask
        fw, n = self.fw, lanes or self.lanes
        tensor, at, _ = self.offsets[p]
        steps = "<" + ", ".join(f"i64 {stride * k}" for k in range(n)) + ">"
        where = fw.op(f"add <{n} x i64> {self.splat(at, 'i64', n)}, {steps}")
        size = self.splat(str(self.w.tensor_size(fw, tensor, self.shapes)), "i64", n)
        inside = fw.op(f"icmp ult <{n} x i64> {where}, {size}")
        outside = fw.op(f"xor <{n} x i1> {inside}, <{', '.join(['i1 1'] * n)}>")
        fw.declares.add(f"declare i1 @llvm.vector.reduce.or.v{n}i1(<{n} x i1>)")
        bad = fw.op(f"call i1 @llvm.vector.reduce.or.v{n}i1(<{n} x i1> {fw.op(f'and <{n} x i1> {mask}, {outside}')})")
        self.w.report_when(fw, bad, tensor, at)
        return fw.op(f"and <{n} x i1> {mask}, {inside}")

    def guard_scalar(self, p, k: int = 0) -> str:
        """The element ``k`` past ``p``; in bounds-checked builds, checked like any scalar access."""
        if not self.w.checked:
            return self.fw.op(f"getelementptr {self.fw.ft}, ptr {p}, i64 {k}", "p") if k else p
        tensor, at, ty = self.offsets[p]
        at = self.w.checked_offset(self.fw, tensor, self.fw.iadd(at, k) if k else at, self.shapes)
        return self.fw.op(f"getelementptr {ty}, ptr {self.ptr[tensor]}, i64 {at}", "p")

    def strided_load(self, tensor, index, vals, mask) -> str:
        """Lanes k of ``tensor[..., 2·v + c]``: from its even/odd copy where the program made one
        (`schedule.parity`: ``copy[..., c mod 2, v + ⌊c/2⌋]``, one contiguous masked load), else a masked
        load of 2W elements in which only the even lanes are enabled (odd ones are never
        touched), then the even lanes picked out."""
        fw, n = self.fw, self.lanes
        if parity_name(tensor) in self.w.packed:
            rest = index[-1] - Affine.var(self.v).scale(2)  # c: the index less the row's part
            c = fw.affine(rest, vals)
            at = dict(vals, __par=fw.op(f"and i64 {c}, 1"), __half=fw.op(f"ashr i64 {c}, 1"))
            where = list(index[:-1]) + [Affine.var("__par"), Affine.var(self.v) + Affine.var("__half")]
            p = self.address(parity_name(tensor), where, at)
            return fw.op(f"call {self.vt} {self.load_fn}(ptr {p}, i32 {self.align}, {self.mt} {self.guard(p, mask)}, "
                         f"{self.vt} zeroinitializer)")
        wide = f"<{2 * n} x {fw.ft}>"
        suffix = f"v{2 * n}{'f32' if fw.ft == 'float' else 'f64'}"
        fw.declares.add(f"declare {wide} @llvm.masked.load.{suffix}.p0(ptr, i32, <{2 * n} x i1>, {wide})")
        mask2 = fw.op(f"shufflevector {self.mt} {mask}, {self.mt} zeroinitializer, <{2 * n} x i32> <{even_lanes(n)}>")
        p = self.address(tensor, index, vals)
        mask2 = self.guard(p, mask2, 2 * n)
        loaded = fw.op(f"call {wide} @llvm.masked.load.{suffix}.p0(ptr {p}, i32 {self.align}, <{2 * n} x i1> {mask2}, "
                       f"{wide} zeroinitializer)")
        evens = ", ".join(f"i32 {2 * k}" for k in range(n))
        return fw.op(f"shufflevector {wide} {loaded}, {wide} poison, <{n} x i32> <{evens}>")

    def emit(self, e, vals, mask, made=None) -> str:
        """``e`` as a vector over the row; reads of tensors in ``made`` are those values."""
        if made and isinstance(e, sympy.Indexed) and tensor_of(e) in made:
            return made[tensor_of(e)]
        if self.shared is not None and isinstance(e, sympy.Indexed) and self.shares_load(e):
            wide = self.whole_row_mask(e, vals)
            names = sorted({s.name for i in e.indices for s in i.free_symbols})
            key = (e, wide is not None) + tuple(vals.get(v) for v in names)
            if key not in self.shared:  # one load for every row of a block that reads the same
                self.shared[key] = self.emit_read(e, vals, wide or mask)
            return self.shared[key]
        if isinstance(e, sympy.Indexed):
            return self.emit_read(e, vals, mask)
        return self.emit_operation(e, vals, mask, made)

    def shares_load(self, e) -> bool:
        """Is this read loaded once for several rows of a block (see TiledRow)?"""
        return False

    def whole_row_mask(self, e, vals):
        return None

    def emit_read(self, e, vals, mask) -> str:
        """A read along the row (masked vector load), or free of it (one load, broadcast)."""
        fw = self.fw
        index = [Affine.from_sympy(i) for i in e.indices]
        if index[-1].coeff(self.v) == 2:  # stride 2: every other element of a double-width load
            return self.strided_load(tensor_of(e), index, vals, mask)
        p = self.address(tensor_of(e), index, vals)
        if index[-1].coeff(self.v):
            return fw.op(f"call {self.vt} {self.load_fn}(ptr {p}, i32 {self.align}, {self.mt} {self.guard(p, mask)}, "
                         f"{self.vt} zeroinitializer)")
        return self.splat(fw.op(f"load {fw.ft}, ptr {self.guard_scalar(p)}"))

    def emit_operation(self, e, vals, mask, made) -> str:
        """Runtime scalars and numbers splat; every other head through its row of `vector_ops`
        (the schedule admitted only what `vector_ops.vector_safe` finds there)."""
        fw = self.fw
        if isinstance(e, sympy.Symbol):
            if e.name == "B":
                return self.splat(fw.op(f"sitofp i64 %B to {fw.ft}"))
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.w.scalar_names.index(e.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return self.splat(value if fw.ft == "double" else fw.op(f"fptrunc double {value} to float"))
        if e.is_number:
            return self.splat(fw.fconst(float(e)))
        return vector_op(e).emit(self, e, vals, mask, made)
