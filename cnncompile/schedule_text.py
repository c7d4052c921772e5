"""``model.schedule()``: how the LLVM backend runs each phase, read from the scheduler's objects.

Per phase, per kernel (one generated function, threads' barrier after it): the stages it runs
(its main stage, those fused into its epilogue, sibling sums in the same loops), then per residue
class of the main stage its loop nest in the manner of Halide's ``print_loop_nest``: each loop
outermost first, which one the threads split, blocked and paired loops, the vector row with its
width, and the register template (row, tiled_row, reduction_row, tiled_reduction_row, max_row,
map_row, scalar). The labels are those of the comments in front of each function of
``model.source("llvm")`` (`emit --llvm`), whose names carry the main stage too.
"""
from __future__ import annotations

import numpy as np

from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import PHASES

TEMPLATES = {
    "row": "an output row in vector registers across the sums",
    "tiled_row": "a block of output rows in registers, the input row loaded once for the block",
    "reduction_row": "vector partial sums along a reduction variable",
    "tiled_reduction_row": "vector partial sums for each value of a small output variable at once",
    "max_row": "running maximum and winner per lane, stored once",
    "map_row": "elementwise, whole vectors along the row",
    "scalar": "plain loops, left to LLVM's vectorizers",
}


def schedule(prog, phase: str | None = None, dtype=np.float32, target=None, choices=None) -> str:
    """The schedule of one phase (or of every phase) on ``target`` (default: the resolved one) as text
    (``choices``: the tuner's per-kernel overrides, see `backends.llvm.schedule.choices`)."""
    from cnncompile.backends.llvm.codegen import code_program
    from cnncompile.backends.llvm.deadstores import unobserved_outputs
    from cnncompile.backends.llvm.schedule import Scheduler
    from cnncompile.backends.llvm.target import resolve
    phases = prog.phase_names() if hasattr(prog, "phase_names") else list(PHASES)  # (what the code writer runs)
    if phase is not None and phase not in phases:
        raise CompileError(f"schedule: no phase {phase!r}; the phases are {', '.join(phases)}")
    ftype = "float" if np.dtype(dtype) == np.float32 else "double"
    target = resolve(target)
    lanes = target.vector_lanes(ftype)
    code = code_program(prog, ftype, target)
    scheduler = Scheduler(code, target=target, ftype=ftype, choices=choices)
    parts = []
    for name in [phase] if phase else phases:
        if not code.phase_stages(name):
            continue
        plan = scheduler.kernels(name)
        kept = unobserved_outputs(plan, code) if name == "train" else {}
        parts.append(phase_text(name, plan, lanes, kept))
    return "\n\n".join(parts)


def phase_text(phase: str, plan, lanes: int, kept: dict) -> str:
    stages = sum(len(k.stages) for k in plan)
    lines = [f"phase {phase}: {stages} stages in {len(plan)} kernels ({lanes} lanes per vector; "
             f"the threads meet at a barrier after each kernel)"]
    for k, kernel in enumerate(plan):
        lines += kernel_lines(k, kernel, kept.get(id(kernel), frozenset()))
    return "\n".join(lines)


def kernel_lines(k: int, kernel, kept: frozenset) -> list[str]:
    from cnncompile.backends.llvm.names import stage_label, symbol_part
    lines = [f"kernel {k}: {stage_label(kernel.main)}  [function *_{symbol_part(kernel.main)}]"]
    for stage, _ in kernel.epilogue:
        lines.append(f"  fuses in its epilogue: {stage_label(stage)}")
    for sibling in kernel.siblings:
        lines.append(f"  runs beside it in the same loops: {stage_label(sibling.main)}"
                     + "".join(f"; epilogue {s.out}" for s, _ in sibling.epilogue))
    if kept:
        lines.append(f"  kept in registers, never stored: {', '.join(sorted(kept))}")
    for j, (nest, templates) in enumerate(zip(kernel.nests, kernel.templates)):
        lines += nest_lines(j, len(kernel.nests), nest, templates, kernel.lanes)
    return lines


def nest_lines(j: int, count: int, nest, templates, lanes: int) -> list[str]:
    where = ", ".join(f"{v}={subst_text(e)}" for v, e in nest.subst.items() if not renamed(e))
    head = f"  class {j + 1} of {count}" + (f" ({where})" if where else "")
    if nest.empty:
        return [head + ": no term reaches it; set to zero"]
    initialised = nest.needs_init and not (nest.terms and all(t.fresh for t in templates))  # (as nests.init_nest)
    lines = [head + (": initialised to the sum's identity first" if initialised else ":")]
    for t, tpl in enumerate(templates):
        term = f" term {t + 1} of {len(templates)}:" if len(templates) > 1 else ""
        lines.append(f"   {term} template {tpl.kind} ({TEMPLATES.get(tpl.kind, '')})")
        lines += loop_lines(tpl, dict(nest.grid), bool(nest.outer), lanes)
    return lines


def loop_lines(tpl, extents: dict, split: bool, lanes: int) -> list[str]:
    """The template's loops, outermost first, Halide style: parallel / for / vectorized."""
    first, unit = tpl.split
    lines, depth = [], 4
    if not split:
        lines.append(" " * depth + "(thread 0 alone: no output variable to share)")
    for k, v in enumerate(tpl.order):
        ext = extent_text(extents.get(v))
        if v == tpl.row and k == len(tpl.order) - 1:
            lines.append(" " * depth + row_text(tpl, ext, lanes))
            continue
        kind = "parallel" if k == 0 and split else "for"
        text = f"{kind} {v} in 0..{ext}"
        blocked = tpl.block or (tpl.tile if tpl.kind == "tiled_row" else None)
        if blocked and blocked[0] == v:
            text = f"{kind} {v} in blocks of {blocked[1]} (of {blocked[2]})"
        if tpl.pair == v:
            text += ", two at a time"
        if k == 0 and split:
            text += " (the threads' split" + (f", in units of {unit})" if unit > 1 else ")")
        lines.append(" " * depth + text + ":")
        depth += 2
    if tpl.kind == "tiled_reduction_row" and tpl.tile:
        lines.append(" " * depth + f"for each {tpl.tile[0]} in 0..{extent_text(tpl.tile[1])} at once (unrolled)")
    if tpl.row is not None and (not tpl.order or tpl.order[-1] != tpl.row):
        lines.append(" " * depth + row_text(tpl, extent_text(tpl.extent), lanes))
    return lines


def row_text(tpl, ext: str, lanes: int) -> str:
    vectors = -(-tpl.extent // lanes) if isinstance(tpl.extent, int) else "?"
    text = f"vectorized {tpl.row} in 0..{ext} ({vectors} × {lanes} lanes"
    if tpl.kind == "tiled_row" and tpl.tile:
        text += f", × {tpl.tile[1]} values of {tpl.tile[0]} in registers"
    if tpl.scatter:
        text += ", written lane by lane"
    return text + (", stored once, whole)" if tpl.fresh else ")")


def renamed(e) -> bool:
    """Is a residue class's map of a variable just a loop variable (no stride, no offset)?"""
    vars_ = getattr(e, "vars", None)
    return vars_ is not None and len(vars_) == 1 and e.coeff(vars_[0]) == 1 and e.const == 0


def subst_text(e) -> str:
    return str(e.to_sympy()).replace("*", "·") if hasattr(e, "to_sympy") else str(e)


def extent_text(ext) -> str:
    if ext is None:
        return "(bounded by constraints)"
    return f"{ext - 1}" if isinstance(ext, int) else f"{ext}-1"
