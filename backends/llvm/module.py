"""One LLVM module per program: a function per kernel (identical kernels written once), a driver
per phase calling them with the threads' barrier between, split into parts of about equal size
that LLVM optimizes in parallel processes."""
from __future__ import annotations

import sympy

from cnncompile.ir.expr import PHASES, Program
from cnncompile.ir.loops import stage_tensors

from .deadstores import unobserved_outputs
from .emit import FunctionWriter
from .names import function_name, kernel_label, symbol_part
from .nests import Nests
from .schedule import Kernel, Scheduler
from .target import Target, resolve
from .phases import UNITS_PHASE



class ModuleWriter(Nests):
    """The program (rewritten for the target: `codegen.code_program`) as LLVM modules."""

    def __init__(self, prog: Program, ftype: str, prefix: str, checked: bool = False, fuse: bool = True,
                 target: Target | str | None = None, choices: dict | None = None):
        self.prog, self.ft, self.prefix, self.checked = prog, ftype, prefix, checked
        self.target = resolve(target)
        self.lanes = self.target.vector_lanes(ftype)  # elements per vector register
        self.current_stage = 0
        self.scheduler = Scheduler(prog, fuse, target=self.target, ftype=ftype, choices=choices)  # (tuner's)
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
        self.packed: set[str] = set()  # even/odd copies (schedule.parity) the kernel being written may load from

    @property
    def elided_tensors(self) -> list[str]:
        return sorted(set().union(*self.elided.values()))

    def all_stages(self):
        return self.prog.all_stages()

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
