"""More activations, each a layer whose op is one row of `ir.ops.elementwise.ACTIVATIONS`
(its formula; the derivative is derived) over the scalar functions of `ir.functions`."""
from __future__ import annotations

from cnncompile.ir.errors import CompileError

from .layers import pytorch_signature
from .module import Layer


@pytorch_signature
class SiLU(Layer):
    """x·σ(x) (swish)."""

    kind = "silu"

    def __init__(self, inplace=False):
        super().__init__()


@pytorch_signature
class GELU(Layer):
    """x·Φ(x) with the exact normal CDF (erf), or PyTorch's tanh approximation."""

    kind = "gelu"

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise CompileError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def attrs(self):
        return dict(approximate=self.approximate)


@pytorch_signature
class ELU(Layer):
    kind = "elu"

    def __init__(self, alpha=1.0, inplace=False):
        super().__init__()
        self.alpha = float(alpha)

    def attrs(self):
        return dict(alpha=self.alpha)


@pytorch_signature
class Softplus(Layer):
    """log(1 + e^(βx))/β, and x itself where βx > threshold (as PyTorch)."""

    kind = "softplus"

    def __init__(self, beta=1.0, threshold=20.0):
        super().__init__()
        if beta <= 0:
            raise CompileError(f"Softplus: beta must be positive, got {beta}")
        self.beta, self.threshold = float(beta), float(threshold)

    def attrs(self):
        return dict(beta=self.beta, threshold=self.threshold)


@pytorch_signature
class Hardtanh(Layer):
    """x clipped to [min_val, max_val]."""

    kind = "hardtanh"

    def __init__(self, min_val=-1.0, max_val=1.0, inplace=False):
        super().__init__()
        if not min_val < max_val:
            raise CompileError(f"Hardtanh: min_val must be below max_val, got {min_val} and {max_val}")
        self.min_val, self.max_val = float(min_val), float(max_val)

    def attrs(self):
        return dict(min_val=self.min_val, max_val=self.max_val)


class ReLU6(Hardtanh):
    """min(max(0, x), 6): Hardtanh(0, 6), as PyTorch defines it."""

    def __init__(self, inplace=False):
        if not isinstance(inplace, bool):
            raise CompileError(f"ReLU6: inplace must be True or False, got {inplace!r}; ReLU6 takes (inplace=False)")
        super().__init__(0.0, 6.0)
