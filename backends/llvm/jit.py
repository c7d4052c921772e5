"""One MCJIT engine per process, the O3 pipeline with both vectorizers, and a disk cache of
machine code keyed by a hash of everything that determines it (docs/architecture.md, §5)."""
from __future__ import annotations

import hashlib
import os
import threading

import llvmlite
import llvmlite.binding as llvm

from cnncompile import diskcache

OBJECT_FORMAT = "object-1"
_lock = threading.Lock()
_engine = None
_target_machine = None


def host_features() -> str:
    """The host's features, with 512-bit vectors off (CNNCOMPILE_AVX512=1 keeps them): our loops
    have short trip counts (kernel rows, feature-map rows) that 16-wide vectors mostly leave to
    scalar remainders; 8-wide ymm code covers them (measured on Zen 4: see README)."""
    features = llvm.get_host_cpu_features()
    if os.environ.get("CNNCOMPILE_AVX512") != "1":
        for name in list(features):
            if name.startswith("avx512") or name in ("evex512", "avx10.1-512"):
                features[name] = False
    return features.flatten()


def new_target_machine():
    """A target machine for this host's CPU and features (see `host_features`), at O3: the one
    place one is made."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=host_features(), opt=3, codemodel="jitdefault")


def target():
    global _target_machine
    if _target_machine is None:
        _target_machine = new_target_machine()
    return _target_machine


def engine():
    """The process's JIT; it owns a target machine of its own, never shared with `target()`."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), new_target_machine())
        return _engine


def fingerprint(ir_text: str) -> str:
    h = hashlib.sha256()
    for part in (ir_text, llvmlite.__version__, str(llvm.llvm_version_info), llvm.get_host_cpu_name(),
                 host_features(), "O3+loop+slp-interleave"):
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


def compile_part(ir_text: str) -> bytes:
    """One module to object code, in an LLVM context of its own."""
    context = llvm.create_context()
    module = llvm.parse_assembly(ir_text, context=context)
    module.verify()
    optimize(module)
    return target().emit_object(module)


def compile_workers() -> int:
    return max(1, min(2, len(os.sched_getaffinity(0))))


def compile_parts(parts: list[str]) -> list[bytes]:
    """Object code for each part. llvmlite serialises every call into LLVM behind one lock, so
    threads cannot overlap; the other parts go to forked processes (which inherit the loaded
    LLVM and need no imports) while this one compiles the first."""
    if len(parts) <= 1 or compile_workers() == 1:
        return [compile_part(p) for p in parts]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(min(len(parts) - 1, compile_workers() - 1),
                             mp_context=multiprocessing.get_context("fork")) as pool:
        others = pool.map(compile_part, parts[1:])
        first = compile_part(parts[0])
        return [first, *others]


class Compiled:
    """Machine code for one program (one or several modules), loaded into the process's engine."""

    def __init__(self, ir_parts, use_cache: bool = True):
        parts = [ir_parts] if isinstance(ir_parts, str) else list(ir_parts)
        self.ir_text = "\n".join(parts)
        self.key = fingerprint(self.ir_text)
        keys = [fingerprint(p) for p in parts]
        objects = [read_cache(k) if use_cache else None for k in keys]
        target()  # LLVM's targets initialised once, before any fork
        missing = [j for j, o in enumerate(objects) if o is None]
        for j, obj in zip(missing, compile_parts([parts[j] for j in missing])):
            objects[j] = obj
            if use_cache:
                write_cache(keys[j], obj)
        self.from_cache = not missing
        eng = engine()
        with _lock:
            for j, obj in enumerate(objects):
                try:
                    eng.add_object_file(llvm.ObjectFileRef.from_data(obj))
                except Exception:  # noqa: BLE001 - a foreign or damaged entry is a miss
                    objects[j] = compile_part(parts[j])
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
            optimize(module)
            out.append(target().emit_assembly(module))
        return "\n".join(out)
