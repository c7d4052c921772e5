"""The buffer plan: where every working tensor lives in one arena, sharing memory where lifetimes allow.

A tensor's lifetime is the span of barrier-separated steps, in program order, from the first
stage that touches it to the last. Every phase runs a subsequence of that order, so two tensors
whose spans do not overlap are never live in the same phase at once and may share bytes.
Tensors fed from outside (inputs, labels, dropout masks) live from the start of each phase,
those read after it (outputs, losses, parameter gradients) to its end; parameters and optimizer
state are not planned here at all (the runtime owns them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .expr import PHASES, Program, concrete_shape, grad_name

ALIGN = 64
PERSISTENT = ("param", "buffer", "state")


@dataclass(frozen=True)
class Placement:
    offset: int  # bytes from the arena's start
    nbytes: int
    spans: tuple  # (first, last) step touching the tensor, per phase (see `lifetimes`)


@dataclass(frozen=True)
class BufferPlan:
    placements: dict  # tensor name → Placement
    arena_bytes: int  # with sharing
    unshared_bytes: int  # the sum of all working tensors, as if each had its own memory


def fed(prog: Program) -> set[str]:
    """Tensors written from outside before a phase runs."""
    return {n for n, s in prog.tensors.items() if s.role in ("input", "label")} | set(prog.noise)


def update_reads(prog: Program) -> set[str]:
    """Working tensors the update stages read: parameter gradients and batch statistics (the
    ``update`` phase is fed them; ``grads`` hands the statistics out for it)."""
    from .loops import stage_tensors

    return {n for s in prog.update for n in stage_tensors(s)
            if n != s.out and prog.tensors[n].role not in PERSISTENT}


def handed_in(prog: Program, phase: str) -> set[str]:
    """Tensors written from outside before ``phase`` runs."""
    return fed(prog) | (update_reads(prog) if phase == "update" else set())


def results(prog: Program, phase: str) -> set[str]:
    """Tensors read from outside after ``phase``: outputs and losses; parameter gradients after
    the phases that hand them out (in ``train`` the update consumes them inside the phase), and
    after ``grads`` the batch statistics an ``update`` phase reads."""
    names = {n for n, s in prog.tensors.items() if s.role == "loss"} | set(prog.outputs)
    if phase.startswith("grads"):
        names |= {grad_name(p) for p in prog.params + prog.grad_inputs}
    if phase == "grads":
        names |= update_reads(prog)
    return names


def lifetimes(prog: Program, steps: dict | None = None) -> dict[str, list[tuple[int, int]]]:
    """Per tensor, its live span in every phase that touches it, each phase laid out on one line
    after the other. ``steps[phase][position]`` numbers a phase's stages by barrier-separated
    step (fused stages share one, so memory freed inside a fused group is not reused before the
    group's barrier); by default every stage is its own step. Given ``steps``, only the phases it
    numbers are laid out (the ones compiled: a phase compiled later lays them out again)."""
    from .loops import stage_tensors  # (it reads the formulas: sympy)

    spans: dict[str, list[tuple[int, int]]] = {}
    base = 0
    for phase in PHASES if steps is None else [p for p in PHASES if p in steps]:
        inputs = handed_in(prog, phase)
        stages = prog.phase_stages(phase)
        numbers = range(len(stages)) if steps is None else steps[phase]
        local: dict[str, tuple[int, int]] = {}
        for (_, _, stage), number in zip(stages, numbers):
            step = base + number
            for name in stage_tensors(stage):
                lo, hi = local.get(name, (step, step))
                local[name] = (min(lo, step), max(hi, step))
        outputs = results(prog, phase)
        for name in inputs | outputs:  # alive from the phase's start, or to its end
            lo, hi = local.get(name, (base, base))
            local[name] = (base - 1 if name in inputs else lo, base + len(stages) if name in outputs else hi)
        for name, span in local.items():
            spans.setdefault(name, []).append(span)
        base += len(stages) + 2
    return spans


def overlap(a: list, b: list) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


INTEGER_TYPES = {"int": np.int64, "index": np.int32}  # labels; argmax window positions (small)


def array_dtype(spec, float_dtype) -> np.dtype:
    """The element type of a tensor's buffer."""
    return np.dtype(INTEGER_TYPES.get(spec.dtype, float_dtype))


def nbytes(spec, batch: int, float_bytes: int) -> int:
    count = 1
    for d in concrete_shape(spec.shape, batch):
        count *= int(d)
    return count * (INTEGER_TYPES[spec.dtype]().itemsize if spec.dtype in INTEGER_TYPES else float_bytes)


def plan_buffers(prog: Program, batch: int, float_bytes: int = 4, steps: dict | None = None,
                 share: bool = True, spans: dict | None = None) -> BufferPlan:
    """First-fit placement, largest tensors first: each goes at the lowest aligned offset that
    does not overlap a placed tensor whose lifetime overlaps its own. ``spans``: the program's
    `lifetimes`, where known already (they do not depend on the batch; computing them reads
    every stage)."""
    spans = lifetimes(prog, steps) if spans is None else spans
    always = [(-1, 10 ** 9)]
    working = [n for n, s in prog.tensors.items() if s.role not in PERSISTENT]
    sizes = {n: nbytes(prog.tensors[n], batch, float_bytes) for n in working}
    life = {n: always if (n not in spans or not share) else spans[n] for n in working}
    placed: dict[str, Placement] = {}
    for name in sorted(working, key=lambda n: (-sizes[n], n)):
        busy = sorted((p.offset, p.offset + p.nbytes) for p in placed.values() if overlap(p.spans, life[name]))
        offset = 0
        for lo, hi in busy:
            if offset + sizes[name] <= lo:
                break
            offset = max(offset, aligned(hi))
        placed[name] = Placement(offset, sizes[name], tuple(life[name]))
    arena = max((p.offset + p.nbytes for p in placed.values()), default=0)
    return BufferPlan(placed, aligned(arena), sum(aligned(s) for s in sizes.values()))


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
