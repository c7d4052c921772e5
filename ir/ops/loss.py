"""Losses (and softmax layers) as stages, with PyTorch's options and reductions.

Softmax cross-entropy is max → exp → Σ → log, with the label picked by a Kronecker delta
(no one-hot tensor). The max is a numerical shift that cancels in the loss, so it is marked
non-differentiable; the gradient (softmax − δ)/B is derived from the remaining stages.

Class-index losses work per position ``P`` = (example, and the map's pixels for (N, C, H, W)
logits): each position's loss is weighted by ``ω[P] = (1 − δ(Y[P], ignore_index))·w[Y[P]]``,
and ``reduction="mean"`` divides by ``Σ_P ω[P]`` (PyTorch's weighted mean; ignored targets count
for nothing). Constant weight tensors are stages ``w[k] = Σ_c w_c·δ(k, c)`` (no data to load).
Every backward stage is derived (`ir.autodiff`), none is written here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cnncompile.ir.lazy import sympy

from ..affine import Affine
from ..errors import CompileError, ShapeError, where
from ..expr import BATCH, Stage, read, var
from .base import OpDef, fmt_shape, register

SCALAR = (1,)  # sympy's Indexed needs an index, so a scalar is a 1-element tensor read at 0


def scalar_stage(node, out, body, reduce=(), combine=None, note="") -> Stage:
    return Stage(out=out, out_index=(Affine.constant(0),), domain=(), body=body, reduce=reduce, combine=combine,
                 layer=node.name, role="loss", note=note)


@dataclass(frozen=True)
class Positions:
    """One prediction's positions: the batch, then any map axes after the class axis."""

    names: tuple
    extents: tuple

    @classmethod
    def of(cls, pred_shape: tuple) -> "Positions":
        spatial = ("h", "w") if len(pred_shape) == 4 else tuple(f"p{a}" for a in range(2, len(pred_shape)))
        return cls(("b",) + spatial, (pred_shape[0],) + tuple(pred_shape[2:]))

    @property
    def syms(self) -> list:
        return [var(n) for n in self.names]

    @property
    def domain(self) -> tuple:
        return tuple(zip(self.names, self.extents))

    @property
    def count(self):
        """How many positions there are: ``B·H·W``."""
        total = BATCH
        for e in self.extents[1:]:
            total = total * e
        return total

    def at(self, tensor: str) -> sympy.Indexed:
        return read(tensor, *self.syms)

    def with_class(self, tensor: str, k) -> sympy.Indexed:
        """``T[b, k, h, w]``: the class axis second, as in PyTorch."""
        s = self.syms
        return read(tensor, s[0], k, *s[1:])

    def stage(self, node, out, body, role="loss", **kw) -> Stage:
        return Stage(out=out, out_index=tuple(Affine.var(n) for n in self.names), domain=self.domain, body=body,
                     layer=node.name, role=role, **kw)


def check_reduction(node) -> None:
    reduction = node.attrs.get("reduction", "mean")
    if reduction == "none":
        raise CompileError(f"{where(node)}: reduction='none' gives one loss per example, which cannot be the "
                           f"training objective; use reduction='mean' or reduction='sum'")
    if reduction not in ("mean", "sum"):
        raise CompileError(f"{where(node)}: reduction={reduction!r} is not supported; use 'mean' or 'sum'")


def total(node, each: sympy.Expr, pos: Positions, denominator, note: str) -> Stage:
    """``L = Σ_P each`` or, for ``reduction="mean"``, ``Σ_P each / denominator``."""
    mean = node.attrs.get("reduction", "mean") == "mean"
    return scalar_stage(node, node.output, each / denominator if mean else each, reduce=pos.domain, combine="sum",
                        note=("mean" if mean else "sum") + f" over {note}")


def constant_vector(node, name: str, values: list, note: str) -> list[Stage]:
    """``name[k] = Σ_c v_c·δ(k, c)``: a constant tensor written by a stage, read like any other."""
    k = var("k")
    body = sympy.Add(*(sympy.Float(v) * sympy.KroneckerDelta(k, c) for c, v in enumerate(values) if v != 0))
    return [Stage(out=name, out_index=(Affine.var("k"),), domain=(("k", len(values)),), body=body,
                  differentiable=False, layer=node.name, role="loss", note=note)]


def uniform(values: list | None):
    """The one value of a constant tensor whose entries are all equal, else None."""
    if values is None:
        return 1.0
    return values[0] if len(set(values)) == 1 else None


# ----- softmax ---------------------------------------------------------------------------------

def softmax_parts(node, Z: str, pos: Positions, classes: int, role: str) -> tuple[list[Stage], sympy.Expr, sympy.Expr]:
    """max (a shift, not differentiated) → exp → Σ over classes; returns the stages, the max and Σ reads."""
    k = var("k")
    over_k = dict(reduce=(("k", classes),))
    prefix = node.output
    exp_domain = (pos.domain[0], ("k", classes)) + pos.domain[1:]
    exp_index = (Affine.var("b"), Affine.var("k")) + tuple(Affine.var(n) for n in pos.names[1:])
    stages = [
        pos.stage(node, prefix + ".max", pos.with_class(Z, k), role, combine="max", differentiable=False,
                  note="shift (cancels, not differentiated)", **over_k),
        Stage(out=prefix + ".exp", out_index=exp_index, domain=exp_domain,
              body=sympy.exp(pos.with_class(Z, k) - pos.at(prefix + ".max")), layer=node.name, role=role, note="exp"),
        pos.stage(node, prefix + ".sum", pos.with_class(prefix + ".exp", k), role, combine="sum", note="Σ exp",
                  **over_k),
    ]
    return stages, pos.at(prefix + ".max"), pos.at(prefix + ".sum")


class SoftmaxOp(OpDef):
    """``Softmax(dim=1)`` / ``LogSoftmax(dim=1)`` over the classes (or channels of a map)."""

    def infer(self, node, shapes):
        (shape,) = shapes
        dim, rank = node.attrs.get("dim"), len(shape)
        if dim is None:
            if rank == 3:  # PyTorch's implicit choice for 3-D input is dim 0: the batch
                raise CompileError(f"{where(node)}: give dim=1 explicitly for a 3-D input")
            dim = 1
        if not isinstance(dim, int) or not -rank <= dim < rank or dim % rank != 1:
            raise CompileError(f"{where(node)}: only dim=1 (the classes, or a map's channels) is supported, got "
                               f"dim={dim!r} for input {fmt_shape(shape)}")
        return shape

    def lower(self, node, shapes, out_shape):
        (shape,) = shapes
        pos = Positions.of(shape)
        stages, mx, total_exp = softmax_parts(node, node.inputs[0], pos, shape[1], "forward")
        k = var("k")
        body = self.formula(pos.with_class(node.inputs[0], k), pos.with_class(node.output + ".exp", k), mx, total_exp)
        exp_domain = (pos.domain[0], ("k", shape[1])) + pos.domain[1:]
        exp_index = (Affine.var("b"), Affine.var("k")) + tuple(Affine.var(n) for n in pos.names[1:])
        return stages + [Stage(out=node.output, out_index=exp_index, domain=exp_domain, body=body, layer=node.name,
                               note=self.kind)]


@register
class Softmax(SoftmaxOp):
    kind = "softmax"

    def formula(self, z, e, mx, s):
        return e / s


@register
class LogSoftmax(SoftmaxOp):
    kind = "log_softmax"

    def formula(self, z, e, mx, s):
        return z - mx - sympy.log(s)


# ----- class-index losses ----------------------------------------------------------------------

class ClassIndexLoss(OpDef):
    """Cross-entropy and NLL with class-index targets: weights, ignore_index, maps."""

    what = ""

    def infer(self, node, shapes):
        pred, target = shapes
        check_reduction(node)
        if len(pred) < 2:
            raise ShapeError(f"{where(node)} needs {self.what} of shape (N, classes) or (N, classes, H, W), got "
                             f"{fmt_shape(pred)}")
        if tuple(target[1:]) != tuple(pred[2:]):
            raise ShapeError(f"{where(node)}: targets of shape {fmt_shape(target)} do not fit {self.what} "
                             f"{fmt_shape(pred)}; class indices have the prediction's shape without the class axis")
        weight = node.attrs.get("weight")
        if weight is not None and len(weight) != pred[1]:
            raise ShapeError(f"{where(node)}: weight has {len(weight)} entries but the prediction has {pred[1]} "
                             f"classes; give one weight per class")
        return SCALAR

    def target_weight(self, node, pos: Positions, classes: int) -> tuple[list[Stage], sympy.Expr, sympy.Expr]:
        """Stages for ``w[Y[P]]``, and the expressions ``valid[P]`` and ``ω[P] = valid·w[Y[P]]``."""
        y = pos.at(node.inputs[1])
        valid = 1 - sympy.KroneckerDelta(y, node.attrs.get("ignore_index", -100))
        weight = node.attrs.get("weight")
        same = uniform(weight)
        if same is not None:
            return [], valid, (valid if same == 1.0 else sympy.Float(same) * valid)
        L, k = node.output, var("k")
        stages = constant_vector(node, L + ".class_weight", weight, "class weights")
        stages.append(pos.stage(node, L + ".target_weight", read(L + ".class_weight", k) * sympy.KroneckerDelta(k, y),
                                reduce=(("k", classes),), combine="sum", differentiable=False,
                                note="weight of the target's class"))
        return stages, valid, valid * pos.at(L + ".target_weight")

    def denominator(self, node, pos: Positions, omega) -> tuple[list[Stage], sympy.Expr]:
        """``Σ_P ω[P]``, the weighted count a mean divides by."""
        if node.attrs.get("reduction", "mean") != "mean":
            return [], sympy.Integer(1)
        name = node.output + ".count"
        return ([scalar_stage(node, name, omega, reduce=pos.domain, combine="sum",
                              note="Σ target weights (ignored targets excluded)")], read(name, 0))

    def picked(self, node, pos: Positions, classes: int) -> Stage:
        k, y = var("k"), pos.at(node.inputs[1])
        return pos.stage(node, node.output + ".picked", pos.with_class(node.inputs[0], k) * sympy.KroneckerDelta(k, y),
                         reduce=(("k", classes),), combine="sum", note=f"{self.what} at the target class")


@register
class CrossEntropy(ClassIndexLoss):
    kind = "cross_entropy"
    what = "logits"

    def lower(self, node, shapes, out_shape):
        pred = shapes[0]
        classes, pos, L = pred[1], Positions.of(pred), node.output
        eps = float(node.attrs.get("label_smoothing", 0.0))
        stages, mx, total_exp = softmax_parts(node, node.inputs[0], pos, classes, "loss")
        weights, valid, omega = self.target_weight(node, pos, classes)
        stages += weights + [self.picked(node, pos, classes)]
        lse = sympy.log(total_exp) + mx
        each = omega * (lse - pos.at(L + ".picked"))
        if eps > 0:  # PyTorch: (1 − ε)·nll + ε/C·Σ_k w_k·(−log softmax_k), the latter with the same weights
            stages.append(self.smoothing_sum(node, pos, classes))
            weight = node.attrs.get("weight")
            weight_sum = float(np.sum(weight)) if weight is not None else float(classes)
            each = (sympy.Float(1 - eps) * each
                    + sympy.Float(eps / classes) * valid * (sympy.Float(weight_sum) * lse - pos.at(L + ".smooth")))
        count, denominator = self.denominator(node, pos, omega)
        stages.append(pos.stage(node, L + ".each", each, note="−log softmax at the target, weighted"))
        return stages + count + [total(node, pos.at(L + ".each"), pos, denominator, "the targets")]

    def smoothing_sum(self, node, pos: Positions, classes: int) -> Stage:
        """``Σ_k w_k·Z[b, k]``: with Σ_k w_k·lse, the label-smoothing term."""
        k = var("k")
        z = pos.with_class(node.inputs[0], k)
        weight = node.attrs.get("weight")
        body = z if weight is None else read(node.output + ".class_weight", k) * z
        if weight is not None and uniform(weight) is not None:
            body = sympy.Float(uniform(weight)) * z
        return pos.stage(node, node.output + ".smooth", body, reduce=(("k", classes),), combine="sum",
                         note="Σ of the weighted logits (label smoothing)")


@register
class NLL(ClassIndexLoss):
    kind = "nll"
    what = "log-probabilities"

    def lower(self, node, shapes, out_shape):
        pred = shapes[0]
        classes, pos, L = pred[1], Positions.of(pred), node.output
        weights, _, omega = self.target_weight(node, pos, classes)
        count, denominator = self.denominator(node, pos, omega)
        return weights + [self.picked(node, pos, classes)] + count + [
            total(node, -omega * pos.at(L + ".picked"), pos, denominator, "the targets")]


@register
class CrossEntropyProbabilities(OpDef):
    """Cross-entropy against class probabilities: ``Σ_k w_k·t_k·(lse − z_k)`` per position, the mean
    over positions (PyTorch does not normalize by the weights here)."""

    kind = "cross_entropy_probabilities"

    def infer(self, node, shapes):
        pred, target = shapes
        check_reduction(node)
        if len(pred) < 2 or tuple(target[1:]) != tuple(pred[1:]):
            raise ShapeError(f"{where(node)}: class-probability targets {fmt_shape(target)} must have the logits' "
                             f"shape {fmt_shape(pred)}")
        weight = node.attrs.get("weight")
        if weight is not None and len(weight) != pred[1]:
            raise ShapeError(f"{where(node)}: weight has {len(weight)} entries but the logits have {pred[1]} "
                             f"classes; give one weight per class")
        return SCALAR

    def lower(self, node, shapes, out_shape):
        pred = shapes[0]
        classes, pos, L = pred[1], Positions.of(pred), node.output
        eps = float(node.attrs.get("label_smoothing", 0.0))
        stages, mx, total_exp = softmax_parts(node, node.inputs[0], pos, classes, "loss")
        k = var("k")
        t = pos.with_class(node.inputs[1], k)
        if eps > 0:
            t = sympy.Float(1 - eps) * t + sympy.Float(eps / classes)
        weight = node.attrs.get("weight")
        if uniform(weight) is None:
            stages += constant_vector(node, L + ".class_weight", weight, "class weights")
            t = read(L + ".class_weight", k) * t
        elif uniform(weight) != 1.0:
            t = sympy.Float(uniform(weight)) * t
        each = t * (sympy.log(total_exp) + mx - pos.with_class(node.inputs[0], k))
        stages.append(pos.stage(node, L + ".each", each, reduce=(("k", classes),), combine="sum",
                                note="−Σ_k target·log softmax"))
        return stages + [total(node, pos.at(L + ".each"), pos, pos.count, "the positions")]


# ----- elementwise losses ----------------------------------------------------------------------

def relu(x):
    return sympy.Piecewise((x, x > 0), (0, True))


class Regression(OpDef):
    """``Σ penalty(x, t)`` over every element, divided by their number for the mean."""

    def infer(self, node, shapes):
        pred, target = shapes
        check_reduction(node)
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
        stages, penalty = self.penalty(node, read(node.inputs[0], *syms), read(node.inputs[1], *syms), syms, pred)
        mean = node.attrs.get("reduction", "mean") == "mean"
        return stages + [scalar_stage(node, node.output, penalty / count if mean else penalty,
                                      reduce=tuple(zip(names, (BATCH,) + tuple(pred[1:]))), combine="sum",
                                      note=self.kind + ("" if mean else " (sum)"))]

    def penalty(self, node, x, t, syms, pred) -> tuple[list[Stage], sympy.Expr]:
        return [], self.of_difference(node.attrs, x - t)


@register
class MSE(Regression):
    kind = "mse"

    def of_difference(self, attrs, diff):
        return diff ** 2


@register
class L1(Regression):
    kind = "l1"

    def of_difference(self, attrs, diff):
        return sympy.Abs(diff)


@register
class SmoothL1(Regression):
    kind = "smooth_l1"

    def of_difference(self, attrs, diff):
        beta = float(attrs.get("beta", 1.0))
        if beta == 0:  # PyTorch: the L1 loss
            return sympy.Abs(diff)
        return sympy.Piecewise((sympy.Float(0.5 / beta) * diff ** 2, sympy.Abs(diff) < beta),
                               (sympy.Abs(diff) - sympy.Float(0.5 * beta), True))


@register
class Huber(Regression):
    kind = "huber"

    def of_difference(self, attrs, diff):
        delta = float(attrs.get("delta", 1.0))
        return sympy.Piecewise((sympy.Float(0.5) * diff ** 2, sympy.Abs(diff) < delta),
                               (sympy.Float(delta) * (sympy.Abs(diff) - sympy.Float(0.5 * delta)), True))


def softplus_of_negative(x):
    """``log(1 + e^(−x))`` without overflow: ``max(−x, 0) + log(1 + e^(−|x|))``, with the kinks
    written so that the derived slope at ``x = 0`` is the true −½ (−1 from the first, +½ from the
    second), not sympy's subgradient 0 of ``|x|``."""
    negative_part = sympy.Piecewise((-x, x <= 0), (0, True))
    magnitude = sympy.Piecewise((x, x > 0), (-x, True))
    return negative_part + sympy.log(1 + sympy.exp(-magnitude))


@register
class BCEWithLogits(Regression):
    kind = "bce_with_logits"

    def penalty(self, node, x, t, syms, pred):
        stages, weight = broadcast_constant(node, "weight", syms, pred)
        more, pos_weight = broadcast_constant(node, "pos_weight", syms, pred)
        log_weight = 1 if pos_weight is None else 1 + (pos_weight - 1) * t
        body = (1 - t) * x + log_weight * softplus_of_negative(x)
        return stages + more, body if weight is None else weight * body


def broadcast_constant(node, arg: str, syms: list, pred: tuple) -> tuple[list[Stage], sympy.Expr | None]:
    """A weight tensor broadcast against one example's shape (as NumPy/PyTorch broadcast it): a
    number, or a constant vector read along the one axis it varies on."""
    values = node.attrs.get(arg)
    if values is None:
        return [], None
    arr, example = np.asarray(values, dtype=np.float64), tuple(pred[1:])
    try:
        fits = arr.ndim <= len(example) and np.broadcast_shapes(arr.shape, example) == example
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"{where(node)}: {arg} of shape {arr.shape} does not broadcast against one example's shape "
                         f"{fmt_shape(example)} (weights that differ between examples of a batch are not supported)")
    varying = [a for a in range(arr.ndim) if arr.shape[a] > 1]
    if not varying:
        return [], sympy.Float(float(arr.reshape(-1)[0]))
    if len(varying) > 1:
        raise CompileError(f"{where(node)}: {arg} of shape {arr.shape} varies along {len(varying)} axes; only a number "
                           f"or a tensor that varies along one axis (e.g. one value per class) is supported")
    axis = varying[0]
    name = f"{node.output}.{arg}"
    example_axis = len(example) - arr.ndim + axis
    return constant_vector(node, name, arr.reshape(-1).tolist(), arg), read(name, syms[1 + example_axis])


@register
class WeightedSum(OpDef):
    """The total of several heads' losses: ``L = Σ_h w_h·L_h``."""

    kind = "weighted_sum"

    def infer(self, node, shapes):
        return SCALAR

    def lower(self, node, shapes, out_shape):
        body = sum(sympy.Float(w) * read(t, 0) for w, t in zip(node.attrs["weights"], node.inputs))
        return [scalar_stage(node, node.output, body, note="weighted total")]
