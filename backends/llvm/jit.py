"""One MCJIT engine per process, the O3 pipeline with both vectorizers, and a disk cache of
machine code keyed by a hash of everything that determines it (docs/architecture.md, §5)."""
from __future__ import annotations

import hashlib
import os
import threading

import llvmlite
import llvmlite.binding as llvm

from cnncompile import diskcache

from .target import Target, host, resolve

OBJECT_FORMAT = "object-1"
_lock = threading.Lock()
_engine = None
_target_machines: dict = {}  # (cpu, features) → target machine


def _after_fork_in_child() -> None:
    """A forked child has only the forking thread: the lock another thread held is free again."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def new_target_machine(t: Target | None = None):
    """A target machine for ``t``'s CPU and features (default: the resolved target, see
    `target.resolve`), at O3: the one place one is made."""
    t = resolve(t)
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_default_triple().create_target_machine(
        cpu=t.cpu, features=t.features, opt=3, codemodel="jitdefault")


def target(t: Target | None = None):
    """The process's target machine for ``t`` (one per CPU and feature set)."""
    t = resolve(t)
    if (t.cpu, t.features) not in _target_machines:
        _target_machines[(t.cpu, t.features)] = new_target_machine(t)
    return _target_machines[(t.cpu, t.features)]


def engine():
    """The process's JIT; it owns a target machine of its own, never shared with `target()`."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), new_target_machine(host()))
        return _engine


def fingerprint(ir_text: str, t: Target | None = None) -> str:
    """The object code's key: the IR, LLVM's version and the target it is compiled for."""
    h = hashlib.sha256()
    for part in (ir_text, llvmlite.__version__, str(llvm.llvm_version_info), resolve(t).key(),
                 "O3+loop+slp-interleave"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def optimize(module, t: Target | None = None) -> None:
    tm = target(t)
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_interleaving = False
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)


def entry_header(key: str) -> bytes:
    """What an entry starts with: its own key, so object code stored under another module's key
    (a copied or renamed file) is a miss rather than a module whose functions are missing."""
    return f"{OBJECT_FORMAT} {key}\n".encode()


def read_cache(key: str) -> bytes | None:
    """The object code of an entry whose checksum holds and that was written for ``key``; anything
    else (truncated, foreign, garbage, another key's) is a miss: LLVM is never handed bytes we did
    not write whole for this module."""
    payload = diskcache.read(f"{key}.o")
    if payload is None or not payload.startswith(entry_header(key)):
        return None
    return payload[len(entry_header(key)):]


def write_cache(key: str, data: bytes) -> None:
    diskcache.write(f"{key}.o", entry_header(key) + data)


def compile_part(ir_text: str, t: Target | None = None) -> bytes:
    """One module to object code for ``t``, in an LLVM context of its own."""
    context = llvm.create_context()
    module = llvm.parse_assembly(ir_text, context=context)
    module.verify()
    optimize(module, t)
    return target(t).emit_object(module)


def compile_workers() -> int:
    return max(1, min(2, len(os.sched_getaffinity(0))))


BACKGROUND_BYTES = 10_000  # of IR: a smaller module compiles here (faster than forking a worker for it)


class Compilation:
    """Modules compiled while later ones are still being written. llvmlite serialises every call
    into LLVM behind one lock, so threads cannot overlap: each module goes to a forked worker
    process (which inherits the loaded LLVM and needs no imports) as soon as it is added, unless
    the disk cache has it; `finish` compiles here those no worker has started, last first, then
    collects the rest."""

    def __init__(self, t: Target | None = None, use_cache: bool = True):
        self.t, self.use_cache = resolve(t), use_cache
        target(self.t)  # LLVM's targets initialised once, before any fork
        self.texts: list[str] = []
        self.keys: list[str] = []
        self.objects: list[bytes | None] = []
        self.futures: list = []
        self.pool = None

    def add(self, texts: list[str]) -> None:
        for text in texts:
            key = fingerprint(text, self.t)
            obj = read_cache(key) if self.use_cache else None
            self.texts.append(text)
            self.keys.append(key)
            self.objects.append(obj)
            self.futures.append(None if obj is not None or compile_workers() == 1 or len(text) < BACKGROUND_BYTES
                                else self.worker().submit(compile_part, text, self.t))

    def worker(self):
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self.pool = ProcessPoolExecutor(compile_workers() - 1, mp_context=multiprocessing.get_context("fork"))
        return self.pool

    def finish(self) -> list[bytes]:
        """Every module's object code (fresh ones stored in the disk cache)."""
        fresh = [obj is None for obj in self.objects]
        try:
            for j in reversed(range(len(self.texts))):  # (a worker takes them from the front)
                if self.objects[j] is None and (self.futures[j] is None or self.futures[j].cancel()):
                    self.objects[j] = compile_part(self.texts[j], self.t)
            for j, future in enumerate(self.futures):
                if self.objects[j] is None:
                    self.objects[j] = future.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)
        if self.use_cache:
            for key, obj, new in zip(self.keys, self.objects, fresh):
                if new:
                    write_cache(key, obj)
        self.from_cache = not any(fresh)
        return self.objects


class Compiled:
    """Machine code for one program (one or several modules) compiled for one target, loaded
    into the process's engine."""

    def __init__(self, ir_parts, use_cache: bool = True, t: Target | None = None,
                 compilation: Compilation | None = None):
        """``compilation``: the modules' compilation, already under way (`Compilation`)."""
        self.target = t = resolve(t)
        parts = [ir_parts] if isinstance(ir_parts, str) else list(ir_parts)
        self.ir_text = "\n".join(parts)
        if compilation is None:
            compilation = Compilation(t, use_cache)
            compilation.add(parts)
        keys = compilation.keys  # (each module's object-cache key, hashed once)
        self.key = keys[0] if len(keys) == 1 else fingerprint(self.ir_text, t)
        objects = compilation.finish()
        self.from_cache = compilation.from_cache
        eng = engine()
        with _lock:
            for j, obj in enumerate(objects):
                try:
                    eng.add_object_file(llvm.ObjectFileRef.from_data(obj))
                except Exception:  # noqa: BLE001 - a foreign or damaged entry is a miss
                    objects[j] = compile_part(parts[j], t)
                    eng.add_object_file(llvm.ObjectFileRef.from_data(objects[j]))
                    if use_cache:
                        write_cache(keys[j], objects[j])
            eng.finalize_object()
        self.parts = parts

    def address(self, name: str) -> int:
        addr = engine().get_function_address(name)
        if not addr:
            raise RuntimeError(f"internal: function {name} missing from compiled code")
        return addr

    def assembly(self) -> str:
        out = []
        for part in self.parts:
            module = llvm.parse_assembly(part)
            optimize(module, self.target)
            out.append(target(self.target).emit_assembly(module))
        return "\n".join(out)
