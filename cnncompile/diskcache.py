"""Checksummed, atomically written cache entries under ``$CNNCOMPILE_CACHE_DIR``.

Both caches (machine code per LLVM module, whole compiled programs) store bytes framed by a
magic line and a SHA-256 of the payload: a truncated, foreign or garbled file reads as a
miss, and a writer never leaves half an entry where a reader can see it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

MAGIC = b"cnncompile-entry-1\n"


def cache_dir() -> Path:
    return Path(os.environ.get("CNNCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "cnncompile")


def read(name: str) -> bytes | None:
    """The payload of entry ``name`` if its checksum holds; None for anything else."""
    try:
        data = (cache_dir() / name).read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + 32
    if not data.startswith(MAGIC) or len(data) <= head:
        return None
    payload = data[head:]
    return payload if hashlib.sha256(payload).digest() == data[len(MAGIC):head] else None


def write(name: str, payload: bytes) -> None:
    """A temporary file renamed into place; a cache that cannot be written only costs time."""
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, directory / name)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
