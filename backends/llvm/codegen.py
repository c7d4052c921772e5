"""The LLVM code generator's entry: the program rewritten for a target, then written as modules.

- `code_program`: the program the code is written from (channel lanes and even/odd copies);
- `module.ModuleWriter`: kernels as functions, a driver per phase (`nests`, `access`, `rows`,
  `row_templates` write the loops, accesses and register templates the schedule chose);
- `schedule/`: the schedule itself, computed from the `target.Target`.
"""
from __future__ import annotations

from cnncompile.ir.expr import Program

from .module import UNITS_PHASE, ModuleWriter
from .schedule import pack_lanes, pack_parity
from .target import Target, resolve

__all__ = ["ModuleWriter", "UNITS_PHASE", "code_program"]


def code_program(prog: Program, ftype: str, target: Target | str | None = None) -> Program:
    """The program the code is written from: with packed layouts (`schedule.lanes`) and even/odd
    copies of stride-2 reads (`schedule.parity`) for ``target``; bounds-checked builds run the
    same program and schedule, each access checked."""
    target = resolve(target)
    return pack_parity(pack_lanes(prog, target.vector_lanes(ftype), target))
