"""Every op's forward definition as stages. Importing this package registers them all."""
from . import conv, elementwise, loss, norm, pool  # noqa: F401
from .base import OPS, OpDef, OpNode

__all__ = ["OPS", "OpDef", "OpNode"]
