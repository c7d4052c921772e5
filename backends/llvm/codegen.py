"""Stages → loop nests → one LLVM module with a driver function per phase.

Schedule (how loops run), per residue class of a stage:
- loop order: outer variables, then the reduction variables, with the longer of the last outer
  and the last reduction variable innermost (unit-stride, so the vectorizer takes it);
- bounds: every constraint, and every read's range (out of range ⇒ the term is skipped) bounds
  the innermost loop variable it mentions (Fourier–Motzkin), so no test runs inside loops and
  no load can leave its buffer;
- threads: the outermost loop (always an output variable) is split evenly over the threads;
  each output element is reduced by one thread in a fixed order, so results do not depend on
  the thread count; a spin barrier separates stages.
"""
from __future__ import annotations

from fractions import Fraction

import sympy

from cnncompile.ir.affine import Affine, Box
from cnncompile.ir.expr import PHASES, Program, Stage, tensor_of
from ..residue import residue_classes, substitute
from .emit import FAST, BodyWriter, FunctionWriter



def dims(shape) -> list:
    return [d if isinstance(d, int) else "B" for d in shape]


class ModuleWriter:
    def __init__(self, prog: Program, ftype: str, prefix: str, checked: bool = False):
        self.prog, self.ft, self.prefix, self.checked = prog, ftype, prefix, checked
        self.current_stage = 0
        self.tensor_ids = {name: k for k, name in enumerate(prog.tensors)}
        self.scalar_names = sorted({s.name for st in self.all_stages() for s in st.body.free_symbols
                                    if not s.is_integer} - {"B"})
        self.functions: list[str] = []
        self.signatures: dict[str, str] = {}  # stage function → its declaration, for split modules
        self.bodies: dict[str, str] = {}  # function text without its name → the function's name
        self.declares: set[str] = set()

    def all_stages(self):
        return self.prog.all_stages()

    # ----- one stage ----------------------------------------------------------------------------
    def stage_function(self, k: int, stage: Stage) -> tuple[str, list[str]]:
        self.current_stage = k
        tensors = sorted({tensor_of(r) for r in stage.body.atoms(sympy.Indexed)} | {stage.out} | set(stage.argmax))
        fw = FunctionWriter(self.ft)
        for geo in residue_classes(stage):
            self.class_nest(fw, stage, geo, tensors)
        self.declares |= fw.declares
        params = ", ".join(f"ptr noalias %a{j}" for j in range(len(tensors)))
        body = (f"({params}, ptr noalias %scalars, i64 %B, i64 %tid, i64 %nt) {{\n"
                f"entry:\n  %Bm1 = sub i64 %B, 1\n" + "\n".join(fw.allocas) + "\n" + "\n".join(fw.lines)
                + "\n  ret void\n}\n")
        if body in self.bodies:  # the same loops over other buffers (repeated blocks): compile once
            return self.bodies[body], tensors
        name = f"@{self.prefix}_stage{k}"
        self.bodies[body] = name
        self.signatures[name] = f"declare void {name}({', '.join(['ptr'] * (len(tensors) + 1))}, i64, i64, i64)"
        self.functions.append(f"define internal void {name}" + body)
        return name, tensors

    def class_nest(self, fw: FunctionWriter, stage: Stage, geo, tensors) -> None:
        grid = list(geo.grid)
        outer, reduce_ = grid[: geo.n_outer], grid[geo.n_outer:]
        out_index = [e.subs(geo.subst) for e in stage.out_index]
        identity = {"sum": 0.0, "max": float("-inf")}.get(stage.combine)
        body = substitute(stage.body, geo.subst) if not geo.empty else sympy.S.Zero
        shapes = {t: dims(self.prog.tensors[t].shape) for t in tensors}
        ptr = {t: f"%a{j}" for j, t in enumerate(tensors)}
        order = loop_order(outer, reduce_)
        terms = sympy.Add.make_args(body) if (stage.combine != "max" and body.is_Add
                                              and out_of_range(body, grid, shapes)) else (body,)
        needs_init = not stage.accumulate and (bool(reduce_) or len(terms) > 1 or geo.empty
                                                or any(set(c.expr.vars) <= {v for v, _ in outer}
                                                       for c in geo.constraints))
        if needs_init:
            self.nest(fw, outer, [o for o, _ in outer], [], bool(outer),
                      lambda vals: self.store(fw, stage.out, out_index, vals, shapes, ptr, fw.fconst(identity or 0.0)))
        if geo.empty:
            return
        for term in terms:
            constraints = list(geo.constraints) + read_ranges(term, grid, shapes)
            accumulate = stage.accumulate or needs_init
            vector, term_order = None, order
            row_order = [o for o, _ in outer[:-1]] + [r for r, _ in reduce_] + [outer[-1][0]] if outer else order
            if accumulate and not self.checked and vectorizable(stage, term, out_index, outer, reduce_, row_order,
                                                                self.prog):
                vector, term_order = RegisterRow(self, fw, stage.out, term, out_index, shapes, ptr, row_order[-1],
                                                 dict(grid)[row_order[-1]], len(outer) - 1), row_order
            elif accumulate and not self.checked and reduction_vectorizable(stage, term, out_index, outer, reduce_,
                                                                            order, self.prog):
                args = (self, fw, stage.out, term, out_index, shapes, ptr, order[-1], dict(grid)[order[-1]])
                tile = row_tile(stage, term, outer, reduce_, order[-1], constraints, self.prog)
                if tile is not None:  # the tile variable leaves the loop nest
                    term_order = [o for o in order if o != tile[0]]
                    vector = TiledReductionRow(*args, len(outer) - 1, tile=tile)
                else:
                    vector = ReductionRow(*args, len(outer), several=len(reduce_) > 1)
            self.nest(fw, grid, term_order, constraints, bool(outer),
                      lambda vals, term=term: self.statement(fw, stage, term, out_index, geo, vals, shapes, ptr,
                                                             accumulate), vector)

    def nest(self, fw, grid, order, constraints, split: bool, statement, vector=None) -> None:
        """Loops in ``order`` with Fourier–Motzkin bounds; the first loop (an output variable) is
        split over the threads; without output variables thread 0 runs the whole nest."""
        extents = dict(grid)
        bounds = {v: ([(Affine.constant(0), 1)], [(extent_minus_one(extents[v]), 1)]) for v in order}
        position = {v: k for k, v in enumerate(order)}
        for c in constraints:
            present = [v for v in order if c.expr.coeff(v) != 0]
            if not present:
                if not c.lo <= c.expr.const <= c.hi:
                    return  # never true: no iteration at all
                continue
            v = max(present, key=position.get)
            a = c.expr.coeff(v)
            rest = c.expr - Affine.make({v: a})
            lo_num, hi_num = rest.scale(-1) + c.lo, rest.scale(-1) + c.hi
            scale = lo_num.denominator_lcm() * hi_num.denominator_lcm() * a.denominator
            lo_num, hi_num, div = lo_num.scale(scale), hi_num.scale(scale), int(a * scale)
            if div < 0:
                lo_num, hi_num, div = hi_num.scale(-1), lo_num.scale(-1), -div
            bounds[v][0].append((lo_num, div))
            bounds[v][1].append((hi_num, div))
        vals: dict = {}

        def level(k: int) -> None:
            if k == len(order):
                statement(vals)
                return
            v = order[k]
            if vector is not None and k == len(order) - 1:  # the row, a few vectors at once
                def row_bounds():  # evaluated where the row is (a tiled row sets its own variable first)
                    return (self.bound(fw, bounds[v][0], vals, lower=True),
                            self.bound(fw, bounds[v][1], vals, lower=False))

                if k == vector.first_reduce:  # the row is the only reduction: accumulate it right here
                    vector.begin()
                    vector.innermost(vals, row_bounds)
                    vector.end(vals)
                else:
                    vector.innermost(vals, row_bounds)
                return
            lo = self.bound(fw, bounds[v][0], vals, lower=True)
            hi = self.bound(fw, bounds[v][1], vals, lower=False)
            if k == 0 and split:  # this thread's share of the outermost loop
                n = extent_value(extents[v])
                start = fw.op(f"sdiv i64 {fw.imul(n, '%tid')}, %nt")
                next_start = fw.op(f"sdiv i64 {fw.imul(n, fw.iadd('%tid', 1))}, %nt")
                stop = fw.op(f"sub nsw i64 {next_start}, 1")
                lo, hi = fw.smax(lo, start), fw.smin(hi, stop)

            def inner(value):
                vals[v] = value
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
            value = fw.affine(num, vals) if isinstance(num, Affine) else num
            value = fw.ceildiv(value, div) if lower else fw.floordiv(value, div)
            result = value if result is None else (fw.smax if lower else fw.smin)(result, value)
        return result

    def offset(self, fw, tensor, index, vals, shapes):
        shape = shapes[tensor]
        flat = None
        for k, e in enumerate(index):
            stride = 1
            for d in shape[k + 1:]:
                stride *= d
            term = fw.affine(e, vals)
            term = term if stride == 1 else fw.imul(term, stride)
            flat = term if flat is None else fw.iadd(flat, term)
        return flat or "0"

    def address(self, fw, tensor, index, vals, shapes, ptr):
        elem = "i64" if self.prog.tensors[tensor].dtype == "int" else self.ft
        at = self.offset(fw, tensor, index, vals, shapes)
        if self.checked:
            at = self.checked_offset(fw, tensor, at, shapes)
        return elem, fw.op(f"getelementptr inbounds {elem}, ptr {ptr[tensor]}, i64 {at}", "p")

    def checked_offset(self, fw, tensor, at, shapes) -> str:
        """Bounds-checked mode: an offset outside the buffer is reported (stage, tensor, offset in
        the scalar block's last four slots) and replaced by 0, so the access stays inside."""
        size = 1
        for d in shapes[tensor]:
            size = fw.imul(size, "%B") if d == "B" else (size * d if isinstance(size, int) else fw.imul(size, d))
        bad = fw.op(f"icmp uge i64 {at}, {size}")
        base = len(self.scalar_names)

        def report():
            for k, value in enumerate((self.current_stage, self.tensor_ids[tensor], at, 1)):
                slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {base + k}", "p")
                fw.raw(f"store double {fw.op(f'sitofp i64 {value} to double')}, ptr {slot}")

        fw.when(bad, report)
        return fw.op(f"select i1 {bad}, i64 0, i64 {at}")

    def store(self, fw, tensor, index, vals, shapes, ptr, value):
        elem, p = self.address(fw, tensor, index, vals, shapes, ptr)
        fw.raw(f"store {elem} {value}, ptr {p}")

    def statement(self, fw, stage, term, out_index, geo, vals, shapes, ptr, accumulate) -> None:
        def load_read(r):
            index = [Affine.from_sympy(i) for i in r.indices]
            elem, p = self.address(fw, tensor_of(r), index, vals, shapes, ptr)
            return fw.op(f"load {elem}, ptr {p}"), ("i" if elem == "i64" else "f")

        def symbol(s):
            if s.name in vals:
                return vals[s.name], "i"
            if s.name == "B":
                return "%B", "i"
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.scalar_names.index(s.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return (value if self.ft == "double" else fw.op(f"fptrunc double {value} to float")), "f"

        writer = BodyWriter(fw, load_read, symbol)
        value = writer.as_float(writer.emit(term))
        _, p = self.address(fw, stage.out, out_index, vals, shapes, ptr)
        if stage.combine == "max":
            cur = fw.op(f"load {self.ft}, ptr {p}")
            greater = fw.op(f"fcmp ogt {self.ft} {value}, {cur}")
            first_nan = fw.op(f"and i1 {fw.op(f'fcmp uno {self.ft} {value}, {value}')}, "
                              f"{fw.op(f'fcmp ord {self.ft} {cur}, {cur}')}")
            take = fw.op(f"or i1 {greater}, {first_nan}")
            fw.raw(f"store {self.ft} {fw.op(f'select i1 {take}, {self.ft} {value}, {self.ft} {cur}')}, ptr {p}")
            for (r, _), name in zip(stage.reduce, stage.argmax):
                _, ap = self.address(fw, name, out_index, vals, shapes, ptr)
                old = fw.op(f"load i64, ptr {ap}")
                fw.raw(f"store i64 {fw.op(f'select i1 {take}, i64 {fw.affine(geo.subst[r], vals)}, i64 {old}')}, "
                       f"ptr {ap}")
            return
        if accumulate:
            value = fw.op(f"fadd {FAST} {self.ft} {fw.op(f'load {self.ft}, ptr {p}')}, {value}")
        fw.raw(f"store {self.ft} {value}, ptr {p}")

    # ----- the module ---------------------------------------------------------------------------
    def module(self) -> str:
        """The whole program as one module (what ``model.source("llvm")`` shows)."""
        return self.modules(1)[0]

    def modules(self, n: int) -> list[str]:
        """The program as ``n`` modules of about equal size, so that LLVM can optimize them on
        separate threads: the drivers and the barrier in the first, stage functions spread over
        all (exported where split, and declared where the drivers call them)."""
        stage_fns = {}
        for part in ("forward", "loss", "backward", "update"):
            for k, stage in enumerate(getattr(self.prog, part)):
                stage_fns[(part, k)] = self.stage_function(len(stage_fns), stage)
        drivers = [self.driver(phase, [stage_fns[key] for key in keys]) for phase, keys in self.phase_stages(stage_fns)]
        head = "\n".join(sorted(self.declares | {BARRIER_DECLARES}))
        if n <= 1:
            return [head + "\n\n" + BARRIER + "\n" + "\n".join(self.functions) + "\n" + "\n".join(drivers)]
        bins = [[] for _ in range(n)]
        sizes = [sum(len(d) for d in drivers)] + [0] * (n - 1)
        for text in sorted(self.functions, key=len, reverse=True):
            k = sizes.index(min(sizes))
            bins[k].append(text.replace("define internal void", "define void", 1))
            sizes[k] += len(text)
        elsewhere = [self.signatures[f.split("(", 1)[0].split()[-1]] for b in bins[1:] for f in b]
        first = [head, BARRIER, *elsewhere, *bins[0], *drivers]
        return ["\n".join(first)] + ["\n".join([head, *b]) for b in bins[1:] if b]

    def phase_stages(self, stage_fns):
        """Each phase's stages in order, and one single-stage driver per stage (for profiling)."""
        for phase in PHASES:
            yield phase, [(part, k) for part, k, _ in self.prog.phase_stages(phase)]
        for n, key in enumerate(stage_fns):
            yield f"only{n}", [key]

    def driver(self, phase: str, calls) -> str:
        lines = ["entry:", "  %sense = alloca i32", "  %shared = getelementptr inbounds i32, ptr %bar, i64 1",
                 "  %s0 = load atomic i32, ptr %shared acquire, align 4", "  store i32 %s0, ptr %sense"]
        n = 0
        for name, tensors in calls:
            args = []
            for t in tensors:
                n += 1
                lines.append(f"  %slot{n} = getelementptr inbounds ptr, ptr %bufs, i64 {self.tensor_ids[t]}")
                lines.append(f"  %buf{n} = load ptr, ptr %slot{n}")
                args.append(f"ptr %buf{n}")
            lines.append(f"  call void {name}({', '.join(args)}, ptr %scalars, i64 %B, i64 %tid, i64 %nt)")
            lines.append("  call void @cc_barrier(ptr %bar, ptr %sense, i64 %nt)")
        lines.append("  ret void")
        return (f"define void @{self.prefix}_{phase}(ptr %bufs, ptr %scalars, i64 %B, i64 %tid, i64 %nt, ptr %bar) "
                "{\n" + "\n".join(lines) + "\n}\n")


MAX_ROW = 64  # longest output row held in registers (8 ymm accumulators for float)


def vectorizable(stage, term, out_index, outer, reduce_, order, prog) -> bool:
    """Can the innermost output variable run as a row of vector accumulators kept in registers
    across the reduction loops (output-stationary)? Needs: a sum with reductions, the innermost
    loop an output variable that is the output's last index (unit stride) and at most MAX_ROW
    long, every read either free of it or unit-stride in it on its last index, float reads only,
    and a body of +, ×, constants and runtime scalars."""
    if stage.combine != "sum" or not reduce_ or len(outer) < 2 or stage.argmax:
        return False
    v, extent = order[-1], dict(outer).get(order[-1])
    if extent is None or not isinstance(extent, int) or extent > MAX_ROW or extent < 4:
        return False
    if out_index[-1] != Affine.var(v) or any(e.coeff(v) for e in out_index[:-1]):
        return False
    return unit_stride_reads(term, v, prog) and vector_safe(term, {name for name, _ in outer + reduce_})


def reduction_vectorizable(stage, term, out_index, outer, reduce_, order, prog) -> bool:
    """The other way round: the innermost loop is a reduction variable ``r`` (4 to MAX_ROW long)
    that the output does not depend on, every read free of ``r`` or unit-stride in it: then
    vector partial sums over ``r`` can live across all the reduction loops and be added up
    once per output element (a filter gradient over a feature-map row)."""
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


def vector_safe(e, loop_vars) -> bool:
    if isinstance(e, sympy.Indexed) or e.is_Number:
        return True
    if isinstance(e, sympy.Symbol):
        return e.name not in loop_vars
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return all(vector_safe(a, loop_vars) for a in e.args)
    if isinstance(e, sympy.Pow) and (e.exp == -1 or (e.exp.is_Integer and 1 < e.exp <= 4)):
        return vector_safe(e.base, loop_vars)
    return False


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


class RegisterRow:
    """Output-stationary schedule for one term: ``out[..., v0:v0+L]`` accumulates in ⌈L/W⌉ vector
    registers while the reduction loops run; reads free of ``v`` are broadcast, the others are
    loaded W lanes at a time with a mask from ``v``'s Fourier–Motzkin bounds (lanes outside are
    never touched), and the row is added to the output once at the end."""

    def __init__(self, writer, fw, out, term, out_index, shapes, ptr, v, extent, first_reduce):
        self.w, self.fw, self.out, self.term, self.out_index = writer, fw, out, term, out_index
        self.shapes, self.ptr, self.v, self.extent, self.first_reduce = shapes, ptr, v, extent, first_reduce
        self.lanes = 8 if fw.ft == "float" else 4
        self.vt = f"<{self.lanes} x {fw.ft}>"
        self.mt = f"<{self.lanes} x i1>"
        self.chunks = (extent + self.lanes - 1) // self.lanes
        self.align = 4 if fw.ft == "float" else 8
        suffix = f"v{self.lanes}{'f32' if fw.ft == 'float' else 'f64'}"
        self.load_fn, self.store_fn = f"@llvm.masked.load.{suffix}.p0", f"@llvm.masked.store.{suffix}.p0"
        fw.declares.add(f"declare {self.vt} {self.load_fn}(ptr, i32, {self.mt}, {self.vt})")
        fw.declares.add(f"declare void {self.store_fn}({self.vt}, ptr, i32, {self.mt})")
        self.partials = {1: 4, 2: 2}.get(self.chunks, 1)  # independent FMA chains per output vector
        self.partial, self.valid = 0, None
        self.zero_outside = zero_when_masked(term, v)
        self.accs = []
        for _ in range(self.partials):
            row = []
            for _ in range(self.chunks):
                slot = fw.fresh("acc")
                fw.allocas.append(f"  {slot} = alloca {self.vt}")
                row.append(slot)
            self.accs.append(row)

    def splat(self, scalar: str, ty: str | None = None) -> str:
        ty = ty or self.fw.ft
        one = self.fw.op(f"insertelement <{self.lanes} x {ty}> poison, {ty} {scalar}, i64 0")
        return self.fw.op(f"shufflevector <{self.lanes} x {ty}> {one}, <{self.lanes} x {ty}> poison, "
                          f"<{self.lanes} x i32> zeroinitializer")

    def begin(self) -> None:
        for row in self.accs:
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
        for c, slot in enumerate(accs):
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
        """Add the row to the output, lanes past the row's end masked off."""
        fw = self.fw
        for c in range(self.chunks):
            vals[self.v] = str(c * self.lanes)
            mask = self.lane_mask(c, "0", str(self.extent - 1))
            p = self.address(self.out, self.out_index, vals)
            total = fw.op(f"call {self.vt} {self.load_fn}(ptr {p}, i32 {self.align}, {self.mt} {mask}, {self.vt} "
                          f"zeroinitializer)")
            for row in self.accs:  # partial sums in a fixed order: deterministic
                total = fw.op(f"fadd {FAST} {self.vt} {total}, {fw.op(f'load {self.vt}, ptr {row[c]}')}")
            fw.raw(f"call void {self.store_fn}({self.vt} {total}, ptr {p}, i32 {self.align}, {self.mt} {mask})")
        del vals[self.v]

    def address(self, tensor, index, vals) -> str:
        at = self.w.offset(self.fw, tensor, index, vals, self.shapes)
        return self.fw.op(f"getelementptr {self.fw.ft}, ptr {self.ptr[tensor]}, i64 {at}", "p")

    def strided_load(self, tensor, index, vals, mask) -> str:
        """Lanes k of ``tensor[..., 2·v + c]``: a masked load of 2W elements in which only the even
        lanes are enabled (odd ones are never touched), then the even lanes picked out."""
        fw, n = self.fw, self.lanes
        wide = f"<{2 * n} x {fw.ft}>"
        suffix = f"v{2 * n}{'f32' if fw.ft == 'float' else 'f64'}"
        fw.declares.add(f"declare {wide} @llvm.masked.load.{suffix}.p0(ptr, i32, <{2 * n} x i1>, {wide})")
        spread = ", ".join(f"i32 {k // 2 if k % 2 == 0 else n}" for k in range(2 * n))
        mask2 = fw.op(f"shufflevector {self.mt} {mask}, {self.mt} zeroinitializer, <{2 * n} x i32> <{spread}>")
        p = self.address(tensor, index, vals)
        loaded = fw.op(f"call {wide} @llvm.masked.load.{suffix}.p0(ptr {p}, i32 {self.align}, <{2 * n} x i1> {mask2}, "
                       f"{wide} zeroinitializer)")
        evens = ", ".join(f"i32 {2 * k}" for k in range(n))
        return fw.op(f"shufflevector {wide} {loaded}, {wide} poison, <{n} x i32> <{evens}>")

    def emit(self, e, vals, mask) -> str:
        fw = self.fw
        if isinstance(e, sympy.Indexed):
            index = [Affine.from_sympy(i) for i in e.indices]
            if index[-1].coeff(self.v) == 2:  # stride 2: every other element of a double-width load
                return self.strided_load(tensor_of(e), index, vals, mask)
            if index[-1].coeff(self.v):
                p = self.address(tensor_of(e), index, vals)
                return fw.op(f"call {self.vt} {self.load_fn}(ptr {p}, i32 {self.align}, {self.mt} {mask}, "
                             f"{self.vt} zeroinitializer)")
            p = self.address(tensor_of(e), index, vals)
            return self.splat(fw.op(f"load {fw.ft}, ptr {p}"))
        if isinstance(e, sympy.Symbol):
            if e.name == "B":
                return self.splat(fw.op(f"sitofp i64 %B to {fw.ft}"))
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.w.scalar_names.index(e.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return self.splat(value if fw.ft == "double" else fw.op(f"fptrunc double {value} to float"))
        if e.is_Number:
            return self.splat(fw.fconst(float(e)))
        if isinstance(e, (sympy.Add, sympy.Mul)):
            args = [self.emit(a, vals, mask) for a in e.args]
            total = args[0]
            for a in args[1:]:
                total = fw.op(f"{'fadd' if isinstance(e, sympy.Add) else 'fmul'} {FAST} {self.vt} {total}, {a}")
            return total
        base = self.emit(e.base, vals, mask)  # a Pow, as vector_safe allowed
        if e.exp == -1:
            return fw.op(f"fdiv {FAST} {self.vt} {self.splat(fw.fconst(1.0))}, {base}")
        total = base
        for _ in range(int(e.exp) - 1):
            total = fw.op(f"fmul {FAST} {self.vt} {total}, {base}")
        return total


class ReductionRow(RegisterRow):
    """Vector partial sums over the innermost reduction variable, kept across every reduction
    loop and summed across lanes once per output element."""

    def __init__(self, *args, several: bool):
        super().__init__(*args)
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
        suffix = f"v{self.lanes}{'f32' if fw.ft == 'float' else 'f64'}"
        fw.declares.add(f"declare {fw.ft} @llvm.vector.reduce.fadd.{suffix}({fw.ft}, {self.vt})")
        scalar = fw.op(f"call {FAST} {fw.ft} @llvm.vector.reduce.fadd.{suffix}({fw.ft} {fw.fconst(0.0)}, "
                       f"{self.vt} {total})")
        _, p = self.w.address(fw, self.out, self.out_index, vals, self.shapes, self.ptr)
        fw.raw(f"store {fw.ft} {fw.fbin('fadd', fw.op(f'load {fw.ft}, ptr {p}'), scalar)}, ptr {p}")


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


class TiledReductionRow(ReductionRow):
    """A reduction row for each value of a small output variable at once: the broadcast reads
    are loaded once for all of them (fewer loads per FMA) and the rows are independent chains."""

    def __init__(self, *args, tile):
        super().__init__(*args, several=False)
        self.tile_var, self.tile_extent = tile
        self.tiles = [self.accs[0]]
        for _ in range(self.tile_extent - 1):
            row = []
            for _ in range(self.chunks):
                slot = self.fw.fresh("acc")
                self.fw.allocas.append(f"  {slot} = alloca {self.vt}")
                row.append(slot)
            self.tiles.append(row)

    def begin(self) -> None:
        for row in self.tiles:
            for slot in row:
                self.fw.raw(f"store {self.vt} zeroinitializer, ptr {slot}")

    def innermost(self, vals, row_bounds) -> None:
        for t, accs in enumerate(self.tiles):
            vals[self.tile_var] = str(t)
            self.accumulate_row(vals, row_bounds(), accs)
            vals.pop(self.tile_var, None)

    def end(self, vals) -> None:
        for t, accs in enumerate(self.tiles):
            vals[self.tile_var] = str(t)
            self.accs = [accs]
            super().end(vals)
            del vals[self.tile_var]
        self.accs = [self.tiles[0]]


def loop_order(outer, reduce_) -> list[str]:
    """Outer variables, then reductions; the last outer one goes innermost when it is the longer."""
    names_out, names_red = [v for v, _ in outer], [v for v, _ in reduce_]
    if len(outer) >= 2 and reduce_:
        last_out, last_red = outer[-1][1], reduce_[-1][1]
        batch_red = not isinstance(last_red, int)  # a sum over the batch (weight gradients): rows win
        if isinstance(last_out, int) and (last_out >= 16 if batch_red else last_out >= last_red):
            return names_out[:-1] + names_red + names_out[-1:]
    return names_out + names_red


def extent_minus_one(ext):
    return Affine.constant(ext - 1) if isinstance(ext, int) else "%Bm1"


def extent_value(ext) -> str:
    return str(ext) if isinstance(ext, int) else "%B"


def read_ranges(term, grid, shapes) -> list[Box]:
    """Every read's index must stay inside its tensor: out of range, the term is skipped."""
    extents = dict(grid)
    out = []
    for r in term.atoms(sympy.Indexed):
        for e, size in zip((Affine.from_sympy(i) for i in r.indices), shapes[tensor_of(r)]):
            if size == "B":
                if len(e.coeffs) == 1 and e.const == 0 and e.coeffs[0][1] == 1 and not isinstance(extents[e.coeffs[0][0]], int):
                    continue
                raise NotImplementedError(f"internal: batch index {e} is not the batch variable")
            if all(isinstance(extents.get(v), int) for v in e.vars):
                lo, hi = e.interval(extents)
                if lo >= 0 and hi <= size - 1:
                    continue
            out.append(Box(e, 0, size - 1))
    return out


def out_of_range(body, grid, shapes) -> bool:
    return bool(read_ranges(body, grid, shapes))


BARRIER_DECLARES = "declare void @llvm.x86.sse2.pause()\ndeclare i32 @sched_yield()"
BARRIER = """define internal void @cc_barrier(ptr %bar, ptr %sense, i64 %nt) {
entry:
  %single = icmp sle i64 %nt, 1
  br i1 %single, label %done, label %arrive
arrive:
  %s = load i32, ptr %sense
  %ns = xor i32 %s, 1
  store i32 %ns, ptr %sense
  %shared = getelementptr inbounds i32, ptr %bar, i64 1
  %old = atomicrmw add ptr %bar, i32 1 acq_rel
  %old64 = sext i32 %old to i64
  %nt1 = sub i64 %nt, 1
  %last = icmp eq i64 %old64, %nt1
  br i1 %last, label %release, label %spin
release:
  store atomic i32 0, ptr %bar monotonic, align 4
  store atomic i32 %ns, ptr %shared release, align 4
  br label %done
spin:
  %spins = phi i64 [ 0, %arrive ], [ %next, %pause ], [ 0, %yield ]
  %cur = load atomic i32, ptr %shared acquire, align 4
  %same = icmp eq i32 %cur, %ns
  br i1 %same, label %done, label %pause
pause:
  call void @llvm.x86.sse2.pause()
  %next = add i64 %spins, 1
  %long = icmp ugt i64 %next, 4000
  br i1 %long, label %yield, label %spin
yield:
  %ignored = call i32 @sched_yield()
  br label %spin
done:
  ret void
}
"""
