"""Batch normalization and dropout: the two layers that behave differently in training and eval.

Batch norm in training, over the N = B·H·W values of each channel c:

    μ[c]  = Σ_{b,h,w} X[b,c,h,w] / N
    σ²[c] = Σ_{b,h,w} (X[b,c,h,w] − μ[c])² / N
    Y[b,c,h,w] = (X[b,c,h,w] − μ[c]) · (σ²[c] + ε)^(−1/2) · γ[c] + β[c]

Its backward (through μ and σ² as well as directly) is the chain rule over these three
stages, derived like every other. In eval the running statistics stand in for μ and σ², and
the running statistics are updated (PyTorch's momentum, unbiased variance) after each step.
With ``momentum=None`` the factor is 1/num_batches_tracked, a runtime scalar the model feeds
(``<layer>.num_batches_tracked``, the count before this step; a layer called k times per step
counts k, as PyTorch's does). With ``track_running_stats=False`` there are no running
statistics: batch statistics in eval too.

Dropout multiplies by a mask drawn by the runtime for every training batch (0 or 1/(1−p)),
so the derivation sees a product with a known tensor.
"""
from __future__ import annotations

from cnncompile.ir.lazy import sympy

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
        momentum = a.get("momentum", 0.1)
        if not a.get("eps", 1e-5) > 0 or (momentum is not None and not 0 <= momentum <= 1):
            raise CompileError(f"{where(node)}: eps must be > 0 and momentum in [0, 1], got eps={a.get('eps')}, "
                               f"momentum={a.get('momentum')}")
        return shape

    def param_shapes(self, node, shapes):
        c, a = node.attrs["num_features"], node.attrs
        if not a.get("affine", True):
            return {}
        return {"weight": (c,), "bias": (c,)} if a.get("bias", True) else {"weight": (c,)}

    def buffer_shapes(self, node, shapes):
        c = node.attrs["num_features"]
        return {"running_mean": (c,), "running_var": (c,)} if node.attrs.get("track_running_stats", True) else {}

    def lower(self, node, shapes, out_shape):
        (_, channels, height, width) = shapes[0]
        eps, momentum = sympy.Float(node.attrs.get("eps", 1e-5)), update_factor(node)
        b, c, h, w = (var(n) for n in "bchw")
        x = read(node.inputs[0], b, c, h, w)
        count = BATCH * height * width
        mean, variance = f"{node.output}.mean", f"{node.output}.var"
        tracking = node.attrs.get("track_running_stats", True)
        batch_mode = "train" if tracking else "any"  # untracked: batch statistics in eval too
        per_channel = dict(out_index=(Affine.var("c"),), domain=(("c", channels),),
                           reduce=(("b", BATCH), ("h", height), ("w", width)), combine="sum",
                           layer=node.name, mode=batch_mode)

        def normalized(mu, var2):
            y = (x - mu) * (var2 + eps) ** sympy.Rational(-1, 2)
            if "weight" in node.params:
                y = y * read(node.params["weight"], c)
            return y + read(node.params["bias"], c) if "bias" in node.params else y

        def update(buffer, batch_value, note):
            return Stage(out=buffer, out_index=(Affine.var("c"),), domain=(("c", channels),),
                         body=(1 - momentum) * read(buffer, c) + momentum * batch_value, layer=node.name,
                         role="stats", note=note, mode="train", differentiable=False)

        elementwise = dict(out=node.output, out_index=tuple(Affine.var(n) for n in "bchw"),
                           domain=tuple(zip("bchw", out_shape)), layer=node.name)
        batch = [
            Stage(out=mean, body=x / count, note="batch mean μ", **per_channel),
            Stage(out=variance, body=(x - read(mean, c)) ** 2 / count, note="batch variance σ²", **per_channel),
            Stage(body=normalized(read(mean, c), read(variance, c)), note="normalize, scale, shift", mode=batch_mode,
                  **elementwise),
        ]
        if not tracking:
            return batch
        running_mean, running_var = node.params["running_mean"], node.params["running_var"]
        return batch + [
            Stage(body=normalized(read(running_mean, c), read(running_var, c)),
                  note="normalize with running statistics", mode="eval", **elementwise),
            update(running_mean, read(mean, c), "running mean"),
            update(running_var, read(variance, c) * count / (count - 1), "running variance (unbiased)"),
        ]


def counter_name(layer: str) -> str:
    """The runtime scalar holding a batch norm's num_batches_tracked before this step."""
    return f"{layer.split('#')[0]}.num_batches_tracked"


def update_factor(node):
    """PyTorch's exponential_average_factor: the momentum, or 1/num_batches_tracked (counted after
    this call's increment: the k-th call of a layer within a step, its graph name ending ``#k``)."""
    momentum = node.attrs.get("momentum", 0.1)
    if momentum is not None:
        return sympy.Float(momentum)
    call = int(node.name.split("#")[1]) if "#" in node.name else 1
    return 1 / (sympy.Symbol(counter_name(node.name), positive=True) + call)


def tracked_calls(ops) -> dict[str, int]:
    """Per batch-norm layer that keeps running statistics (by state_dict name), how many times
    one step calls it: PyTorch adds one to num_batches_tracked per call."""
    calls: dict[str, int] = {}
    for node in ops:
        if node.kind == "batchnorm2d" and node.attrs.get("track_running_stats", True):
            name = node.name.split("#")[0]
            calls[name] = calls.get(name, 0) + 1
    return calls


def counter_scalars(calls: dict[str, int], steps: int) -> dict[str, float]:
    """The runtime scalars of `update_factor` for a step after ``steps`` steps."""
    return {counter_name(name): float(k * steps) for name, k in calls.items()}


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


@register
class Dropout2d(Dropout):
    """Whole channels: one mask value per (example, channel), broadcast over the map."""

    kind = "dropout2d"

    def infer(self, node, shapes):
        if len(shapes[0]) != 4:
            raise ShapeError(f"{where(node)} expects a 4-D input (N, C, H, W), got {fmt_shape(shapes[0])}; "
                             f"use Dropout for other shapes")
        return super().infer(node, shapes)

    def noise_shapes(self, node, shapes):
        return {"mask": tuple(shapes[0][:2])}

    def lower(self, node, shapes, out_shape):
        mask = node.params["mask"]
        train = elementwise_stage(node, node.output, out_shape,
                                  lambda syms: read(node.inputs[0], *syms) * read(mask, *syms[:2]),
                                  note=f"channel dropout p={node.attrs.get('p', 0.5)}: "
                                       f"× mask[b, c] ∈ {{0, 1/(1−p)}}")
        keep = elementwise_stage(node, node.output, out_shape, lambda syms: read(node.inputs[0], *syms),
                                 note="channel dropout (eval: identity)")
        return [train.with_(mode="train"), keep.with_(mode="eval")]
