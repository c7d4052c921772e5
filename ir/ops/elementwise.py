"""Elementwise ops: activations, joins (residual ``+``, ``*``), and flatten as an index map.

Each body is a scalar formula in the input read; its derivative is sympy's business.
"""
from __future__ import annotations

from cnncompile.ir.lazy import sympy

from ..affine import Affine
from ..errors import CompileError, ShapeError, where
from ..expr import Stage, read
from .base import OpDef, elementwise_domain, elementwise_stage, fmt_shape, identity_index, register


def sigmoid(x):
    from ..functions import sigmoid as head  # (sympy function classes: imported where a body is built)
    return head(x)


def softplus(x):
    from ..functions import softplus as head
    return head(x)


def relu(x):
    return sympy.Piecewise((x, x > 0), (0, True))


def leaky_relu(slope):
    return lambda x: sympy.Piecewise((x, x > 0), (sympy.Float(slope) * x, True))


def clip(lo, hi):
    return lambda x: sympy.Piecewise((sympy.Float(lo), x < lo), (sympy.Float(hi), x > hi), (x, True))


def gelu(approximate):
    if approximate == "tanh":
        c = sympy.sqrt(2 / sympy.pi).evalf()
        return lambda x: sympy.Float(0.5) * x * (1 + sympy.tanh(c * (x + sympy.Float(0.044715) * x ** 3)))
    return lambda x: sympy.Float(0.5) * x * (1 + sympy.erf(x * sympy.sqrt(sympy.Rational(1, 2)).evalf()))


def elu(alpha):
    return lambda x: sympy.Piecewise((x, x > 0), (sympy.Float(alpha) * (sympy.exp(x) - 1), True))


def softplus_of(beta, threshold):
    b = sympy.Float(beta)
    return lambda x: sympy.Piecewise((x, b * x > threshold), (softplus(b * x) / b, True))


ACTIVATIONS = {  # kind → (attrs → the formula of one element)
    "relu": lambda attrs: relu,
    "sigmoid": lambda attrs: sigmoid,
    "tanh": lambda attrs: sympy.tanh,
    "leaky_relu": lambda attrs: leaky_relu(attrs.get("negative_slope", 0.01)),
    "silu": lambda attrs: (lambda x: x * sigmoid(x)),
    "gelu": lambda attrs: gelu(attrs["approximate"]),
    "elu": lambda attrs: elu(attrs["alpha"]),
    "softplus": lambda attrs: softplus_of(attrs["beta"], attrs["threshold"]),
    "hardtanh": lambda attrs: clip(attrs["min_val"], attrs["max_val"]),
    "scale": lambda attrs: (lambda x: sympy.Float(attrs["factor"]) * x),
    "shift": lambda attrs: (lambda x: x + sympy.Float(attrs["offset"])),
}


class Activation(OpDef):
    def infer(self, node, shapes):
        return shapes[0]

    def lower(self, node, shapes, out_shape):
        f = ACTIVATIONS[self.kind](node.attrs)
        return [elementwise_stage(node, node.output, out_shape,
                                  lambda syms: f(read(node.inputs[0], *syms)), note=self.kind)]


for _kind in ACTIVATIONS:
    register(type(_kind, (Activation,), {"kind": _kind}))


JOINS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


class Join(OpDef):
    def infer(self, node, shapes):
        a, b = shapes
        if tuple(a) != tuple(b):
            raise ShapeError(f"{where(node)}: cannot {self.kind} tensors of shapes {fmt_shape(a)} and "
                             f"{fmt_shape(b)}; they must match exactly (a residual branch needs the "
                             f"same channels and size: add a 1×1 convolution or change its stride)")
        return a

    def lower(self, node, shapes, out_shape):
        f = JOINS[self.kind]
        return [elementwise_stage(node, node.output, out_shape,
                                  lambda syms: f(read(node.inputs[0], *syms), read(node.inputs[1], *syms)),
                                  note=self.kind)]


for _kind in JOINS:
    register(type(_kind, (Join,), {"kind": _kind}))


@register
class Flatten(OpDef):
    """``out[b, …, c·H·W + h·W + w, …] = X[b, …, c, h, w, …]``: axes ``start_dim``..``end_dim`` merged
    by an affine index map, so its gradient is derived too. The batch axis must stay first and whole."""

    kind = "flatten"

    def axes(self, node, shape) -> tuple[int, int]:
        rank, a = len(shape), node.attrs
        start, end = a.get("start_dim", 1), a.get("end_dim", -1)
        first, last = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        if not (0 <= first < rank and 0 <= last < rank):
            raise ShapeError(f"{where(node)}: start_dim={start}, end_dim={end} are not axes of the input "
                             f"{fmt_shape(shape)} (rank {rank})")
        if first == 0:
            raise CompileError(f"{where(node)}: start_dim={start} would merge the batch axis of {fmt_shape(shape)}; "
                               f"the batch axis stays first: flatten from axis 1 on")
        if last < first:
            raise CompileError(f"{where(node)}: end_dim={end} comes before start_dim={start} for input "
                               f"{fmt_shape(shape)}; PyTorch refuses this too")
        return first, last

    def infer(self, node, shapes):
        (shape,) = shapes
        if len(shape) < 2:
            raise ShapeError(f"{where(node)}: cannot flatten a tensor of shape {fmt_shape(shape)}")
        first, last = self.axes(node, shape)
        size = 1
        for s in shape[first:last + 1]:
            size *= s
        return (*shape[:first], size, *shape[last + 1:])

    def lower(self, node, shapes, out_shape):
        (shape,) = shapes
        first, last = self.axes(node, shape)
        domain, syms = elementwise_domain(shape)
        flat, stride = Affine.constant(0), 1
        for (name, ext) in reversed(domain[first:last + 1]):
            flat = flat + Affine.make({name: stride})
            stride *= ext
        index = [Affine.var(n) for n, _ in domain]
        out_index = (*index[:first], flat, *index[last + 1:])
        return [Stage(out=node.output, out_index=out_index, domain=domain,
                      body=read(node.inputs[0], *syms), layer=node.name, note="flatten")]


@register
class Identity(OpDef):
    kind = "identity"

    def infer(self, node, shapes):
        return shapes[0]

    def lower(self, node, shapes, out_shape):
        return [elementwise_stage(node, node.output, out_shape, lambda syms: read(node.inputs[0], *syms),
                                  note="identity")]


@register
class Cat(OpDef):
    """``out[b, o_k + c, ...] = X_k[b, c, ...]``: one stage per input, each an affine shift of the
    channel index, so each input's gradient is a plain gather from the output's gradient."""

    kind = "cat"

    def infer(self, node, shapes):
        first = shapes[0]
        for k, shape in enumerate(shapes[1:], 1):
            if len(shape) != len(first) or tuple(shape[:1]) + tuple(shape[2:]) != tuple(first[:1]) + tuple(first[2:]):
                raise ShapeError(f"{where(node)}: cannot concatenate {fmt_shape(first)} and {fmt_shape(shape)} "
                                 f"(input {k}) along channels; all sizes but the channel count must match")
        return (first[0], sum(s[1] for s in shapes), *first[2:])

    def lower(self, node, shapes, out_shape):
        stages, offset = [], 0
        for tensor, shape in zip(node.inputs, shapes):
            domain, syms = elementwise_domain(shape)
            index = list(identity_index(syms))
            index[1] = index[1] + Affine.constant(offset)
            stages.append(Stage(out=node.output, out_index=tuple(index), domain=domain, body=read(tensor, *syms),
                                layer=node.name, note=f"concatenate: channels {offset}…{offset + shape[1] - 1}"))
            offset += shape[1]
        return stages
