"""torchvision's model definitions without its compiled operators.

On these machines ``import torchvision`` fails ("operator torchvision::nms does not exist": its C++
operators do not load against the local CPU build of torch), but ``torchvision.models`` is plain
Python. So a module object named ``torchvision`` whose ``__path__`` is the installed package folder
stands in for the package initializer (which is never executed), and ``torchvision.models`` is
imported through it. Test code only: the product works with a normal torchvision.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def models():
    """``torchvision.models`` (torchvision is in the test extra: ``pip install -e '.[test]'``)."""
    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision.models"]
    spec = importlib.util.find_spec("torchvision")  # finds the folder; runs nothing
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed: pip install -e '.[test]' (torchvision==0.28.*)")
    if "torchvision" not in sys.modules:
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")
