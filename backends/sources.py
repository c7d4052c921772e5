"""What `model.source()` shows: the same program, as each backend runs it."""
from __future__ import annotations

import numpy as np
import sympy

from cnncompile.ir.errors import CompileError
from cnncompile.ir.residue import residue_classes


def render(prog, kind: str, dtype, executable=None) -> str:
    """``executable``: an LLVM one shows the code it runs, every phase compiled first."""
    compiled = executable if hasattr(executable, "load_all") else None
    if compiled is not None and kind in ("llvm", "asm"):
        compiled.load_all()
    if kind == "llvm":
        return compiled.ir_text if compiled is not None else _llvm_text(prog, dtype)
    if kind == "asm":
        if compiled is None:
            from .llvm.jit import Compiled
            compiled = Compiled(_llvm_text(prog, dtype))
        return compiled.assembly()
    if kind == "numpy":
        return numpy_text(prog)
    raise CompileError(f"source kind must be 'llvm', 'asm' or 'numpy', got {kind!r}")


def _llvm_text(prog, dtype) -> str:
    """The IR the LLVM backend would write for ``prog`` (from its packed copy, as it does)."""
    from .llvm.codegen import ModuleWriter, code_program
    ftype = "float" if np.dtype(dtype) == np.float32 else "double"
    return ModuleWriter(code_program(prog, ftype), ftype, "cc_source").module()


def numpy_text(prog) -> str:
    """Each stage's residue classes and grids: the loops NumPy runs as whole-array operations."""
    lines = []
    for part in ("forward", "loss", "backward", "update"):
        lines.append(f"# {part}")
        for stage in getattr(prog, part):
            op = "+=" if stage.accumulate else "="
            lines.append(f"{stage.out} {op} {stage.combine or 'elementwise'} of {sympy.sstr(stage.body)}")
            for geo in residue_classes(stage):
                grid = ", ".join(f"{v}<{e}" for v, e in geo.grid)
                where = "; ".join(f"{c.lo} ≤ {c.expr} ≤ {c.hi}" for c in geo.constraints)
                subst = ", ".join(f"{v}={e}" for v, e in geo.subst.items() if str(e) != v)
                lines.append(f"    class [{subst}] grid ({grid})" + (" empty" if geo.empty else "")
                             + (f" where {where}" if where else ""))
    return "\n".join(lines)
