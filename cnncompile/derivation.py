"""The traced graph and the derived program without an executable: what `explain`, `summary` and
`schedule` read.

Generating and compiling machine code is what costs a first ``cc.compile`` its seconds (37 s for
ResNet-18); a table of shapes needs only the trace, and the formulas only the derivation. The
program is derived on first use, so ``summary`` never derives at all; no backend is imported (the
derivation, memoized per canonical stage in `ir.autodiff`, takes less than importing one would).
"""
from __future__ import annotations

import numpy as np
import sympy

from cnncompile.ir.autodiff import derive, derive_read, local_derivative
from cnncompile.ir.expr import Stage


class Derivation:
    """Duck-types the parts of a compiled model that the printers read: ``tracer``, ``heads``,
    ``prog``, ``input_shape``."""

    def __init__(self, net, tracer, heads, targets, loss_name, loss, optimizer, input_shape,
                 backend=None, dtype="float32"):
        self.net, self.tracer, self.heads, self.input_shape = net, tracer, heads, tuple(input_shape)
        self.targets, self.loss_name, self.loss, self.optimizer = targets, loss_name, loss, optimizer
        self.backend, self.dtype = backend, np.dtype(dtype)
        self._prog = self._formulas = None

    @property
    def prog(self):
        if self._prog is None:
            self._prog = self.derive(self.optimizer)
        return self._prog

    @property
    def formulas(self):
        """What `explain` prints: the program without the optimizer's update stages (the running
        statistics of batch norm, which it prints, come from the lowering); the whole program
        where one is at hand already."""
        if self._prog is None and self._formulas is None:
            self._formulas = self.derive(None)
        return self._prog if self._prog is not None else self._formulas

    def derive(self, optimizer):
        """The derived program, with ``optimizer``'s update stages (None: none)."""
        from .compiler import build_program
        outputs = [t.name for _, t in self.heads]
        return build_program(self.tracer, outputs, self.targets, self.loss_name, self.loss, optimizer)

    def layer_program(self, layer: str):
        """The program with only ``layer``'s backward stages derived (what `explain` of one layer
        prints): the derivation walks every stage as `derive` does, but transposes only that
        layer's reads; another layer's read only tells, cheaply, whether it contributes a gradient
        (which decides whether a later gradient is ``=`` or ``+=``). The whole program where one
        is at hand already."""
        if self._prog is not None:
            return self._prog
        prog = self.tracer.graph.lower([t.name for _, t in self.heads], self.loss_name)
        prog.labels, prog.grad_inputs = self.targets, []
        if self.loss is not None:
            rule = only_layer(layer)
            backward = derive(prog, prog.params, "train", rule)
            if prog.has_modes:
                backward += derive(prog, prog.params, "eval", rule)
            prog.backward = [s for s in backward if s.layer == layer]
        return prog

    def explain(self, layer=None, latex: bool = False, notation: str = "code") -> str:
        from .explain import explain
        return explain(self, layer, latex, notation)

    def summary(self) -> str:
        from .summary import summary
        return summary(self)

    def schedule(self, phase: str | None = None) -> str:
        from .schedule_text import schedule
        return schedule(self.prog, phase, self.dtype)


SKIPPED = Stage(out="", out_index=(), domain=(), body=sympy.Integer(0), layer="\0skipped")  # another layer's


def only_layer(layer: str):
    """A `derive` read rule: ``layer``'s reads transposed, any other's a stand-in where it contributes."""
    def rule(stage, r, accumulate, shape):
        if stage.layer == layer:
            return derive_read(stage, r, accumulate, shape)
        return [SKIPPED] if contributes(stage, r) else []
    return rule


def contributes(stage, r) -> bool:
    """Does the read have a nonzero local derivative (so its transposition is a stage)? A read in
    an arithmetic position does; one only in conditions or indicators is differentiated to tell."""
    return appears(stage.body, r) or local_derivative(stage, r) != 0


NO_DERIVATIVE = (sympy.KroneckerDelta, sympy.floor, sympy.ceiling)


def appears(e, r) -> bool:
    """``r`` occurs in ``e`` where a derivative sees it (not in a Piecewise condition, an indicator)."""
    if e == r:
        return True
    if isinstance(e, sympy.Piecewise):
        return any(appears(p.expr, r) for p in e.args)
    if isinstance(e, NO_DERIVATIVE) or isinstance(e, sympy.logic.boolalg.Boolean):
        return False
    return any(appears(a, r) for a in e.args)
