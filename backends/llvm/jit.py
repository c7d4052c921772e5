"""One MCJIT engine per process, the O3 pipeline with both vectorizers, and a disk cache of
machine code keyed by a hash of everything that determines it (DESIGN.md §5)."""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

_lock = threading.Lock()
_engine = None
_target_machine = None


def cache_dir() -> Path:
    return Path(os.environ.get("CNNCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "cnncompile")


def target():
    global _target_machine
    if _target_machine is None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        t = llvm.Target.from_default_triple()
        _target_machine = t.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                                  features=llvm.get_host_cpu_features().flatten(), opt=3,
                                                  codemodel="jitdefault")
    return _target_machine


def engine():
    """The process's JIT; it owns a target machine of its own, never shared with `target()`."""
    global _engine
    with _lock:
        if _engine is None:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            t = llvm.Target.from_default_triple()
            tm = t.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                         features=llvm.get_host_cpu_features().flatten(), opt=3,
                                         codemodel="jitdefault")
            _engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), tm)
        return _engine


def fingerprint(ir_text: str) -> str:
    h = hashlib.sha256()
    for part in (ir_text, llvmlite.__version__, str(llvm.llvm_version_info), llvm.get_host_cpu_name(),
                 llvm.get_host_cpu_features().flatten(), "O3+loop+slp-interleave"):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def optimize(module) -> None:
    tm = target()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_interleaving = False
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(module, pb)


MAGIC = b"cnncompile-object-1\n"


def read_cache(key: str) -> bytes | None:
    """The object code of an entry whose checksum holds; anything else (truncated, foreign,
    garbage) is a miss: LLVM is never handed bytes we did not write whole."""
    path = cache_dir() / f"{key}.o"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + 32
    if not data.startswith(MAGIC) or len(data) <= head:
        return None
    payload = data[head:]
    return payload if hashlib.sha256(payload).digest() == data[len(MAGIC):head] else None


def write_cache(key: str, data: bytes) -> None:
    """Atomic: a temporary file renamed into place, so a reader never sees half an entry."""
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".o")
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(data).digest() + data)
        os.replace(tmp, directory / f"{key}.o")
    except OSError:
        pass  # a cache that cannot be written only costs time


class Compiled:
    """Machine code for one module, loaded into the process's engine; functions by name."""

    def __init__(self, ir_text: str, use_cache: bool = True):
        self.key = fingerprint(ir_text)
        self.ir_text = ir_text
        self.from_cache = False
        data = read_cache(self.key) if use_cache else None
        eng = engine()
        with _lock:
            if data is not None:
                try:
                    eng.add_object_file(llvm.ObjectFileRef.from_data(data))
                    self.from_cache = True
                except Exception:  # noqa: BLE001 - a foreign or damaged entry is a miss
                    data = None
            if data is None:
                module = llvm.parse_assembly(ir_text)
                module.verify()
                optimize(module)
                self.optimized_ir = str(module)
                data = target().emit_object(module)
                eng.add_object_file(llvm.ObjectFileRef.from_data(data))
                if use_cache:
                    write_cache(self.key, data)
            eng.finalize_object()
        self.object_code = data

    def address(self, name: str) -> int:
        addr = engine().get_function_address(name)
        if not addr:
            raise RuntimeError(f"internal: function {name} missing from compiled code")
        return addr

    def assembly(self) -> str:
        module = llvm.parse_assembly(self.ir_text)
        optimize(module)
        return target().emit_assembly(module)
