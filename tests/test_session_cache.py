"""The suite's cache is the session's own, never the user's."""
import os
from pathlib import Path

from cnncompile.diskcache import cache_dir


def test_cache_is_not_the_users(session_cache_dir):
    assert cache_dir() == Path(session_cache_dir)
    assert Path.home() / ".cache" / "cnncompile" != cache_dir()
    assert os.environ["CNNCOMPILE_CACHE_DIR"] == str(session_cache_dir)
