"""The machine-code cache trusts an entry only for the module it was written for."""
import os
import shutil

from cnncompile.backends.llvm import jit


def squaring_ir(name: str) -> str:
    return f"define float @{name}(float %x) {{\n  %y = fmul float %x, %x\n  ret float %y\n}}\n"


def test_object_code_under_another_modules_key_is_a_miss_and_is_replaced(tmp_path, monkeypatch):
    """Module B's object file copied to module A's key: A compiles, its function exists, and the
    entry under A's key is A's own afterwards (it reads as a hit for A's key)."""
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    a_name, b_name = f"cc_test_wrong_key_a_{os.getpid()}", f"cc_test_wrong_key_b_{os.getpid()}"
    a_ir, b_ir = squaring_ir(a_name), squaring_ir(b_name)
    b = jit.Compiled(b_ir)
    a_key = jit.fingerprint(a_ir)
    shutil.copyfile(tmp_path / f"{b.key}.o", tmp_path / f"{a_key}.o")

    a = jit.Compiled(a_ir)
    assert not a.from_cache
    assert a.address(a_name)
    replaced = jit.read_cache(a_key)
    assert replaced is not None and replaced.startswith(b"\x7fELF") and replaced != jit.read_cache(b.key)


def test_an_object_entry_starts_with_its_own_key(tmp_path, monkeypatch):
    """What the cache returns is the object code alone, the recorded key stripped."""
    monkeypatch.setenv("CNNCOMPILE_CACHE_DIR", str(tmp_path))
    jit.write_cache("ab" * 32, b"\x7fELF object bytes")
    assert jit.read_cache("ab" * 32) == b"\x7fELF object bytes"
    os.replace(tmp_path / f"{'ab' * 32}.o", tmp_path / f"{'cd' * 32}.o")
    assert jit.read_cache("cd" * 32) is None
