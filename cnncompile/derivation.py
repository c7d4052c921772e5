"""The traced graph and the derived program without an executable: what `explain`, `summary` and
`schedule` read.

Generating and compiling machine code is what costs a first ``cc.compile`` its seconds (37 s for
ResNet-18); a table of shapes needs only the trace, and the formulas only the derivation. The
program is derived on first use (a stored warm-start entry of the same network is used instead,
where one exists), so ``summary`` never derives at all.
"""
from __future__ import annotations

import numpy as np


class Derivation:
    """Duck-types the parts of a compiled model that the printers read: ``tracer``, ``heads``,
    ``prog``, ``input_shape``."""

    def __init__(self, net, tracer, heads, targets, loss_name, loss, optimizer, input_shape,
                 backend=None, dtype="float32"):
        self.net, self.tracer, self.heads, self.input_shape = net, tracer, heads, tuple(input_shape)
        self.targets, self.loss_name, self.loss, self.optimizer = targets, loss_name, loss, optimizer
        self.backend, self.dtype = backend, np.dtype(dtype)
        self._prog = None

    @property
    def prog(self):
        if self._prog is None:
            self._prog = self.cached_program() or self.derive()
        return self._prog

    def derive(self):
        from .compiler import build_program
        outputs = [t.name for _, t in self.heads]
        return build_program(self.tracer, outputs, self.targets, self.loss_name, self.loss, self.optimizer)

    def cached_program(self):
        """The program a ``cc.compile`` of this network stored (the same key), or None."""
        from . import program_cache
        from .compiler import backend_class
        try:
            cls = backend_class(self.backend)
            name = program_cache.key(self.tracer.graph, [t.name for _, t in self.heads], self.loss_name,
                                     self.optimizer, cls.name, self.dtype, cls.codegen_options())
        except Exception:  # noqa: BLE001 - no usable backend to key on: derive instead
            return None
        entry = program_cache.load(name)
        return entry["prog"] if entry is not None and "prog" in entry else None

    def explain(self, layer=None, latex: bool = False, notation: str = "code") -> str:
        from .explain import explain
        return explain(self, layer, latex, notation)

    def summary(self) -> str:
        from .summary import summary
        return summary(self)

    def schedule(self, phase: str | None = None) -> str:
        from .schedule_text import schedule
        return schedule(self.prog, phase, self.dtype)
