"""Batch normalization and dropout: the two layers that behave differently in training and eval.

Batch norm in training, over the N = B·H·W values of each channel c:

    μ[c]  = Σ_{b,h,w} X[b,c,h,w] / N
    σ²[c] = Σ_{b,h,w} (X[b,c,h,w] − μ[c])² / N
    Y[b,c,h,w] = (X[b,c,h,w] − μ[c]) · (σ²[c] + ε)^(−1/2) · γ[c] + β[c]

Its backward (through μ and σ² as well as directly) is the chain rule over these three
stages, derived like every other. In eval the running statistics stand in for μ and σ², and
the running statistics are updated (PyTorch's momentum, unbiased variance) after each step.

Dropout multiplies by a mask drawn by the runtime for every training batch (0 or 1/(1−p)),
so the derivation sees a product with a known tensor.
"""
from __future__ import annotations

import sympy

from ..affine import Affine
from ..errors import CompileError, ShapeError, where
from ..expr import BATCH, Stage, read, var
from .base import OpDef, elementwise_stage, fmt_shape, register


@register
class BatchNorm2d(OpDef):
    kind = "batchnorm2d"

    def infer(self, node, shapes):
        (shape,) = shapes
        a = node.attrs
        if len(shape) != 4 or shape[1] != a["num_features"]:
            raise ShapeError(f"{where(node)} expects input (N, {a['num_features']}, H, W), got "
                             f"{fmt_shape(shape)}; set num_features={shape[1] if len(shape) > 1 else '?'}")
        if not a.get("eps", 1e-5) > 0 or not 0 <= a.get("momentum", 0.1) <= 1:
            raise CompileError(f"{where(node)}: eps must be > 0 and momentum in [0, 1], got eps={a.get('eps')}, "
                               f"momentum={a.get('momentum')}")
        return shape

    def param_shapes(self, node, shapes):
        c = node.attrs["num_features"]
        return {"weight": (c,), "bias": (c,)} if node.attrs.get("affine", True) else {}

    def buffer_shapes(self, node, shapes):
        c = node.attrs["num_features"]
        return {"running_mean": (c,), "running_var": (c,)}

    def lower(self, node, shapes, out_shape):
        (_, channels, height, width) = shapes[0]
        eps, momentum = sympy.Float(node.attrs.get("eps", 1e-5)), sympy.Float(node.attrs.get("momentum", 0.1))
        b, c, h, w = (var(n) for n in "bchw")
        x = read(node.inputs[0], b, c, h, w)
        count = BATCH * height * width
        mean, variance = f"{node.output}.mean", f"{node.output}.var"
        per_channel = dict(out_index=(Affine.var("c"),), domain=(("c", channels),),
                           reduce=(("b", BATCH), ("h", height), ("w", width)), combine="sum",
                           layer=node.name, mode="train")
        affine = node.attrs.get("affine", True)

        def normalized(mu, var2):
            y = (x - mu) * (var2 + eps) ** sympy.Rational(-1, 2)
            return y * read(node.params["weight"], c) + read(node.params["bias"], c) if affine else y

        def update(buffer, batch_value, note):
            return Stage(out=buffer, out_index=(Affine.var("c"),), domain=(("c", channels),),
                         body=(1 - momentum) * read(buffer, c) + momentum * batch_value, layer=node.name,
                         role="stats", note=note, mode="train", differentiable=False)

        elementwise = dict(out=node.output, out_index=tuple(Affine.var(n) for n in "bchw"),
                           domain=tuple(zip("bchw", out_shape)), layer=node.name)
        running_mean, running_var = node.params["running_mean"], node.params["running_var"]
        return [
            Stage(out=mean, body=x / count, note="batch mean μ", **per_channel),
            Stage(out=variance, body=(x - read(mean, c)) ** 2 / count, note="batch variance σ²", **per_channel),
            Stage(body=normalized(read(mean, c), read(variance, c)), note="normalize, scale, shift", mode="train",
                  **elementwise),
            Stage(body=normalized(read(running_mean, c), read(running_var, c)),
                  note="normalize with running statistics", mode="eval", **elementwise),
            update(running_mean, read(mean, c), "running mean"),
            update(running_var, read(variance, c) * count / (count - 1), "running variance (unbiased)"),
        ]


@register
class Dropout(OpDef):
    kind = "dropout"

    def infer(self, node, shapes):
        p = node.attrs.get("p", 0.5)
        if not 0 <= p <= 1:
            raise CompileError(f"{where(node)}: dropout probability p must be in [0, 1], got {p}")
        return shapes[0]

    def noise_shapes(self, node, shapes):
        return {"mask": shapes[0]}

    def lower(self, node, shapes, out_shape):
        mask = node.params["mask"]
        train = elementwise_stage(node, node.output, out_shape,
                                  lambda syms: read(node.inputs[0], *syms) * read(mask, *syms),
                                  note=f"dropout p={node.attrs.get('p', 0.5)}: × mask ∈ {{0, 1/(1−p)}}")
        keep = elementwise_stage(node, node.output, out_shape, lambda syms: read(node.inputs[0], *syms),
                                 note="dropout (eval: identity)")
        return [train.with_(mode="train"), keep.with_(mode="eval")]
