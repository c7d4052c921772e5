"""The disk cache's frame, its atomic writer, and its size bound with least-recently-used eviction."""
import os
import subprocess
import sys
import textwrap

import pytest

import cnncompile as cc
from cnncompile import diskcache

FRAME = len(diskcache.MAGIC) + 32  # bytes an entry adds to its payload


def entry_name(i: int, kind: str = "o") -> str:
    return f"{i:064x}.{kind}"


def entry_sizes(directory) -> dict:
    return {p.name: p.stat().st_size for p in directory.iterdir() if diskcache.ENTRY_NAME.fullmatch(p.name)}


@pytest.mark.parametrize("text, size", [("1048576", 1 << 20), ("500M", 500 << 20), ("2G", 2 << 30),
                                        ("64k", 64 << 10), ("1.5G", 3 << 29), ("512MiB", 512 << 20),
                                        ("10KB", 10 << 10)])
def test_sizes_accept_suffixes(text, size):
    assert diskcache.parse_size(text) == size


def test_a_size_that_is_not_one_names_the_variable(monkeypatch):
    monkeypatch.setenv("CNNCOMPILE_CACHE_MAX", "lots")
    with pytest.raises(cc.CompileError, match="CNNCOMPILE_CACHE_MAX='lots'.*500M"):
        diskcache.max_bytes()


def test_the_default_bound_is_one_gibibyte(monkeypatch):
    monkeypatch.delenv("CNNCOMPILE_CACHE_MAX", raising=False)
    assert diskcache.max_bytes() == 1 << 30


def test_writes_evict_the_least_recently_used_entries(tmp_path, monkeypatch):
    """Over the bound, the entry used longest ago goes first; a read counts as a use; files that
    are not entries (a writer's temporary file, anything else) are neither counted nor removed."""
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CNNCOMPILE_CACHE_MAX", "10K")
    payload = bytes(3000)
    for i in range(3):
        diskcache.write(entry_name(i), payload)
        os.utime(tmp_path / entry_name(i), (1000.0 * (i + 1), 1000.0 * (i + 1)))  # 0 oldest, 2 newest
    (tmp_path / "notes.txt").write_bytes(bytes(50_000))
    (tmp_path / ".tmp-being-written").write_bytes(bytes(50_000))
    assert diskcache.read(entry_name(0)) == payload  # 0 becomes the most recently used

    diskcache.write(entry_name(3), payload)  # 4 × 3051 bytes > 10 KiB: one entry must go
    assert set(entry_sizes(tmp_path)) == {entry_name(0), entry_name(2), entry_name(3)}
    assert sum(entry_sizes(tmp_path).values()) <= 10 << 10
    assert (tmp_path / "notes.txt").exists() and (tmp_path / ".tmp-being-written").exists()

    for i in range(4, 10):
        diskcache.write(entry_name(i, "program"), payload)
        assert sum(entry_sizes(tmp_path).values()) <= 10 << 10
        assert entry_name(i, "program") in entry_sizes(tmp_path)
    assert len(entry_sizes(tmp_path)) == 3


def test_an_entry_larger_than_the_bound_is_still_written(tmp_path, monkeypatch):
    """The entry just written is never the one evicted (its reader comes right after)."""
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CNNCOMPILE_CACHE_MAX", "1K")
    diskcache.write(entry_name(1), bytes(500))
    diskcache.write(entry_name(2), bytes(5000))
    assert set(entry_sizes(tmp_path)) == {entry_name(2)}
    assert diskcache.read(entry_name(2)) == bytes(5000)


def test_eviction_tolerates_entries_removed_by_another_process(tmp_path, monkeypatch):
    """An entry listed but gone by the time it is removed (another process evicted it) is no error."""
    for i in range(3):
        (tmp_path / entry_name(i)).write_bytes(bytes(1000))
    listed = diskcache.entries(tmp_path) + [(0.0, 1000, entry_name(7))]  # never existed
    monkeypatch.setattr(diskcache, "entries", lambda directory: listed)
    diskcache.evict(tmp_path, 1500, keep=entry_name(2))
    assert set(entry_sizes(tmp_path)) == {entry_name(2)}


WRITER = textwrap.dedent("""
    import sys
    from cnncompile import diskcache
    first = int(sys.argv[1])
    for i in range(first, first + 60):
        diskcache.write(f"{i:064x}.o", bytes(2000))
        assert diskcache.read(f"{i:064x}.o") in (bytes(2000), None)  # whole, or evicted by the other
""")


def test_two_processes_writing_at_once_stay_within_the_bound(tmp_path):
    env = dict(os.environ, CNNCOMPILE_CACHE_DIR=str(tmp_path), CNNCOMPILE_CACHE_MAX="20K")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(first)], env=env, stderr=subprocess.PIPE)
               for first in (0, 1000)]
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()
    sizes = entry_sizes(tmp_path)
    assert 0 < sum(sizes.values()) <= 20 << 10
    assert all(size == 2000 + FRAME for size in sizes.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "state.bin"
    diskcache.atomic_write(path, b"old contents")
    diskcache.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    diskcache.atomic_write(path, b"old contents", durable=False)
    with pytest.raises(TypeError):
        diskcache.atomic_write(path, "text, not bytes")
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_an_atomic_write_into_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        diskcache.atomic_write(tmp_path / "absent" / "state.bin", b"x")
