"""cnncompile: compile PyTorch-shaped CNNs into fused training code with derived gradients."""
from cnncompile.ir.errors import CompileError, ShapeError

from . import callbacks, nn, optim
from .augment import Augment
from .checkpoint import CheckpointError, load
from .compiler import compile
from .onnx_import import from_onnx
from .nn.tracing import current as _current


def cat(tensors, dim: int = 1):
    """Channel concatenation of traced tensors (DenseNet)."""
    if dim != 1:
        raise CompileError(f"cat: only dim=1 (channels) is supported, got dim={dim}")
    return _current().add_functional("cat", list(tensors))


__all__ = ["CompileError", "ShapeError", "CheckpointError", "Augment", "callbacks", "nn", "optim", "compile", "cat",
           "load", "from_onnx"]
__version__ = "0.1.0"
