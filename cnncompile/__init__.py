"""cnncompile: compile PyTorch-shaped CNNs into fused training code with derived gradients.

The top level is the compiler (``nn`` → ``ir`` → ``backends`` → the model). The training utilities
(``cnncompile.training``) keep their public names here (``cc.load``, ``cc.callbacks``, ``cc.Augment``,
``cc.data``, ``cc.CheckpointError``) but load on first use, so compiling never imports them.
"""
from cnncompile.ir.errors import CompileError, ShapeError

from . import nn, optim
from .compiler import compile
from .onnx_import import from_onnx
from .nn.tracing import current as _current

# public name -> (module under cnncompile.training, attribute or None for the module itself)
_TRAINING_NAMES = {
    "callbacks": ("callbacks", None),
    "data": ("data", None),
    "Augment": ("augment", "Augment"),
    "load": ("checkpoint", "load"),
    "CheckpointError": ("checkpoint", "CheckpointError"),
}


def __getattr__(name: str):
    """The training package's public names, imported when first asked for (PEP 562)."""
    if name not in _TRAINING_NAMES:
        raise AttributeError(f"module 'cnncompile' has no attribute {name!r}")
    import importlib
    module_name, attribute = _TRAINING_NAMES[name]
    module = importlib.import_module(f"cnncompile.training.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_TRAINING_NAMES))


def cat(tensors, dim: int = 1):
    """Channel concatenation of traced tensors (DenseNet)."""
    if dim != 1:
        raise CompileError(f"cat: only dim=1 (channels) is supported, got dim={dim}")
    return _current().add_functional("cat", list(tensors))


__all__ = ["CompileError", "ShapeError", "CheckpointError", "Augment", "callbacks", "data", "nn", "optim", "compile",
           "cat", "load", "from_onnx"]
__version__ = "0.1.0"
