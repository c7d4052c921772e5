"""Losses as stages, averaged over the batch like PyTorch's default ``reduction="mean"``.

Softmax cross-entropy is max → exp → Σ → log, with the label picked by a Kronecker delta
(no one-hot tensor). The max is a numerical shift that cancels in the loss, so it is marked
non-differentiable; the gradient (softmax − δ)/B is derived from the remaining stages.
"""
from __future__ import annotations

import sympy

from ..affine import Affine
from ..errors import ShapeError, where
from ..expr import BATCH, Stage, read, var
from .base import OpDef, fmt_shape, register

SCALAR = (1,)  # sympy's Indexed needs an index, so a scalar is a 1-element tensor read at 0


def scalar_stage(node, out, body, reduce=(), combine=None, note="") -> Stage:
    return Stage(out=out, out_index=(Affine.constant(0),), domain=(), body=body, reduce=reduce, combine=combine,
                 layer=node.name, role="loss", note=note)


@register
class CrossEntropy(OpDef):
    kind = "cross_entropy"

    def infer(self, node, shapes):
        pred, target = shapes
        if len(pred) != 2:
            raise ShapeError(f"{where(node)}: CrossEntropyLoss needs logits of shape (N, classes), got "
                             f"{fmt_shape(pred)}; flatten the network's output")
        return SCALAR

    def lower(self, node, shapes, out_shape):
        (_, classes), _ = shapes
        Z, Y, L = node.inputs[0], node.inputs[1], node.output
        b, k = var("b"), var("k")
        per_b = dict(out_index=(Affine.var("b"),), domain=(("b", BATCH),), layer=node.name, role="loss")
        over_k = dict(reduce=(("k", classes),), combine="sum")
        return [
            Stage(out=L + ".max", body=read(Z, b, k), reduce=(("k", classes),), combine="max",
                  differentiable=False, note="shift (cancels, not differentiated)", **per_b),
            Stage(out=L + ".exp", out_index=(Affine.var("b"), Affine.var("k")),
                  domain=(("b", BATCH), ("k", classes)), body=sympy.exp(read(Z, b, k) - read(L + ".max", b)),
                  layer=node.name, role="loss", note="exp"),
            Stage(out=L + ".sum", body=read(L + ".exp", b, k), note="Σ exp", **over_k, **per_b),
            Stage(out=L + ".picked", body=read(Z, b, k) * sympy.KroneckerDelta(k, read(Y, b)),
                  note="logit of the label", **over_k, **per_b),
            Stage(out=L + ".each", body=sympy.log(read(L + ".sum", b)) + read(L + ".max", b) - read(L + ".picked", b),
                  note="−log softmax at the label", **per_b),
            scalar_stage(node, L, read(L + ".each", b) / BATCH, reduce=(("b", BATCH),), combine="sum",
                         note="mean over the batch"),
        ]


class Regression(OpDef):
    def infer(self, node, shapes):
        pred, target = shapes
        if tuple(pred[1:]) != tuple(target[1:]):
            raise ShapeError(f"{where(node)}: prediction {fmt_shape(pred)} and target {fmt_shape(target)} "
                             f"must have the same shape")
        return SCALAR

    def lower(self, node, shapes, out_shape):
        pred = shapes[0]
        names = ["b"] + [f"k{a}" for a in range(1, len(pred))]
        syms = [var(n) for n in names]
        count = BATCH
        for s in pred[1:]:
            count = count * s
        diff = read(node.inputs[0], *syms) - read(node.inputs[1], *syms)
        return [scalar_stage(node, node.output, self.penalty(diff) / count,
                             reduce=tuple(zip(names, (BATCH,) + tuple(pred[1:]))), combine="sum",
                             note=self.kind)]


@register
class MSE(Regression):
    kind = "mse"

    def penalty(self, diff):
        return diff ** 2


@register
class L1(Regression):
    kind = "l1"

    def penalty(self, diff):
        return sympy.Abs(diff)


@register
class WeightedSum(OpDef):
    """The total of several heads' losses: ``L = Σ_h w_h·L_h``."""

    kind = "weighted_sum"

    def infer(self, node, shapes):
        return SCALAR

    def lower(self, node, shapes, out_shape):
        body = sum(sympy.Float(w) * read(t, 0) for w, t in zip(node.attrs["weights"], node.inputs))
        return [scalar_stage(node, node.output, body, note="weighted total")]
