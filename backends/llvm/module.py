"""A program as LLVM modules: a function per kernel (identical kernels written once), a driver per
phase calling them with the threads' barrier between (`drivers`). Written in parts: the phases a
trainer runs first, the others when first run, each part calling the kernel functions the parts
before it defined; a part is split into modules of about equal size that LLVM optimizes in
parallel processes."""
from __future__ import annotations

import hashlib

import sympy

from cnncompile.ir.expr import PHASES, Program
from cnncompile.ir.loops import stage_tensors

from .deadstores import unobserved_outputs
from .drivers import BARRIER_DECLARES, assemble, declaration, driver, unit_drivers
from .emit import FunctionWriter
from .names import function_name, kernel_label, symbol_part
from .nests import Nests
from .schedule import Kernel, Scheduler
from .target import Target, resolve
from .phases import UNITS_PHASE


MODULE_BYTES = 120_000  # of IR per module (LLVM: about 0.5 s on a Zen 3 core): enough pieces to share out
MAX_MODULES = 16


class ModuleWriter(Nests):
    """The program (rewritten for the target: `codegen.code_program`) as LLVM modules."""

    def __init__(self, prog: Program, ftype: str, prefix: str, checked: bool = False, fuse: bool = True,
                 target: Target | str | None = None, choices: dict | None = None, known: dict | None = None):
        """``known``: the kernel functions earlier parts of this program defined (`defined`), called
        rather than written again."""
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
        self.known = dict(known or {})  # body digest → (name, declaration): defined by an earlier part
        self.digests: dict[str, str] = {}  # function this writer defined → its body's digest
        self.tag = ""  # in the names of the functions the part being written defines
        self.plans: dict[str, list] = {}  # phase → its kernels (`plan`)
        self.phase_calls: dict[str, list] = {}  # phase → (function, tensors) per kernel (`calls`)
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
        digest = hashlib.sha256(code.encode()).hexdigest()
        if digest in self.known:  # defined by an earlier part: called, not written again
            name = self.known[digest][0]
            self.bodies[code], self.users[name] = name, [label]
            return name, tensors
        name = f"@{self.prefix}_{self.tag}f{len(self.bodies)}_{symbol_part(kernel.main)}"  # after its first stage
        self.bodies[code], self.users[name], self.digests[name] = name, [label], digest
        self.functions.append(f"define internal void {name}" + body)
        return name, tensors

    def defined(self) -> dict[str, tuple[str, str]]:
        """The functions this writer defined, by body digest: what the next parts are told (``known``)."""
        texts = {function_name(f): f for f in self.functions}
        return {**self.known, **{d: (name, declaration(texts[name])) for name, d in self.digests.items()}}

    def headed(self, text: str) -> str:
        """A function's text after comment lines naming every kernel that calls it (outside the
        body, whose text is what identical kernels share)."""
        name = function_name(text)
        return "".join(f"; {label}\n" for label in self.users.get(name, [])) + text

    def plan(self, phase: str) -> list[Kernel]:
        """The phase's kernels (the scheduler's), once; the train phase's also give the values
        its kernels keep in registers (`unobserved_outputs`) and the stages of each kernel."""
        if phase not in self.plans:
            plan = self.plans[phase] = self.scheduler.kernels(phase)
            if phase == UNITS_PHASE:
                self.elided = unobserved_outputs(plan, self.prog)
                self.units = [[self.stage_index[id(s)] for s in kernel.stages] for kernel in plan]
            if phase in PHASES:
                kernel_of = {id(s): step for step, kernel in enumerate(plan) for s in kernel.stages}
                self.steps[phase] = [kernel_of[id(s)] for _, _, s in self.prog.phase_stages(phase)]
        return self.plans[phase]

    def calls(self, phase: str) -> list[tuple[str, list[str]]]:
        """Per kernel of the phase, the function running it and the tensors it takes."""
        if phase not in self.phase_calls:
            self.phase_calls[phase] = [self.kernel_function(kernel, self.elided.get(id(kernel), frozenset()))
                                       for kernel in self.plan(phase)]
        return self.phase_calls[phase]

    def driver(self, phase: str) -> str:
        return driver(self.prefix, phase, self.calls(phase), self.tensor_ids)

    def head(self) -> str:
        return "\n".join(sorted(self.declares | {BARRIER_DECLARES}))

    def module(self) -> str:
        """The whole program as one module (what ``model.source("llvm")`` shows)."""
        return self.modules(1)[0]

    def modules(self, n: int) -> list[str]:
        """The whole program, every phase and kernel, as ``n`` modules, with a driver per kernel of
        the train phase too (the NaN guard replays a step kernel by kernel; profiles time them)."""
        drivers = [self.driver(phase) for phase in self.prog.phase_names()]
        drivers += unit_drivers(self.prefix, UNITS_PHASE, self.calls(UNITS_PHASE), self.tensor_ids)
        return assemble(self.head(), [self.headed(f) for f in self.functions], drivers, [], n, internal=n <= 1)

    def part(self, phases: list[str], tag: str = "") -> list[str]:
        """``phases``' drivers and the kernel functions they call that no earlier part defined (named
        with ``tag``), as modules of about `MODULE_BYTES` each (compiled in parallel); functions
        of earlier parts are declared."""
        self.tag, first = tag, len(self.functions)
        drivers = [self.driver(phase) for phase in phases]
        self.tag = ""
        new = self.functions[first:]
        earlier = dict(self.known.values()) | {function_name(f): declaration(f) for f in self.functions[:first]}
        called = {name for phase in phases for name, _ in self.calls(phase)} - {function_name(f) for f in new}
        n = min(MAX_MODULES, 1 + sum(len(text) for text in new + drivers) // MODULE_BYTES)
        return assemble(self.head(), [self.headed(f) for f in new], drivers, sorted(earlier[n] for n in called), n)


