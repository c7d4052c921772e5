"""Kernels: which stages run together, and in which loops.

Per phase, stages are grouped into kernels: a main stage that finishes each output value at one
place in its loops (in registers, for the vector templates), and the elementwise stages that only
need that value (bias, ReLU, batch norm's output, a ReLU′ mask, the optimizer's update of the
parameter whose gradient it completes) computed in its epilogue, right where the value is, instead
of in passes of their own behind a barrier. An epilogue stage may move up to its producer only if
no stage in between touches what it reads or writes. Sums over the same loops that read nothing of
each other run side by side (siblings). Kernels are separated by the threads' barrier.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, Stage, tensor_of, var
from cnncompile.ir.loops import ClassNest, covers_outputs, lower, read_ranges, shapes_of
from cnncompile.ir.residue import substitute

from ..target import Target, resolve
from .choices import fingerprint, valid
from .templates import REGISTER_ROWS, template
from .vectors import interleaved_pairs, vector_epilogue

SIBLING_WINDOW = 8  # how far ahead siblings are looked for (the derivation writes them side by side)


@dataclass
class Kernel:
    """A main stage and the elementwise stages computed in its epilogue; ``epilogue[k]`` is
    stage k's body over the main's variables, with every read of a value the kernel just made
    left as a read of that tensor at the output point (the code generator puts the value there)."""

    main: Stage
    nests: list  # the main's ClassNests
    templates: list  # per nest, per term
    epilogue: list = field(default_factory=list)  # (Stage, body over the main's grid)
    lanes: int = 0  # vector width the code generator uses (the Scheduler's, from its Target)
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
    """Kernels for every phase of one program on one target (default: `target.resolve`'s); each
    stage is lowered and templated once. ``ftype``: the program's float type ("float", "double").
    ``choices``: the tuner's overrides, kernel fingerprint (`choices.fingerprint` of its main
    stage) → choice; empty (the default): the target's rules."""

    def __init__(self, prog: Program, fuse: bool = True, target: Target | str | None = None, ftype: str = "float",
                 choices: dict | None = None):
        self.prog, self.fuse, self.target = prog, fuse, resolve(target)
        self.lanes = self.target.vector_lanes(ftype)
        self.ftype, self.choices = ftype, dict(choices or {})
        self.lowered: dict[int, tuple] = {}  # id(stage) → (nests, templates); stages live in prog
        self.read_sets: dict[int, set] = {}
        self.epilogues: dict[tuple, object] = {}
        self.grids: dict[tuple, tuple] = {}  # (main, stage) by id → `on_main_grid`

    def single(self, stage: Stage) -> Kernel:
        """One stage as a kernel of its own."""
        if id(stage) not in self.lowered:
            nests = lower(stage, self.prog)
            choice = self.choice(stage)
            self.lowered[id(stage)] = nests, [[template(n, t, self.prog, self.target, self.lanes, choice)
                                               for t in n.terms] for n in nests]
        return Kernel(stage, *self.lowered[id(stage)], lanes=self.lanes)

    def choice(self, stage: Stage) -> dict:
        """The tuner's choice for the kernel ``stage`` leads ({}: the rules; one that is not a
        valid choice is never applied)."""
        if not self.choices:
            return {}
        found = self.choices.get(fingerprint(stage, self.prog, self.target, self.ftype), {})
        return found if valid(found) else {}

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
        while k < min(len(remaining), SIBLING_WINDOW) and len(kernel.members) < self.target.siblings:
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
        members = kernel.members
        made = [m.made for m in members]  # (kept up to date below: asked once per remaining stage)
        main_reads = [self.reads(m.main) for m in members]
        k = 0
        while k < len(remaining):
            stage = remaining[k]
            reads = self.reads(stage)
            at = next((j for j, outs in enumerate(made) if reads & outs), None)
            if at is not None and not any(stage.out in r for r in main_reads):
                host = members[at]
                body = self.epilogue_body(host, stage)
                if body is not None and self.movable(remaining[:k], stage):
                    host.epilogue.append((stage, body))
                    made[at].add(stage.out)
                    remaining.pop(k)
                    k = 0  # a later stage may now read what this one made
                    continue
            k += 1

    def epilogue_body(self, kernel: Kernel, stage: Stage):
        """`epilogue_body`, remembered: every phase asks again about the same stages."""
        key = (id(kernel.main), tuple(id(s) for s, _ in kernel.epilogue), id(stage))
        if key not in self.epilogues:
            def grid():
                if (id(kernel.main), id(stage)) not in self.grids:
                    self.grids[(id(kernel.main), id(stage))] = on_main_grid(kernel, stage)
                return self.grids[(id(kernel.main), id(stage))]
            self.epilogues[key] = epilogue_body(kernel, stage, self.prog, grid)
        return self.epilogues[key]

    def movable(self, between: list[Stage], stage: Stage) -> bool:
        """May ``stage`` run before ``between``? Only if none of them writes what it reads or
        touches what it writes."""
        reads = self.reads(stage)
        for s in between:
            if s.out in reads or s.out == stage.out or set(s.argmax) & reads or stage.out in self.reads(s):
                return False
        return True


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


def on_main_grid(kernel: Kernel, stage: Stage) -> tuple:
    """``stage``'s body over the main's variables, and the reads in it (the same for every
    epilogue the kernel grows: `Scheduler.epilogue_body` keeps it)."""
    main = kernel.main
    body = stage.body.xreplace({var(v): var(m) for (v, _), (m, _) in zip(stage.domain, main.domain)})
    return body, list(body.atoms(sympy.Indexed))


def epilogue_body(kernel: Kernel, stage: Stage, prog: Program, grid=None):
    """``stage``'s body over the main's variables if it can run in the epilogue, else None: it is
    elementwise over the main's output points (same extents, identity index), reads what the
    kernel made only at the output point, reads everything else in range, and writes nothing the
    main reads (earlier epilogue stages read it, if at all, at the same point: they run first).
    ``grid``: a function giving `on_main_grid`'s answer (remembered by the caller)."""
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
    body, reads = grid() if grid is not None else on_main_grid(kernel, stage)
    point = tuple(Affine.var(m) for m, _ in main.domain)

    def at_point(r):
        return tuple(Affine.from_sympy(i) for i in r.indices) == point

    if not all(at_point(r) for r in reads if tensor_of(r) in kernel.made):
        return None
    if not all(at_point(r) for _, earlier in kernel.epilogue for r in earlier.atoms(sympy.Indexed)
               if tensor_of(r) == stage.out):
        return None
    others = [r for r in reads if tensor_of(r) not in kernel.made]
    if read_ranges(sympy.Add(*others), main.domain, shapes_of(prog, {tensor_of(r) for r in others})):
        return None
    rest = body.xreplace({r: sympy.Symbol(f"made{k}") for k, r in enumerate(reads) if tensor_of(r) in kernel.made})
    for nest, templates in zip(kernel.nests, kernel.templates):
        if templates[0].kind in REGISTER_ROWS and not templates[0].scatter:  # (scatter: lane by lane)
            if not vector_epilogue(substitute(rest, nest.subst), templates[0].row, {v for v, _ in nest.grid}, prog):
                return None
    return body
