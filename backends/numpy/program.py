"""The NumPy executable: buffers planned per batch size, stages run in order.

Every tensor has its own memory here, planned for its batch size, so only the last few batch
sizes' buffers are kept (before, every batch size seen kept its own).
"""
from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict

import numpy as np

from cnncompile.ir.expr import BATCH, Program, concrete_shape
from cnncompile.backends.env import Env
from .run import StageRunner

from cnncompile.ir.buffers import PERSISTENT, array_dtype, plan_buffers

KEEP_BATCH_SIZES = 4  # a fit with validation uses four: the batch, the epoch's last, and evaluate's two
_live: "weakref.WeakSet[NumpyExecutable]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A lock held by one of the parent's threads would stay held in a forked child."""
    for executable in list(_live):
        executable.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NumpyExecutable:
    name = "numpy"

    def __init__(self, prog: Program, dtype=np.float32, manifest=None):
        self.prog, self.dtype = prog, np.dtype(dtype)
        self.state = {n: self.allocate(s, {}) for n, s in prog.tensors.items() if s.role in PERSISTENT}
        self.bound: OrderedDict[int, tuple[Env, dict]] = OrderedDict()  # newest last
        self.lock = threading.RLock()  # one phase at a time: callers hold it from copy-in to copy-out
        _live.add(self)

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
        shape = concrete_shape(spec.shape, sizes.get(BATCH))
        return np.zeros(shape, dtype=array_dtype(spec, self.dtype))

    def bind(self, batch: int, share: bool = True) -> tuple[Env, dict]:
        """Buffers and stage plans for one batch size, made once and reused. The reference
        backend gives every tensor its own memory (``share`` is accepted for the LLVM interface).
        The last `KEEP_BATCH_SIZES` batch sizes are kept."""
        with self.lock:
            if batch in self.bound:
                self.bound.move_to_end(batch)
                return self.bound[batch]
            sizes = {BATCH: batch}
            env = Env(scalars={"B": batch})
            for name, spec in self.prog.tensors.items():
                env[name] = self.state[name] if spec.role in PERSISTENT else self.allocate(spec, sizes)
            shapes = {n: a.shape for n, a in env.items()}
            runners = {part: [StageRunner(s, sizes, shapes) for s in getattr(self.prog, part)]
                       for part in ("forward", "loss", "backward", "update")}
            self.bound[batch] = (env, runners)
            while len(self.bound) > KEEP_BATCH_SIZES:
                self.bound.popitem(last=False)
            return self.bound[batch]

    def kept(self) -> dict:
        """What this executable holds between calls beyond its state: the buffers of the batch
        sizes kept."""
        with self.lock:
            nbytes = sum(a.nbytes for env, _ in self.bound.values() for n, a in env.items()
                         if self.prog.tensors[n].role not in PERSISTENT)
            return {"arenas": len(self.bound), "bytes": nbytes, "batch_sizes": list(self.bound)}

    def run(self, phase: str, batch: int, feeds: dict, scalars: dict | None = None, share: bool = True) -> Env:
        """Run a phase. The returned buffers are shared by every later call: read them while
        holding ``self.lock``."""
        with self.lock:
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
        with self.lock:
            env, runners = self.bind(batch)
            env.scalars.update(scalars or {})
            part, k, _ = self.prog.phase_stages(phase)[index]
            runners[part][k](env)
            return env
