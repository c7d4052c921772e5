"""Checksummed, atomically written cache entries under ``$CNNCOMPILE_CACHE_DIR``, bounded in size.

Both caches (machine code per LLVM module, whole compiled programs) store bytes framed by a
magic line and a SHA-256 of the payload: a truncated, foreign or garbled file reads as a
miss, and a writer never leaves half an entry where a reader can see it.

Every change of the compiler orphans all entries (their keys hash its source), so the directory
is kept under ``$CNNCOMPILE_CACHE_MAX`` bytes (default 1 GiB): after each write the least recently
used entries go first, a read counting as a use (it refreshes the entry's mtime).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from cnncompile.ir.errors import CompileError

MAGIC = b"cnncompile-entry-1\n"
DEFAULT_MAX = 1 << 30
# An entry's name: a SHA-256 key in hex and a kind (".o", ".program"); anything else in the
# directory (temporary files of writers, a user's own files) is never counted nor removed.
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.[a-z]+")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def cache_dir() -> Path:
    return Path(os.environ.get("CNNCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "cnncompile")


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"500M"``, ``"2G"``, ``"512KiB"`` (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise CompileError(f"CNNCOMPILE_CACHE_MAX={text!r} is not a size: give bytes, optionally with a "
                           f"suffix K, M, G or T (powers of 1024), e.g. 500M or 2G")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def max_bytes() -> int:
    """The bound on the cache's total size, from ``$CNNCOMPILE_CACHE_MAX``."""
    text = os.environ.get("CNNCOMPILE_CACHE_MAX")
    return DEFAULT_MAX if text is None or not text.strip() else parse_size(text)


def temp_name_pattern(path) -> re.Pattern:
    """The names `atomic_write` gives its temporary files next to ``path`` (a writer killed before
    its rename leaves one behind; see `remove_stale_temps`)."""
    return re.compile(rf"\.tmp-{re.escape(Path(path).name)}-[a-z0-9_]{{8}}")


def remove_stale_temps(path) -> None:
    """Temporary files of earlier writes to ``path`` whose writer died before renaming them."""
    pattern = temp_name_pattern(path)
    for entry in Path(path).parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
            try:
                entry.unlink()
            except FileNotFoundError:
                pass


def atomic_write(path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: a reader sees the old
    file or the whole new one, never a part. ``durable`` syncs the bytes to disk before the rename
    (a crash then cannot leave an empty file under the new name). Errors propagate. The one atomic
    writer of the project: the caches and checkpoints use it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read(name: str) -> bytes | None:
    """The payload of entry ``name`` if its checksum holds; None for anything else."""
    path = cache_dir() / name
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(MAGIC) + 32
    if not data.startswith(MAGIC) or len(data) <= head:
        return None
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        return None
    touch(path)
    return payload


def touch(path: Path) -> None:
    """Mark an entry as just used (least-recently-used eviction reads mtimes)."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache, or another process evicted it meanwhile
        pass


def write(name: str, payload: bytes) -> None:
    """Store an entry, then evict down to the bound; a cache that cannot be written only costs time."""
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / name, MAGIC + hashlib.sha256(payload).digest() + payload, durable=False)
    except OSError:
        return
    evict(directory, max_bytes(), keep=name)


def entries(directory: Path) -> list[tuple[float, int, str]]:
    """(mtime, size, name) of every entry in the directory; files that vanish meanwhile are skipped."""
    found = []
    try:
        with os.scandir(directory) as it:
            for e in it:
                if not ENTRY_NAME.fullmatch(e.name):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.is_file(follow_symlinks=False):
                    found.append((st.st_mtime, st.st_size, e.name))
    except OSError:
        return []
    return found


def evict(directory: Path, limit: int, keep: str | None = None) -> None:
    """Remove the least recently used entries until the total is within ``limit`` bytes. ``keep``
    (the entry just written) is never removed; another process removing the same files at the same
    time only makes some unlinks find nothing."""
    found = entries(directory)
    total = sum(size for _, size, _ in found)
    for _, size, name in sorted(found):
        if total <= limit:
            break
        if name == keep:
            continue
        try:
            os.unlink(directory / name)
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= size
