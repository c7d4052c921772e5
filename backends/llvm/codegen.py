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

import re

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.functions import function_of
from cnncompile.ir.expr import PHASES, Program, tensor_of
from cnncompile.ir.layout import pack_lanes
from cnncompile.ir.parity import pack_parity, parity_name
from cnncompile.ir.loops import BATCH_LAST, ClassNest, fm_bounds, shapes_of, stage_tensors
from cnncompile.ir.residue import substitute
from cnncompile.ir.schedule import REGISTER_ROWS, Kernel, Scheduler, reductions_closed, vector_epilogue
from .emit import FAST, BodyWriter, FunctionWriter


class ModuleWriter:
    def __init__(self, prog: Program, ftype: str, prefix: str, checked: bool = False, fuse: bool = True):
        self.prog, self.ft, self.prefix, self.checked = prog, ftype, prefix, checked
        self.current_stage = 0
        self.scheduler = Scheduler(prog, fuse, lanes=vector_lanes(ftype))
        self.steps: dict[str, list] = {}  # phase → per stage of the phase, the index of the kernel running it
        self.units: list[list[int]] = []  # the train phase's kernels, as indices into prog.all_stages()
        self.kernel_functions: dict[tuple, tuple] = {}  # stages (by id) → (function name, its tensors)
        self.stage_index = {id(s): k for k, s in enumerate(prog.all_stages())}
        self.tensor_ids = {name: k for k, name in enumerate(prog.tensors)}
        self.scalar_names = sorted({s.name for st in self.all_stages() for s in st.body.free_symbols
                                    if isinstance(s, sympy.Symbol) and not s.is_integer} - {"B"} - set(prog.tensors))
        # (runtime scalars only: a read, and its tensor's name, count among sympy's free symbols)
        self.functions: list[str] = []
        self.signatures: dict[str, str] = {}  # stage function → its declaration, for split modules
        self.bodies: dict[str, str] = {}  # function text without its name and comments → the function's name
        self.users: dict[str, list[str]] = {}  # function name → the kernels (stage labels) that call it
        self.declares: set[str] = set()
        self.elided: dict[int, frozenset] = {}  # train kernel (by id) → outputs it computes but never stores
        self.elide: frozenset = frozenset()  # those of the kernel being written
        self.packed: set[str] = set()  # even/odd copies (ir.parity) the kernel being written may load from

    @property
    def elided_tensors(self) -> list[str]:
        return sorted(set().union(*self.elided.values()))

    def all_stages(self):
        return self.prog.all_stages()

    # ----- one kernel ----------------------------------------------------------------------------
    def kernel_function(self, kernel: Kernel, elide: frozenset = frozenset()) -> tuple[str, list[str]]:
        """A kernel's nests as one function (its main stage and the epilogue stages fused into it);
        the same kernel in another phase is the same function, unless it stores less there
        (``elide``: outputs no other kernel of that phase reads, see `unobserved_outputs`)."""
        key = (tuple(id(s) for s in kernel.stages), elide)
        if key not in self.kernel_functions:
            self.elide = elide
            self.kernel_functions[key] = self.write_kernel(kernel)
            self.elide = frozenset()
        return self.kernel_functions[key]

    def write_kernel(self, kernel: Kernel) -> tuple[str, list[str]]:
        self.current_stage = self.stage_index[id(kernel.main)]
        self.packed = {t for s in kernel.stages for t in s.packed}  # copies its strided reads load from
        tensors = sorted(set().union(*(stage_tensors(s) for s in kernel.stages)))
        fw = FunctionWriter(self.ft)
        if kernel.siblings:
            self.sibling_nest(fw, kernel, tensors)
        for group, pairs in ([] if kernel.siblings else kernel.class_groups):
            if len(group) == 1:
                self.class_nest(fw, kernel.nests[group[0]], kernel.templates[group[0]], tensors, kernel.epilogue)
            else:
                self.merged_nest(fw, [kernel.nests[k] for k in group], kernel.templates[group[0]][0], tensors, pairs)
        self.declares |= fw.declares
        params = ", ".join(f"ptr noalias %a{j}" for j in range(len(tensors)))
        body = (f"({params}, ptr noalias %scalars, i64 %B, i64 %tid, i64 %nt) noinline {{\n"
                f"entry:\n  %Bm1 = sub i64 %B, 1\n" + "\n".join(fw.allocas) + "\n" + "\n".join(fw.lines)
                + "\n  ret void\n}\n")
        code = "\n".join(line for line in body.split("\n") if not line.lstrip().startswith(";"))
        label = kernel_label(kernel)
        if code in self.bodies:  # the same loops over other buffers (repeated blocks, phases): compile once
            name = self.bodies[code]
            if label not in self.users[name]:
                self.users[name].append(label)
            return name, tensors
        name = f"@{self.prefix}_f{len(self.bodies)}_{symbol_part(kernel.main)}"  # after the stage it runs first
        self.bodies[code], self.users[name] = name, [label]
        self.signatures[name] = f"declare void {name}({', '.join(['ptr'] * (len(tensors) + 1))}, i64, i64, i64)"
        self.functions.append(f"define internal void {name}" + body)
        return name, tensors

    def headed(self, text: str) -> str:
        """A function's text after comment lines naming every kernel that calls it (outside the
        body, whose text is what identical kernels share)."""
        name = function_name(text)
        return "".join(f"; {label}\n" for label in self.users.get(name, [])) + text

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

    def scalar_epilogue(self, fw, out, out_index, vals, shapes, ptr, epilogue, value=None) -> None:
        """The epilogue stages at one output point, on the main's finished value (loaded back
        when not given: it was just stored, so it is in L1)."""
        if value is None:
            _, p = self.address(fw, out, out_index, vals, shapes, ptr)
            value = fw.op(f"load {self.ft}, ptr {p}")
        made = {out: value}
        for stage, body in epilogue:
            writer = self.body_writer(fw, vals, shapes, ptr, made)
            made[stage.out] = writer.as_float(writer.emit(body))
            self.store(fw, stage.out, out_index, vals, shapes, ptr, made[stage.out])

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
                def row_bounds():  # evaluated where the row is (a tiled row sets its own variable first)
                    return (self.bound(fw, bounds[v][0], vals, lower=True),
                            self.bound(fw, bounds[v][1], vals, lower=False))

                fw.raw(f"; vector row {v}")
                if k == vector.first_reduce:  # the row is the only reduction: accumulate it right here
                    vector.begin()
                    vector.innermost(vals, row_bounds)
                    vector.end(vals)
                else:
                    vector.innermost(vals, row_bounds)
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
                start = fw.op(f"sdiv i64 {fw.imul(n, '%tid')}, %nt")
                next_start = fw.op(f"sdiv i64 {fw.imul(n, fw.iadd('%tid', 1))}, %nt")
                if unit > 1:
                    start, next_start = fw.imul(start, unit), fw.imul(next_start, unit)
                stop = fw.op(f"sub nsw i64 {next_start}, 1")
                lo, hi = fw.smax(lo, start), fw.smin(hi, stop)

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
        elem = ELEMENT.get(self.prog.tensors[tensor].dtype, self.ft)
        at = self.offset(fw, tensor, index, vals, shapes)
        if self.checked:
            at = self.checked_offset(fw, tensor, at, shapes)
        return elem, fw.op(f"getelementptr inbounds {elem}, ptr {ptr[tensor]}, i64 {at}", "p")

    def checked_offset(self, fw, tensor, at, shapes) -> str:
        """Bounds-checked mode: an offset outside the buffer is reported (see `report_when`) and
        replaced by 0, so the access stays inside."""
        bad = fw.op(f"icmp uge i64 {at}, {self.tensor_size(fw, tensor, shapes)}")
        self.report_when(fw, bad, tensor, at)
        return fw.op(f"select i1 {bad}, i64 0, i64 {at}")

    @staticmethod
    def tensor_size(fw, tensor, shapes):
        """Elements in ``tensor``'s buffer (an i64 value where the batch extent is in it)."""
        size = 1
        for d in shapes[tensor]:
            size = fw.imul(size, "%B") if d == "B" else (size * d if isinstance(size, int) else fw.imul(size, d))
        return size

    def report_when(self, fw, bad, tensor, at) -> None:
        """Where ``bad`` holds, the access is reported in the scalar block's last four slots
        (stage, tensor, offset, 1): the runtime raises IndexError naming them."""
        base = len(self.scalar_names)

        def report():
            for k, value in enumerate((self.current_stage, self.tensor_ids[tensor], at, 1)):
                slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {base + k}", "p")
                fw.raw(f"store double {fw.op(f'sitofp i64 {value} to double')}, ptr {slot}")

        fw.when(bad, report)

    def store(self, fw, tensor, index, vals, shapes, ptr, value):
        elem, p = self.address(fw, tensor, index, vals, shapes, ptr)
        fw.raw(f"store {elem} {value}, ptr {p}")

    def body_writer(self, fw, vals, shapes, ptr, made=None) -> BodyWriter:
        """Scalar code for a body at the point ``vals``; reads of tensors in ``made`` are those values."""
        def load_read(r):
            if made and tensor_of(r) in made:
                return made[tensor_of(r)], "f"
            index = [Affine.from_sympy(i) for i in r.indices]
            elem, p = self.address(fw, tensor_of(r), index, vals, shapes, ptr)
            value = fw.op(f"load {elem}, ptr {p}")
            if elem == "i32":  # window positions are stored narrow; index arithmetic is i64
                return fw.op(f"sext i32 {value} to i64"), "i"
            return value, ("i" if elem == "i64" else "f")

        def symbol(s):
            if s.name in vals:
                return vals[s.name], "i"
            if s.name == "B":
                return "%B", "i"
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.scalar_names.index(s.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return (value if self.ft == "double" else fw.op(f"fptrunc double {value} to float")), "f"

        return BodyWriter(fw, load_read, symbol)

    def statement(self, fw, stage, term, out_index, nest, vals, shapes, ptr, accumulate) -> None:
        writer = self.body_writer(fw, vals, shapes, ptr)
        value = writer.as_float(writer.emit(term))
        _, p = self.address(fw, stage.out, out_index, vals, shapes, ptr)
        if stage.combine == "max":
            take, larger = running_max(fw, self.ft, "i1", value, fw.op(f"load {self.ft}, ptr {p}"))
            fw.raw(f"store {self.ft} {larger}, ptr {p}")
            for (r, _), name in zip(stage.reduce, stage.argmax):
                _, ap = self.address(fw, name, out_index, vals, shapes, ptr)
                old = fw.op(f"load i32, ptr {ap}")
                where = fw.op(f"trunc i64 {fw.affine(nest.subst[r], vals)} to i32")
                fw.raw(f"store i32 {fw.op(f'select i1 {take}, i32 {where}, i32 {old}')}, ptr {ap}")
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
        drivers = []
        for phase, plan in self.phase_kernels():
            drivers.append(self.driver(phase, [self.kernel_function(kernel, self.elided.get(id(kernel), frozenset()))
                                               for kernel in plan]))
            if phase in PHASES:
                kernel_of = {id(s): step for step, kernel in enumerate(plan) for s in kernel.stages}
                self.steps[phase] = [kernel_of[id(s)] for _, _, s in self.prog.phase_stages(phase)]
        head = "\n".join(sorted(self.declares | {BARRIER_DECLARES}))
        functions = [self.headed(f) for f in self.functions]
        if n <= 1:
            return [head + "\n\n" + BARRIER + "\n" + "\n".join(functions) + "\n" + "\n".join(drivers)]
        bins = [[] for _ in range(n)]
        sizes = [sum(len(d) for d in drivers)] + [0] * (n - 1)
        for text in sorted(functions, key=len, reverse=True):
            k = sizes.index(min(sizes))
            bins[k].append(text.replace("define internal void", "define void", 1))
            sizes[k] += len(text)
        elsewhere = [self.signatures[function_name(f)] for b in bins[1:] for f in b]
        first = [head, BARRIER, *elsewhere, *bins[0], *drivers]
        return ["\n".join(first)] + ["\n".join([head, *b]) for b in bins[1:] if b]

    def phase_kernels(self):
        """Each phase's kernels in order, and a driver per kernel of the train phase (the NaN
        guard replays a step kernel by kernel; profiles time them)."""
        for phase in self.prog.phase_names():
            plan = self.scheduler.kernels(phase)
            if phase == UNITS_PHASE:
                self.elided = unobserved_outputs(plan, self.prog)
            yield phase, plan
            if phase == UNITS_PHASE:
                self.units = [[self.stage_index[id(s)] for s in kernel.stages] for kernel in plan]
                for j, kernel in enumerate(plan):
                    yield f"{UNITS_PHASE}_u{j}", [kernel]

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


def unobserved_outputs(plan: list[Kernel], prog: Program) -> dict[int, frozenset]:
    """Per kernel (by id), the values it makes, hands to its own epilogue stages in registers,
    and that nothing else in the phase reads or writes, nor the caller (outputs, loss, state):
    their stores are dead (ResNet-20's batch-norm outputs before the residual add, input
    gradients before ReLU′: up to 2 MiB each, written to memory and never read back). Only where
    every nest keeps its rows in registers and writes them whole (a fresh vector row)."""
    touched: dict[str, set[int]] = {}  # tensor → the kernels that read or write it
    for kernel in plan:
        for s in kernel.stages:
            for t in {tensor_of(r) for r in s.reads()} | {s.out}:
                touched.setdefault(t, set()).add(id(kernel))
    observed = set(prog.outputs) | {prog.loss_name}
    out = {}
    for kernel in plan:
        if not kernel.epilogue or any(t[0].kind not in REGISTER_ROWS or t[0].scatter or len(t) != 1
                                      for t in kernel.templates):
            continue
        fresh = all(t[0].fresh for t in kernel.templates)
        dead = frozenset(s.out for s in kernel.stages if (s is not kernel.main or fresh)
                         and touched[s.out] == {id(kernel)} and s.out not in observed
                         and prog.tensors[s.out].role in ("activation", "grad"))
        if dead:
            out[id(kernel)] = dead
    return out


def kernel_label(kernel: Kernel) -> str:
    """What a kernel runs, in words: its main stage's layer, role and output, then what it fuses."""
    stages = kernel.stages
    text = stage_label(stages[0])
    return text + (f" + {len(stages) - 1} fused: " + ", ".join(s.out for s in stages[1:]) if len(stages) > 1 else "")


def stage_label(stage) -> str:
    """``layer '0' forward 0.out.conv``: how `explain` and `model.schedule()` name a stage."""
    return f"layer '{stage.layer}' {stage.role} {stage.out}"


def symbol_part(stage, limit: int = 48) -> str:
    """A stage as part of an LLVM function name, in letters, digits and _: its layer, its role and
    its output (named from the layer on where it is the layer's own: ``conv1_forward_out_conv``,
    ``conv1_backward_d_weight``)."""
    grad, out = (True, stage.out[4:]) if stage.out.startswith("dL/d") else (False, stage.out)
    if stage.layer and out.startswith(stage.layer + "."):
        out = out[len(stage.layer) + 1:]
    text = f"{stage.layer}_{stage.role}_{'d_' if grad else ''}{out}"
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]", "_", text)).strip("_")[:limit]


def function_name(text: str) -> str:
    """The ``@name`` a function's text defines (after its comment lines)."""
    return re.search(r"define (?:internal )?void (@[\w.$-]+)", text)[1]


def vector_lanes(ftype: str) -> int:
    """Elements per ymm register: 8 floats, 4 doubles."""
    return 8 if ftype == "float" else 4


def code_program(prog: Program, ftype: str) -> Program:
    """The program the code is written from: with packed layouts (`layout.pack_lanes`) and
    even/odd copies of stride-2 reads (`parity.pack_parity`); bounds-checked builds run the same
    program and schedule, each access checked."""
    return pack_parity(pack_lanes(prog, vector_lanes(ftype)))


UNITS_PHASE = "train"  # the phase whose kernels can also be run one at a time
ELEMENT = {"int": "i64", "index": "i32"}  # integer tensors' LLVM element types (floats: the program's)


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


def running_max(fw, ty: str, bool_ty: str, value: str, cur: str) -> tuple[str, str]:
    """One step of a max (scalars or vectors): take ``value`` where it is greater, or where it
    is the first NaN; ties keep the earlier value. Returns (taken, the new maximum)."""
    greater = fw.op(f"fcmp ogt {ty} {value}, {cur}")
    first_nan = fw.op(f"and {bool_ty} {fw.op(f'fcmp uno {ty} {value}, {value}')}, {fw.op(f'fcmp ord {ty} {cur}, {cur}')}")
    take = fw.op(f"or {bool_ty} {greater}, {first_nan}")
    return take, fw.op(f"select {bool_ty} {take}, {ty} {value}, {ty} {cur}")


def even_lanes(n: int) -> str:
    """A shuffle pattern spreading W lanes onto the even lanes of 2W (odd lanes take lane 0 of a
    zero second operand: masked off), for rows that stride memory by 2."""
    return ", ".join(f"i32 {k // 2 if k % 2 == 0 else n}" for k in range(2 * n))


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
        self.lanes = 8 if fw.ft == "float" else 4
        self.vt = f"<{self.lanes} x {fw.ft}>"
        self.mt = f"<{self.lanes} x i1>"
        self.chunks = (extent + self.lanes - 1) // self.lanes
        self.align = 4 if fw.ft == "float" else 8
        self.suffix = f"v{self.lanes}{'f32' if fw.ft == 'float' else 'f64'}"  # intrinsics' vector type
        self.load_fn = f"@llvm.masked.load.{self.suffix}.p0"
        fw.declares.add(f"declare {self.vt} {self.load_fn}(ptr, i32, {self.mt}, {self.vt})")
        self.partials = {1: 4, 2: 2}.get(self.chunks, 1)  # independent FMA chains per output vector
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
        vectors of 8, 4, 2 and 1 lanes: a masked store costs ~16 cycles on Zen 4 (measured: 6.6 ns
        against 1.1 ns for a load, blend and store), these a cycle or two, and touch nothing else."""
        fw = self.fw
        ty, lanes = ty or fw.ft, lanes or self.lanes
        vector = f"<{lanes} x {ty}>"
        size = {"float": 4, "double": 8, "i32": 4, "i64": 8}[ty]
        if self.w.checked:  # one masked store of the first ``count`` lanes, each lane checked
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
        (`ir.parity`: ``copy[..., c mod 2, v + ⌊c/2⌋]``, one contiguous masked load), else a masked
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
        fw = self.fw
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
        if isinstance(e, sympy.Piecewise):
            result = self.emit(e.args[-1].expr, vals, mask, made)
            for pair in reversed(e.args[:-1]):
                a, b = (self.emit(x, vals, mask, made) for x in pair.cond.args)
                pred = {">": "ogt", "<": "olt", ">=": "oge", "<=": "ole"}[pair.cond.rel_op]
                cond = fw.op(f"fcmp {pred} {self.vt} {a}, {b}")
                result = fw.op(f"select {self.mt} {cond}, {self.vt} {self.emit(pair.expr, vals, mask, made)}, "
                               f"{self.vt} {result}")
            return result
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
        fw = self.fw
        if isinstance(e, sympy.Symbol):
            if e.name == "B":
                return self.splat(fw.op(f"sitofp i64 %B to {fw.ft}"))
            slot = fw.op(f"getelementptr inbounds double, ptr %scalars, i64 {self.w.scalar_names.index(e.name)}", "p")
            value = fw.op(f"load double, ptr {slot}")
            return self.splat(value if fw.ft == "double" else fw.op(f"fptrunc double {value} to float"))
        if e.is_number:
            return self.splat(fw.fconst(float(e)))
        row = function_of(e)
        if row is not None:  # (schedule.vector_safe admitted only rows with a vector lowering)
            return row.vector(fw, self.vt, self.suffix, self.emit(e.args[0], vals, mask, made))
        if isinstance(e, (sympy.Add, sympy.Mul)):
            args = [self.emit(a, vals, mask, made) for a in e.args]
            total = args[0]
            for a in args[1:]:
                total = fw.op(f"{'fadd' if isinstance(e, sympy.Add) else 'fmul'} {FAST} {self.vt} {total}, {a}")
            return total
        base = self.emit(e.base, vals, mask, made)  # a Pow, as vector_safe allowed
        if e.exp == -1:
            return fw.op(f"fdiv {FAST} {self.vt} {self.splat(fw.fconst(1.0))}, {base}")
        if e.exp.q == 2:  # batch norm's σ, 1/σ, 1/σ³: integer powers of a square root
            fw.declares.add(f"declare {self.vt} @llvm.sqrt.{self.suffix}({self.vt})")
            root = fw.op(f"call {FAST} {self.vt} @llvm.sqrt.{self.suffix}({self.vt} {base})")
            total = root
            for _ in range(abs(int(e.exp.p)) // 2):
                total = fw.op(f"fmul {FAST} {self.vt} {total}, {base}")
            if e.exp < 0:
                total = fw.op(f"fdiv {FAST} {self.vt} {self.splat(fw.fconst(1.0))}, {total}")
            return total
        total = base
        for _ in range(int(e.exp) - 1):
            total = fw.op(f"fmul {FAST} {self.vt} {total}, {base}")
        return total


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


def extent_value(ext) -> str:
    return str(ext) if isinstance(ext, int) else "%B"


BARRIER_DECLARES = "declare void @llvm.x86.sse2.pause()\ndeclare i32 @sched_yield()"
BARRIER = """define internal void @cc_barrier(ptr %bar, ptr %sense, i64 %nt) noinline {
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
