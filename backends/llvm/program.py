"""The LLVM executable: one native call per phase, run by every worker thread at once.

Buffers are owned here (64-byte aligned). Each phase function runs all its stages; the threads
split each stage's outermost loop and meet at a barrier in native code, so a ``train_step`` is
one ctypes call per thread.

Working memory is one arena per sharing mode, sized for the largest buffer plan seen: a smaller
batch is laid out by its own plan inside it (before, every batch size kept an arena of its own:
predicting with batch sizes 1..300 held 1.9 GB). The views of the last few batch sizes are kept.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pickle
import re
import threading
import weakref
from collections import OrderedDict

import numpy as np

from cnncompile.ir.buffers import PERSISTENT, array_dtype, lifetimes, plan_buffers
from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import SEGMENT, Program, concrete_shape
from cnncompile.backends.env import Env
from .drivers import BARRIER_DECLARES, assemble, declare, unit_drivers, unit_phase
from .jit import Compilation, Compiled
from .phases import UNITS_PHASE
from .target import Target, resolve
from .workers import pool

ALIGN = 64
PHASE_SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_int64, ctypes.c_void_p)
KEEP_BATCH_SIZES = 8  # buffer views (not memory) kept per executable
_loaded: dict[str, Compiled] = {}
_loaded_lock = threading.Lock()
_live: "weakref.WeakSet[LLVMExecutable]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: locks held by others are fresh again, and a
    barrier left mid-phase by the parent's threads starts from zero."""
    global _loaded_lock
    _loaded_lock = threading.Lock()
    for code in list(_loaded.values()):
        code.lock = threading.Lock()
    for executable in list(_live):
        executable.lock = threading.RLock()
        executable.barrier[...] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def aligned_zeros(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.zeros(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)


def thread_count() -> int:
    wanted = os.environ.get("CNNCOMPILE_THREADS")
    return max(1, int(wanted)) if wanted else max(1, min(2, len(os.sched_getaffinity(0))))


def eager_phases(prog: Program) -> list[str]:
    """The phases compiled with the program: what a trainer runs (``fit``: train, then evaluate's
    loss_eval; ``predict``). Every other phase (gradients alone, train-mode losses, the update
    alone, a step's kernels one at a time) is compiled when first run, reusing these kernels."""
    return ["predict"] + (["loss_eval"] if prog.loss else []) + (["train"] if prog.update else [])


def choices_key(choices: dict) -> list:
    """The tuner's choices in a fixed order (for keys and hashes)."""
    return sorted((k, sorted(v.items())) for k, v in choices.items())


def program_prefix(code_prog: Program, ftype: str, target: Target, checked: bool, choices: dict | None) -> str:
    """The name every function of the program starts with, from everything that decides its code
    (the rewritten program, pickled, and the options): known before any IR is written, so the
    first modules compile while the rest are written, and the phases compiled later on first use
    are named after it too. Two programs share it only if they write the same code."""
    options = repr((ftype, target.key(), checked, choices_key(choices or {})))
    digest = hashlib.sha256(pickle.dumps(code_prog, protocol=4) + options.encode())
    return "cc_" + digest.hexdigest()[:16]


class ProgramCode:
    """One program's machine code in this process, shared by every executable of it: the phases
    compiled with it, and each other phase compiled on first use (written by one `ModuleWriter`
    that calls the kernel functions compiled before, so names never clash)."""

    def __init__(self, manifest: dict, ftype: str, target: Target, checked: bool, choices: dict | None,
                 use_cache: bool, writer=None, compilation: Compilation | None = None):
        """``compilation``: the first modules' (`manifest["texts"]`) compilation, under way."""
        self.prefix, self.manifest, self.ftype, self.target = manifest["prefix"], manifest, ftype, target
        self.checked, self.choices, self.use_cache = checked, choices, use_cache
        self.writer = writer  # (made when a later phase is first written, if not handed over)
        self.parts: list[Compiled] = []
        self.defined: set[str] = set()  # every function the parts define
        self.add_part(manifest["texts"], compilation)
        self.facts = {p: {"steps": {p: manifest["steps"][p]} if p in manifest["steps"] else {},
                          "calls": manifest["calls"][p]} for p in manifest["phases"]}
        if UNITS_PHASE in self.facts:
            self.facts[UNITS_PHASE].update(units=manifest["units"], elided=manifest["elided"])
        self.lock = threading.Lock()

    @classmethod
    def write(cls, code_prog: Program, prefix: str, phases: list[str], ftype: str, target: Target, checked: bool,
              choices: dict | None, use_cache: bool) -> "ProgramCode":
        """Write ``phases`` one after the other, each part's modules compiling (in a worker
        process) while the next part is written."""
        from .codegen import ModuleWriter
        writer = ModuleWriter(code_prog, ftype, prefix, checked=checked, target=target, choices=choices)
        compilation, texts = Compilation(target, use_cache), []
        for phase in phases:
            part = writer.part([phase])
            compilation.add(part)
            texts += part
        manifest = {"prefix": prefix, "texts": texts, "scalar_names": writer.scalar_names, "steps": dict(writer.steps),
                    "units": writer.units, "program": code_prog, "elided": writer.elided_tensors,
                    "spans": lifetimes(code_prog, writer.steps), "phases": phases,
                    "calls": {p: writer.calls(p) for p in phases}, "known": writer.defined()}
        return cls(manifest, ftype, target, checked, choices, use_cache, writer, compilation)

    def load(self, phase: str) -> dict:
        """The phase's facts (its steps, calls, units), compiling its code first if needed."""
        with self.lock:
            if phase not in self.facts:
                if phase.startswith(f"{UNITS_PHASE}_u"):
                    self.load_units()
                else:
                    self.load_phase(phase)
            return self.facts[phase]

    def load_phase(self, phase: str) -> None:
        writer = self.writer
        if writer is None:
            from .codegen import ModuleWriter
            writer = self.writer = ModuleWriter(self.manifest["program"], self.ftype, self.prefix, checked=self.checked,
                                                target=self.target, choices=self.choices, known=self.manifest["known"])
        self.add_part(writer.part([phase], tag=f"{phase}_"))
        laid_out = "grads" if phase.startswith(SEGMENT) else phase  # (segments use the grads phase's buffers)
        writer.plan(laid_out)
        self.facts[phase] = {"steps": {laid_out: writer.steps[laid_out]}, "calls": writer.calls(phase)}
        if phase == UNITS_PHASE:
            self.facts[phase].update(units=writer.units, elided=writer.elided_tensors)

    def load_units(self) -> None:
        """Drivers that run the train phase's kernels one at a time (no kernel is written again)."""
        if UNITS_PHASE not in self.facts:
            self.load_phase(UNITS_PHASE)
        calls = self.facts[UNITS_PHASE]["calls"]
        tensor_ids = {name: k for k, name in enumerate(self.manifest["program"].tensors)}
        self.add_part(assemble(BARRIER_DECLARES, [], unit_drivers(self.prefix, UNITS_PHASE, calls, tensor_ids),
                               sorted({declare(name, len(tensors)) for name, tensors in calls}), 1))
        for j in range(len(calls)):
            self.facts[unit_phase(UNITS_PHASE, j)] = {"steps": {}, "calls": [calls[j]]}

    def add_part(self, texts: list[str], compilation: Compilation | None = None) -> None:
        """Compile and load a part, once every function it calls is known to be defined (an
        unresolved call would jump to address 0)."""
        defined = self.defined | {m for t in texts for m in re.findall(r"^define (?:internal )?void (@[\w.$-]+)", t, re.M)}
        missing = {m for t in texts for m in re.findall(r"^declare void (@cc_[\w.$-]+)", t, re.M)} - defined
        if missing:
            raise RuntimeError(f"internal: generated code calls undefined functions {sorted(missing)[:3]}")
        self.parts.append(Compiled(texts, self.use_cache, self.target, compilation))
        self.defined = defined

    def address(self, phase: str) -> int:
        return self.parts[0].address(f"{self.prefix}_{phase}")


class LLVMExecutable:
    name = "llvm"

    def __init__(self, prog: Program, dtype=np.float32, use_cache: bool = True, manifest: dict | None = None,
                 target: Target | str | None = None, choices: dict | None = None, phases: list[str] | None = None):
        """``manifest`` is what an earlier compile of the same program generated (see
        `manifest()`, stored by the program cache): given, no IR is written again. ``target``:
        what the code is written for (a `Target` or its name; default `target.resolve`'s).
        ``choices``: the tuner's per-kernel overrides of the schedule (`tuner`; default: none,
        the target's rules). ``phases``: those compiled now (default `eager_phases`; the others
        compile when first run)."""
        self.dtype = np.dtype(dtype)
        self.target = resolve(target)
        self.choices = dict(choices or {})  # (what model.schedule() shows)
        self.checked = os.environ.get("CNNCOMPILE_CHECK") == "1"
        if self.checked and self.target.split:
            raise CompileError(
                f"CNNCOMPILE_CHECK=1 with the 16-lane target on this {self.target.cpu}, which has no AVX-512: LLVM "
                f"miscompiles the bounds checks of 16-lane code split into 8-lane halves (wrong gradients, seen "
                f"with LLVM 20 at every optimization level but none). Check the 8-lane code here "
                f"(CNNCOMPILE_TARGET=avx2), or the 16-lane code on a host with AVX-512")
        ftype = "float" if self.dtype == np.float32 else "double"
        with _loaded_lock:  # (one compile at a time: a program's functions are defined once in the process)
            if manifest is None:  # (a stored manifest needs none of the code generator, nor sympy)
                from .codegen import code_program
                code_prog = code_program(prog, ftype, self.target)
                prefix = program_prefix(code_prog, ftype, self.target, self.checked, choices)
                if prefix not in _loaded:
                    _loaded[prefix] = ProgramCode.write(code_prog, prefix, list(phases or eager_phases(code_prog)),
                                                        ftype, self.target, self.checked, choices, use_cache)
            elif manifest["prefix"] not in _loaded:
                _loaded[manifest["prefix"]] = ProgramCode(manifest, ftype, self.target, self.checked, choices, use_cache)
            self.code = _loaded[prefix if manifest is None else manifest["prefix"]]
        manifest = self._manifest = self.code.manifest
        self.prog = manifest["program"]  # the program the code was written from (with packed layouts)
        self.scalar_names, self.steps = manifest["scalar_names"], dict(manifest["steps"])  # (a copy: it grows)
        self.unit_stages = manifest["units"]
        self.spans = manifest["spans"]  # every tensor's lifetime (`ir.buffers.lifetimes`), batch-independent
        if sorted(self.steps) != sorted(manifest["phases"]):  # (the spans lay out exactly the phases compiled first)
            raise RuntimeError(f"internal: the stored steps cover {sorted(self.steps)}, the code {manifest['phases']}")
        self.elided = set(manifest["elided"])  # train-phase values kept in registers only (never stored)
        self.phases = {}  # phase → its native function, once this executable has run it
        self.state = {n: self.allocate(s, 1) for n, s in prog.tensors.items() if s.role in PERSISTENT}
        self.arenas: dict[bool, np.ndarray] = {}  # per sharing mode: the largest plan's bytes
        self.bound: OrderedDict[tuple, tuple] = OrderedDict()  # (batch, share) → (env, pointers), newest last
        self.lock = threading.RLock()  # one phase at a time: callers hold it from copy-in to copy-out
        self.threads = thread_count()
        self.workers = pool(self.threads)
        self.barrier = aligned_zeros((16,), np.int32)
        self.scalars = aligned_zeros((len(self.scalar_names) + 4,), np.float64)  # + bounds-check report
        _live.add(self)

    @staticmethod
    def codegen_options(target: Target | str | None = None, choices: dict | None = None) -> tuple:
        """What, besides the program, decides the generated IR (part of the program cache key):
        the bounds checks, the target, and (a tuned compile, even one that kept every rule) the
        tuner's choices. (Modules are split by size, not by the number of cores.)"""
        tuned = () if choices is None else (("tuned", choices_key(choices)),)
        return ("checked" if os.environ.get("CNNCOMPILE_CHECK") == "1" else "plain", resolve(target).key()) + tuned

    def manifest(self) -> dict:
        """The generated IR and the facts the runtime needs about it, for the program cache."""
        return self._manifest

    def allocate(self, spec, batch: int) -> np.ndarray:
        shape = concrete_shape(spec.shape, batch)
        return aligned_zeros(shape, array_dtype(spec, self.dtype))

    def plan(self, batch: int, share: bool = True):
        """The buffer plan, with lifetimes counted in kernels (fused stages run, and so hold
        their memory, together and where their kernel runs)."""
        return plan_buffers(self.prog, batch, self.dtype.itemsize, share=share, spans=self.spans)

    def bind(self, batch: int, share: bool = True):
        """Buffers for one batch size: views laid out by the batch's buffer plan in the arena of
        its sharing mode, which grows to the largest plan seen (views into a smaller, older arena
        are dropped then). ``share=False`` gives every tensor its own memory, so that intermediate
        values stay readable after a phase (pictures of activations, tests comparing every tensor)."""
        with self.lock:
            key = (batch, share)
            if key in self.bound:
                self.bound.move_to_end(key)
                return self.bound[key]
            plan = self.plan(batch, share)
            arena = self.arenas.get(share)
            if arena is None or arena.nbytes < plan.arena_bytes:
                arena = self.arenas[share] = aligned_zeros((plan.arena_bytes,), np.uint8)
                for old in [k for k in self.bound if k[1] == share]:
                    del self.bound[old]
            env = Env(scalars={"B": batch})
            for name, spec in self.prog.tensors.items():
                if spec.role in PERSISTENT:
                    env[name] = self.state[name]
                    continue
                at = plan.placements[name]
                shape = concrete_shape(spec.shape, batch)
                dtype = array_dtype(spec, self.dtype)
                env[name] = arena[at.offset:at.offset + at.nbytes].view(dtype).reshape(shape)
            pointers = (ctypes.c_void_p * len(env))(*(env[n].ctypes.data for n in self.prog.tensors))
            self.bound[key] = (env, pointers)
            while len(self.bound) > KEEP_BATCH_SIZES:
                self.bound.popitem(last=False)
            return self.bound[key]

    def kept(self) -> dict:
        """What this executable holds between calls beyond its state: the arenas (one per sharing
        mode, each the size of the largest plan seen) and the batch sizes whose views are kept."""
        with self.lock:
            return {"arenas": len(self.arenas), "bytes": sum(a.nbytes for a in self.arenas.values()),
                    "batch_sizes": [b for b, _ in self.bound]}

    def function(self, phase: str):
        """The phase's native function, its code compiled on first use (by any executable of
        this program); a phase with kernels of its own lays the buffers out again with them."""
        if phase not in self.phases:
            facts = self.code.load(phase)
            if any(p not in self.steps for p in facts["steps"]):
                self.steps.update(facts["steps"])
                self.spans = lifetimes(self.prog, self.steps)
                self.bound.clear()  # (views laid out without the phase)
            if "units" in facts:
                self.unit_stages, self.elided = facts["units"], set(facts["elided"])
            self.phases[phase] = PHASE_SIGNATURE(self.code.address(phase))
        return self.phases[phase]

    def load_all(self) -> None:
        """Every phase compiled (what ``model.source`` shows)."""
        with self.lock:
            for phase in self.prog.phase_names():
                self.function(phase)
            for j in range(len(self.units(UNITS_PHASE))):
                self.function(unit_phase(UNITS_PHASE, j))

    @property
    def ir_text(self) -> str:
        """The IR of the code compiled so far."""
        return "\n".join(part.ir_text for part in self.code.parts)

    def assembly(self) -> str:
        return "\n".join(part.assembly() for part in self.code.parts)

    def units(self, phase: str) -> list[list]:
        """The phase's kernels, each as the stages it runs, in order (the train phase only)."""
        if phase != UNITS_PHASE:
            raise ValueError(f"internal: kernels run one at a time in the {UNITS_PHASE} phase only, not {phase}")
        with self.lock:
            self.function(UNITS_PHASE)
        stages = self.prog.all_stages()
        return [[stages[k] for k in unit] for unit in self.unit_stages]

    def run_unit(self, phase: str, index: int, batch: int, scalars: dict | None = None, share: bool = True) -> Env:
        """Only kernel ``index`` of ``units(phase)``, on the buffers as the last run left them
        (the NaN guard replays a step this way)."""
        self.units(phase)
        return self.run(f"{phase}_u{index}", batch, {}, scalars, share)

    def run(self, phase: str, batch: int, feeds: dict, scalars: dict | None = None, share: bool = True) -> Env:
        """Run a phase; ``feeds`` must already be validated arrays of the planned shapes. The
        returned buffers are shared by every later call: read them while holding ``self.lock``."""
        with self.lock:
            return self._run(phase, batch, feeds, scalars, share)

    def _run(self, phase: str, batch: int, feeds: dict, scalars: dict | None, share: bool) -> Env:
        function = self.function(phase)  # (first: compiling a phase may lay the buffers out again)
        env, pointers = self.bind(batch, share)
        for name, value in feeds.items():
            target = env[name]
            if value.shape != target.shape:
                raise ValueError(f"internal: feed {name} has shape {value.shape}, planned {target.shape}")
            target[...] = value
        env.scalars.update(scalars or {})
        for k, name in enumerate(self.scalar_names):
            self.scalars[k] = env.scalars.get(name, 0.0)
        self.workers.run(function, ctypes.addressof(pointers), self.scalars.ctypes.data, batch,
                         self.barrier.ctypes.data)
        if self.checked:
            self.raise_violation(batch)
        return env

    def raise_violation(self, batch: int) -> None:
        base = len(self.scalar_names)
        if self.scalars[base + 3] == 0:
            return
        stage_k, tensor_k, offset = (int(v) for v in self.scalars[base:base + 3])
        self.scalars[base:] = 0
        stage = self.prog.all_stages()[stage_k]
        tensor = list(self.prog.tensors)[tensor_k]
        shape = tuple(batch if not isinstance(d, int) else d for d in self.prog.tensors[tensor].shape)
        raise IndexError(f"bounds check (CNNCOMPILE_CHECK=1): stage {stage_k} writing '{stage.out}' "
                         f"({stage.role} of layer '{stage.layer}') touched {tensor} at flat offset {offset}, "
                         f"outside its shape {shape}; the access was suppressed. This is a compiler bug: "
                         f"please report it with the network")
