"""Loop nests as LLVM IR: Fourier–Motzkin bounds, the threads' split of the outermost loop,
blocks and pairs stepped, the register template's hooks at its levels, and each class's nest
(plain statements, merged classes, sibling sums). The schedule chose all of it; this writes it.
"""
from __future__ import annotations

from cnncompile.ir.affine import Affine
from cnncompile.ir.loops import BATCH_LAST, ClassNest, fm_bounds, shapes_of
from cnncompile.ir.residue import substitute

from .access import Access
from .emit import FunctionWriter
from .row_templates import (InterleavedRow, MapRow, MaxRow, ReductionRow, RegisterRow, Siblings, TiledReductionRow,
                            TiledRow)
from .schedule import Kernel, reductions_closed


class Nests(Access):
    """Writes a kernel's loop nests into a `FunctionWriter` (see `module.ModuleWriter`)."""

    def init_nest(self, fw: FunctionWriter, nest: ClassNest, templates, shapes, ptr) -> None:
        """The outputs set to the sum's identity where its terms add into them."""
        if nest.needs_init and (nest.empty or not (nest.terms and all(t.fresh for t in templates))):
            first, unit = templates[0].split if templates else (None, 1)  # the threads share outputs alike
            order = [o for o, _ in nest.outer if o == first] + [o for o, _ in nest.outer if o != first]
            self.nest(fw, nest.outer, order, [], bool(nest.outer),
                      lambda vals: self.store(fw, nest.stage.out, nest.out_index, vals, shapes, ptr,
                                              fw.fconst(nest.identity)), unit=unit)

    def sibling_nest(self, fw: FunctionWriter, kernel: Kernel, tensors) -> None:
        """A kernel's sum and its siblings' (schedule.sibling) in one loop nest: each its own
        initialisation, its own reduction row of one accumulator (the sums are the independent
        chains) and its own epilogue; their shared reads are loaded once."""
        shapes = shapes_of(self.prog, tensors)
        ptr = {t: f"%a{j}" for j, t in enumerate(tensors)}
        rows = []
        for member in kernel.members:
            nest, tpl = member.nests[0], member.templates[0][0]
            self.init_nest(fw, nest, member.templates[0], shapes, ptr)
            epilogue = [(s, substitute(body, nest.subst)) for s, body in member.epilogue]
            rows.append(ReductionRow(self, fw, member.main.out, nest.terms[0].term, nest.out_index, shapes, ptr,
                                     tpl.row, tpl.extent, tpl.first_reduce, several=False, epilogue=epilogue))
        first = kernel.nests[0]
        self.nest(fw, first.grid, list(kernel.templates[0][0].order), first.terms[0].constraints, bool(first.outer),
                  None, Siblings(rows))

    def class_nest(self, fw: FunctionWriter, nest: ClassNest, templates, tensors, epilogue) -> None:
        stage, outer = nest.stage, nest.outer
        shapes = shapes_of(self.prog, tensors)
        ptr = {t: f"%a{j}" for j, t in enumerate(tensors)}
        self.init_nest(fw, nest, templates, shapes, ptr)
        if nest.empty:
            return
        epilogue = [(s, substitute(body, nest.subst)) for s, body in epilogue]  # over this class's grid
        for term, tpl in zip(nest.terms, templates):
            args = (self, fw, stage.out, term.term, nest.out_index, shapes, ptr, tpl.row, tpl.extent, tpl.first_reduce)
            vector = {"row": lambda: RegisterRow(*args, fresh=tpl.fresh, epilogue=epilogue),
                      "tiled_row": lambda: TiledRow(*args, tile=tpl.tile, fresh=tpl.fresh, epilogue=epilogue,
                                                    pair=tpl.pair),
                      "reduction_row": lambda: ReductionRow(*args, several=tpl.several, epilogue=epilogue),
                      "tiled_reduction_row": lambda: TiledReductionRow(*args, tile=tpl.tile, block=tpl.block,
                                                                       epilogue=epilogue),
                      "max_row": lambda: MaxRow(*args, nest=nest, epilogue=epilogue),
                      "map_row": lambda: MapRow(*args, fresh=tpl.fresh, epilogue=epilogue),
                      "scalar": lambda: None}[tpl.kind]()
            plain_block = tpl.block if vector is None else None  # (vector templates step their own blocks)
            jam = each_in_block(fw, plain_block)
            finish = None
            if vector is None and epilogue:  # plain loops: the epilogue once the reductions are done
                level, inner = reductions_closed(nest, tpl.order)
                outputs_block = plain_block if plain_block and plain_block[0] in dict(outer) else None
                point = each_in_block(fw, outputs_block)(
                    lambda vals: self.scalar_epilogue(fw, stage.out, nest.out_index, vals, shapes, ptr, epilogue))
                finish = (level, lambda vals: self.whole_range(fw, inner, dict(nest.grid), vals, point))
            self.nest(fw, nest.grid, list(tpl.order), term.constraints, bool(outer),
                      jam(lambda vals, term=term, tpl=tpl: self.statement(fw, stage, term.term, nest.out_index, nest,
                                                                          vals, shapes, ptr, tpl.accumulate)), vector,
                      finish, block=plain_block)

    def merged_nest(self, fw: FunctionWriter, nests: list, tpl, tensors, pairs=None) -> None:
        """Several classes' single fresh terms in one loop nest (see schedule.merge_classes),
        as interleaved vector rows where the schedule paired them (`InterleavedRow`)."""
        shapes = shapes_of(self.prog, tensors)
        ptr = {t: f"%a{j}" for j, t in enumerate(tensors)}
        first = nests[0]

        def statements(vals):
            for nest in nests:
                self.statement(fw, nest.stage, nest.terms[0].term, nest.out_index, nest, vals, shapes, ptr, False)

        vector = None
        if pairs is not None:
            v, extent, pairing = pairs
            vector = InterleavedRow(self, fw, first.stage.out, [(nests[a], nests[b]) for a, b in pairing],
                                    shapes, ptr, v, extent)
        self.nest(fw, first.grid, list(tpl.order), first.terms[0].constraints, bool(first.outer), statements, vector)

    def whole_range(self, fw, names, extents, vals, body) -> None:
        """``body`` at every point of the variables ``names`` over their whole extents, in order."""
        if not names:
            body(vals)
            return
        v, rest = names[0], names[1:]
        hi = "%Bm1" if not isinstance(extents[v], int) else str(extents[v] - 1)

        def inner(value):
            vals[v] = value
            self.whole_range(fw, rest, extents, vals, body)
            del vals[v]

        fw.loop("0", hi, inner)

    def nest(self, fw, grid, order, constraints, split: bool, statement, vector=None, finish=None, unit=1,
             block=None) -> None:
        """Loops in ``order`` with Fourier–Motzkin bounds; the first loop (an output variable) is
        split over the threads; without output variables thread 0 runs the whole nest.
        ``finish = (level, emit)``: ``emit`` runs at that loop level after the loops inside it.
        ``unit``: the threads split the outermost loop in whole units (the blocks of another nest
        over the same outputs). ``block = (variable, size, extent)``: that loop steps by blocks
        (plain loops whose statement covers the block: see `each_in_block`)."""
        extents = dict(grid)
        bounds = fm_bounds(order, grid, constraints)
        if bounds is None:
            return  # never true: no iteration at all
        vals: dict = {}

        def level(k: int) -> None:
            if finish is not None and k == finish[0]:
                inside(k)
                finish[1](vals)
            else:
                inside(k)

        def inside(k: int) -> None:
            if k == len(order):
                statement(vals)
                return
            v = order[k]
            if vector is not None and k == len(order) - 1:  # the row, a few vectors at once
                self.vector_row(fw, vector, v, k == vector.first_reduce, bounds[v], vals)
                return
            fw.raw(f"; for {v}" + (" (this thread's share)" if k == 0 and split else ""))  # (not in the body's key)
            stepped = getattr(vector, "block", None) or block
            paired = getattr(vector, "pair", None) == v  # the batch, two examples a step (a tiled row's pair)
            if stepped is not None and v == stepped[0]:  # a block's variable: one loop step per block
                lo, hi = "0", str(stepped[2] // stepped[1] - 1)
            elif paired:
                lo, hi = "0", fw.op("sdiv i64 %Bm1, 2")  # ⌈B/2⌉ − 1 (an odd batch's last pair: its last example twice)
            else:
                lo = self.bound(fw, bounds[v][0], vals, lower=True)
                hi = self.bound(fw, bounds[v][1], vals, lower=False)
            if k == 0 and split:  # this thread's share of the outermost loop
                blocks = stepped is not None and v == stepped[0]
                n = str(stepped[2] // stepped[1]) if blocks else extent_value(extents[v])
                if paired:
                    n = fw.iadd(hi, 1)
                if unit > 1:  # in whole units
                    n = str(extents[v] // unit)
                lo, hi = thread_share(fw, lo, hi, n, unit)

            step = stepped[1] if stepped is not None and v == stepped[0] else 2 if paired else 1

            def inner(value):
                vals[v] = fw.imul(value, step)
                level(k + 1)

            if vector is not None and k == len(order) - 2 and vector.partials > 1:
                self.unrolled_reduction(fw, vector, v, lo, hi, vals, lambda: level(k + 1), k == vector.first_reduce)
                return
            if vector is not None and k == vector.first_reduce:  # registers live across the reductions
                vector.begin()
                fw.loop(lo, hi, inner)
                vector.end(vals)
                return
            fw.loop(lo, hi, inner)

        if split:
            level(0)
        else:
            fw.when(fw.op("icmp eq i64 %tid, 0"), lambda: level(0))

    def vector_row(self, fw, vector, v, alone: bool, bounds, vals) -> None:
        """The register template's row at the innermost level; ``alone``: the row is the only
        reduction, so its registers live (begin, accumulate, end) right here."""
        def row_bounds():  # evaluated where the row is (a tiled row sets its own variable first)
            return (self.bound(fw, bounds[0], vals, lower=True), self.bound(fw, bounds[1], vals, lower=False))

        fw.raw(f"; vector row {v}")
        if alone:
            vector.begin()
            vector.innermost(vals, row_bounds)
            vector.end(vals)
        else:
            vector.innermost(vals, row_bounds)

    def unrolled_reduction(self, fw, vector, v, lo, hi, vals, body, first: bool) -> None:
        """The last reduction loop unrolled ``vector.partials`` times, each copy adding into its own
        accumulators (independent FMA chains hide their latency). A copy past ``hi`` reads at
        ``lo`` (in range) and its lanes are masked to zero."""
        p = vector.partials
        count = fw.op(f"sub nsw i64 {fw.iadd(hi, 1)}, {lo}")
        last = fw.op(f"sdiv i64 {fw.iadd(count, p - 1)}, {p}")

        def block(t):
            for k in range(p):
                r = fw.iadd(lo, fw.iadd(fw.imul(t, p), k))
                valid = fw.op(f"icmp sle i64 {r}, {hi}")
                vals[v] = fw.op(f"select i1 {valid}, i64 {r}, i64 {lo}")
                vector.partial, vector.valid = k, valid
                body()

        if first:
            vector.begin()
        fw.loop("0", fw.op(f"sub nsw i64 {last}, 1"), block)
        vector.partial, vector.valid = 0, None
        if first:
            vector.end(vals)

    def bound(self, fw, items, vals, lower: bool):
        result = None
        for num, div in items:
            value = fw.affine(num, vals) if isinstance(num, Affine) else {BATCH_LAST: "%Bm1"}[num]
            value = fw.ceildiv(value, div) if lower else fw.floordiv(value, div)
            result = value if result is None else (fw.smax if lower else fw.smin)(result, value)
        return result


def each_in_block(fw, block):
    """Wrap a statement so that it runs for every member of an unroll-and-jam block, in order
    (the nest sets the block variable to the block's start); without a block, unchanged."""
    def wrap(statement):
        if block is None:
            return statement

        def jammed(vals):
            u, base = block[0], vals[block[0]]
            for t in range(block[1]):
                vals[u] = fw.iadd(base, t)
                statement(vals)
            vals[u] = base
        return jammed
    return wrap


def thread_share(fw, lo, hi, n, unit: int) -> tuple[str, str]:
    """``lo..hi`` cut to this thread's share of ``n`` steps (``unit`` loop values each): thread
    ``tid`` of ``nt`` takes steps ⌊n·tid/nt⌋ to ⌊n·(tid+1)/nt⌋ − 1."""
    start = fw.op(f"sdiv i64 {fw.imul(n, '%tid')}, %nt")
    next_start = fw.op(f"sdiv i64 {fw.imul(n, fw.iadd('%tid', 1))}, %nt")
    if unit > 1:
        start, next_start = fw.imul(start, unit), fw.imul(next_start, unit)
    stop = fw.op(f"sub nsw i64 {next_start}, 1")
    return fw.smax(lo, start), fw.smin(hi, stop)


def extent_value(ext) -> str:
    return str(ext) if isinstance(ext, int) else "%B"
