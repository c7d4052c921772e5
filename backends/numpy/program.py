"""The NumPy executable: buffers planned once per batch size, stages run in order."""
from __future__ import annotations

import numpy as np

from cnncompile.ir.expr import BATCH, Program
from .run import StageRunner

from cnncompile.ir.buffers import PERSISTENT, array_dtype, plan_buffers


class Env(dict):
    """Buffers by tensor name, plus the runtime scalars (batch size, learning rate, ...)."""

    def __init__(self, *args, scalars=None):
        super().__init__(*args)
        self.scalars = scalars if scalars is not None else {}


class NumpyExecutable:
    name = "numpy"

    def __init__(self, prog: Program, dtype=np.float32, manifest=None):
        self.prog, self.dtype = prog, np.dtype(dtype)
        self.state = {n: self.allocate(s, {}) for n, s in prog.tensors.items() if s.role in PERSISTENT}
        self.bound: dict[int, tuple[Env, dict]] = {}

    @staticmethod
    def codegen_options() -> tuple:
        return ()

    def manifest(self) -> None:
        """Nothing is generated: the stages run as they are."""
        return None

    def plan(self, batch: int, share: bool = True):
        """The buffer plan as this backend keeps it: every tensor in its own memory."""
        return plan_buffers(self.prog, batch, self.dtype.itemsize, share=False)

    def allocate(self, spec, sizes):
        shape = tuple(int(d.subs(sizes)) if hasattr(d, "subs") else d for d in spec.shape)
        return np.zeros(shape, dtype=array_dtype(spec, self.dtype))

    def bind(self, batch: int, share: bool = True) -> tuple[Env, dict]:
        """Buffers and stage plans for one batch size, made once and reused. The reference
        backend gives every tensor its own memory (``share`` is accepted for the LLVM interface)."""
        if batch not in self.bound:
            sizes = {BATCH: batch}
            env = Env(scalars={"B": batch})
            for name, spec in self.prog.tensors.items():
                env[name] = self.state[name] if spec.role in PERSISTENT else self.allocate(spec, sizes)
            shapes = {n: a.shape for n, a in env.items()}
            runners = {part: [StageRunner(s, sizes, shapes) for s in getattr(self.prog, part)]
                       for part in ("forward", "loss", "backward", "update")}
            self.bound[batch] = (env, runners)
        return self.bound[batch]

    def run(self, phase: str, batch: int, feeds: dict, scalars: dict | None = None, share: bool = True) -> Env:
        env, runners = self.bind(batch)
        for name, value in feeds.items():
            env[name][...] = value
        env.scalars.update(scalars or {})
        for part, k, _ in self.prog.phase_stages(phase):
            runners[part][k](env)
        return env

    def units(self, phase: str) -> list[list]:
        """The phase's stages, one at a time."""
        return [[stage] for _, _, stage in self.prog.phase_stages(phase)]

    def run_unit(self, phase: str, index: int, batch: int, scalars: dict | None = None, share: bool = True) -> Env:
        """Only stage ``index`` of ``units(phase)`` (the NaN guard replays a step this way)."""
        env, runners = self.bind(batch)
        env.scalars.update(scalars or {})
        part, k, _ = self.prog.phase_stages(phase)[index]
        runners[part][k](env)
        return env
