"""Test-session setup: the helpers on the path, and a cache directory of the session's own.

The suite never reads or writes the user's ``~/.cache/cnncompile``: a cache filled by an earlier
run would let every test load pickled programs instead of deriving and generating code again.
Subprocesses started by the tests inherit the variable.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    old = os.environ.get("CNNCOMPILE_CACHE_DIR")
    path = tmp_path_factory.mktemp("cnncompile-cache")
    os.environ["CNNCOMPILE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CNNCOMPILE_CACHE_DIR", None)
    else:
        os.environ["CNNCOMPILE_CACHE_DIR"] = old
