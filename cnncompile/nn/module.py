"""PyTorch-shaped modules that hold no arrays: calling one on a traced tensor adds an op.

A user's ``forward`` runs once, at compile time, on `TracedTensor`s; what it records is the
graph IR. Parameters live in the compiled model, named like PyTorch's ``state_dict``.
"""
from __future__ import annotations

import sys
from collections import OrderedDict

import numpy as np

from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import BATCH
from cnncompile.ir.ops import OpNode

from . import tracing


def is_torch_module(value) -> bool:
    """A torch.nn.Module (torch is never imported for this: without it loaded, nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


class Module:
    def __init__(self):
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_modules" not in self.__dict__:
            raise CompileError(f"{type(self).__name__}.__init__ must call super().__init__() before "
                               f"assigning attributes")
        if not isinstance(value, Module) and is_torch_module(value):  # converted, never silently dropped
            from cnncompile.frontends.torch_fx import convert
            value = convert(value, f"{type(self).__name__}.{name}")
        if isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def add_module(self, name: str, module: "Module") -> None:
        setattr(self, name, module)

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self):
        return iter(self._modules.values())

    def forward(self, *args, **kwargs):
        raise CompileError(f"{type(self).__name__} defines no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        inner = "".join(f"\n  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in self._modules.items())
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"

    def extra_repr(self) -> str:
        return ""


class Layer(Module):
    """A module the compiler knows directly: one op in the graph."""

    kind = ""

    def attrs(self) -> dict:
        return {}

    def init_params(self, rng: np.random.Generator, shapes: dict) -> dict:
        return {}

    def forward(self, *inputs):
        return tracing.current().add_layer(self, list(inputs))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.attrs().items())


class Sequential(Module):
    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            for name, layer in layers[0].items():
                self.add_module(name, layer)
        else:
            for k, layer in enumerate(layers):
                self.add_module(str(k), layer)

    def __getitem__(self, k):
        return list(self._modules.values())[k]

    def __len__(self):
        return len(self._modules)

    def forward(self, x):
        for layer in self._modules.values():
            x = layer(x)
        return x


class ModuleList(Module):
    """A list of layers named ``"0"``, ``"1"``, … (as PyTorch's), called from a ``forward``."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        self.add_module(str(len(self._modules)), module)
        return self

    def __getitem__(self, k):
        return list(self._modules.values())[k]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)


class TracedTensor:
    """A symbolic tensor during tracing: a name in the graph and a known shape."""

    def __init__(self, name: str, shape: tuple):
        self.name, self.shape = name, tuple(shape)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def _join(self, other, kind):
        if isinstance(other, TracedTensor):
            return tracing.current().add_functional(kind, [self, other])
        if isinstance(other, (int, float)):
            if kind == "mul":
                return tracing.current().add_functional("scale", [self], factor=float(other))
            sign = -1.0 if kind == "sub" else 1.0
            return tracing.current().add_functional("shift", [self], offset=sign * float(other))
        return NotImplemented

    def __add__(self, other):
        return self._join(other, "add")

    __radd__ = __add__

    def __sub__(self, other):
        return self._join(other, "sub")

    def __rsub__(self, other):
        return (self * -1.0) + other

    def __mul__(self, other):
        return self._join(other, "mul")

    __rmul__ = __mul__

    def __truediv__(self, other):
        if isinstance(other, (int, float)):
            return self * (1.0 / other)
        return NotImplemented

    def __neg__(self):
        return self * -1.0

    def flatten(self, start_dim: int = 1, end_dim: int = -1):
        """As ``Tensor.flatten``, except that ``start_dim`` defaults to 1: the batch axis stays first
        (checked, with the axes, by the flatten op)."""
        if (start_dim, end_dim) == (1, -1):
            return tracing.current().add_functional("flatten", [self])
        return tracing.current().add_functional("flatten", [self], start_dim=start_dim, end_dim=end_dim)

    def view(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if len(shape) == 2 and (shape[0] is BATCH or shape[0] == -1) and shape[1] in (-1, int(np.prod(self.shape[1:]))):
            return self.flatten(1)
        raise CompileError(f"view{tuple(shape)}: only flattening to (batch, -1) is supported")

    reshape = view

    def relu(self):
        return tracing.current().add_functional("relu", [self])

    def mean(self, dim=None, keepdim=False):
        """Only a feature map's spatial mean, ``x.mean((2, 3))``: global average pooling."""
        from cnncompile.frontends.torch_fx import mean
        return mean(self, dim, keepdim)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch functions called on traced tensors (``torch.cat``, ``F.relu``, ``torch.flatten``)
        record the same ops as cnncompile's own forms; one without a mapping is a CompileError."""
        from cnncompile.frontends.torch_fx import call_torch_function
        return call_torch_function(func, args, kwargs or {})

    def __repr__(self):
        return f"TracedTensor({self.name}, shape={self.shape})"


def make_node(name: str, layer_type: str, kind: str, attrs: dict, inputs) -> OpNode:
    return OpNode(name=name, kind=kind, type=layer_type, attrs=dict(attrs), inputs=[t.name for t in inputs])
