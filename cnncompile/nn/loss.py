"""Losses with PyTorch's constructor arguments (same positional order, same defaults).

A loss object only describes: what its target looks like, how a target array is checked, and
the options its op (`cnncompile.ir.ops.loss`) writes into the formulas. Options a compiled
trainer cannot honour are a `CompileError` that names the loss, the argument and what works.
"""
from __future__ import annotations

import math

import numpy as np

from cnncompile.ir.errors import CompileError

REDUCTIONS = ("mean", "sum", "none")


def bind(loss: str, params: tuple, keyword_only: tuple, args: tuple, kwargs: dict) -> dict:
    """``args``/``kwargs`` matched to ``params`` (PyTorch's order and defaults) as Python would,
    but every mistake is a CompileError naming the loss and what it accepts."""
    names = [n for n, _ in params]
    accepted = names + [n for n, _ in keyword_only]
    if len(args) > len(params):
        raise CompileError(f"{loss} takes at most {len(params)} positional arguments ({', '.join(names)}), "
                           f"got {len(args)}")
    values = dict(params) | dict(keyword_only)
    values.update(zip(names, args))
    for key, value in kwargs.items():
        if key not in values:
            raise CompileError(f"{loss} has no argument {key!r}; it accepts {', '.join(accepted)}")
        if key in names[:len(args)]:
            raise CompileError(f"{loss} got argument {key!r} twice (by position and by name)")
        values[key] = value
    return values


def differs(value, default) -> bool:
    """Whether an argument was given a value other than its default (for ``repr``)."""
    if default is None or value is None:
        return value is not default
    try:
        return bool(value != default)
    except (TypeError, ValueError):
        return True


def plain(value):
    """A tensor or NumPy value as Python lists and numbers (what a checkpoint's JSON can hold)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def legacy_reduction(loss: str, size_average, reduce, reduction: str) -> str:
    """PyTorch's deprecated ``size_average``/``reduce`` flags, mapped as PyTorch maps them."""
    if size_average is None and reduce is None:
        reduction_ok(loss, reduction)
        return reduction
    size_average = True if size_average is None else bool(size_average)
    reduce = True if reduce is None else bool(reduce)
    return "mean" if size_average and reduce else "sum" if reduce else "none"


def reduction_ok(loss: str, reduction) -> None:
    if reduction not in REDUCTIONS:
        raise CompileError(f"{loss}: reduction={reduction!r} is not supported; use 'mean' or 'sum' "
                           f"('none' only describes per-example losses, which cannot be trained on)")


def as_constant(loss: str, arg: str, value, ndim: int | None = None) -> list | None:
    """A weight tensor (list, NumPy array or torch tensor) as nested lists of floats (it is compiled
    into the formulas, and is part of the program's cache key)."""
    if value is None:
        return None
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CompileError(f"{loss}: {arg} must be a tensor of numbers, got {type(value).__name__}") from None
    if ndim is not None and arr.ndim != ndim:
        raise CompileError(f"{loss}: {arg} must be a {ndim}-D tensor (one value per class), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CompileError(f"{loss}: {arg} contains NaN or Inf")
    return arr.tolist()


def as_positive_number(loss: str, arg: str, value, allow_zero: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CompileError(f"{loss}: {arg} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise CompileError(f"{loss}: {arg} must be {'≥ 0' if allow_zero else '> 0'}, got {value!r}")
    return number


class Loss:
    """Base: ``PARAMS`` are PyTorch's constructor arguments in order, ``KEYWORD_ONLY`` our own."""

    kind = ""
    target_dtype = "float"
    PARAMS: tuple = (("size_average", None), ("reduce", None), ("reduction", "mean"))
    KEYWORD_ONLY: tuple = ()

    def __init__(self, *args, **kwargs):
        name = type(self).__name__
        values = bind(name, self.PARAMS, self.KEYWORD_ONLY, args, kwargs)
        defaults = dict(self.PARAMS + self.KEYWORD_ONLY)
        self._given = {k: plain(v) for k, v in values.items() if differs(v, defaults[k])}  # JSON: checkpoints
        self.reduction = legacy_reduction(name, values.pop("size_average", None), values.pop("reduce", None),
                                          values.pop("reduction", "mean"))
        self.configure(**values)

    def configure(self, **options) -> None:
        """Check and keep the loss's own options (none by default)."""

    def attrs(self) -> dict:
        """What the op needs, as plain values (part of the program's cache key)."""
        return {"reduction": self.reduction}

    def target_shape(self, pred_shape: tuple) -> tuple:
        return tuple(pred_shape[1:])

    def prepare_target(self, target, batch: int, pred_shape: tuple, dtype, what: str = "target") -> np.ndarray:
        """The target as the compiled program reads it, checked: shape, type, finiteness."""
        from cnncompile import validate
        arr = validate.as_batch(target, self.target_shape(pred_shape), dtype, what)
        if len(arr) != batch:
            raise ValueError(f"{what} has {len(arr)} rows but the input has {batch}")
        return arr

    def mean_denominator(self, target, batch: int) -> float:
        """What ``reduction="mean"`` divided this batch's sum by, up to a factor common to every
        batch: chunks ``c`` of a data set combine into its mean as ``Σ_c L_c·d_c / Σ_c d_c``."""
        return float(batch)

    def accuracy_counts(self, out, target):
        """(correct, counted) for a classification loss, else None (no accuracy to report)."""
        return None

    def __repr__(self):
        shown = ", ".join(f"{k}={v!r}" for k, v in self._given.items() if k not in ("size_average", "reduce"))
        return f"{type(self).__name__}({shown})"


class _ClassIndexLoss(Loss):
    """Shared by CrossEntropyLoss and NLLLoss: class weights and an ignored target value."""

    kind = ""
    target_dtype = "int"

    def configure(self, weight=None, ignore_index=-100, **rest):
        name = type(self).__name__
        self.weight = as_constant(name, "weight", weight, ndim=1)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise CompileError(f"{name}: ignore_index must be an integer class index, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def attrs(self):
        return super().attrs() | {"weight": self.weight, "ignore_index": self.ignore_index}

    def target_shape(self, pred_shape):
        return tuple(pred_shape[2:])

    def mean_denominator(self, target, batch):
        """``Σ ω``: the weights of the targets' classes, ignored targets excluded (PyTorch's weighted mean)."""
        target = np.asarray(target)
        keep = target != self.ignore_index
        if self.weight is None:
            return float(keep.sum())
        return float(np.asarray(self.weight)[np.where(keep, target, 0)][keep].sum())

    def accuracy_counts(self, out, target):
        """Correct predictions (argmax over the class axis) and positions counted, ignored targets left out."""
        target = np.asarray(target)
        keep = target != self.ignore_index
        return int(((np.asarray(out).argmax(1) == target) & keep).sum()), int(keep.sum())

    def prepare_target(self, target, batch, pred_shape, dtype, what="target"):
        return class_targets(target, (batch, *self.target_shape(pred_shape)), pred_shape[1], self.ignore_index,
                             what, type(self).__name__)


class CrossEntropyLoss(_ClassIndexLoss):
    """Log-softmax over dim 1 and the negative log-likelihood, fused; PyTorch's options.

    Targets are class indices of shape (N,) for logits (N, C), or (N, H, W) for maps (N, C, H, W).
    PyTorch tells class-probability targets by their dtype when it runs; a compiled program has to
    know beforehand: pass ``probabilities=True`` (keyword only, not a PyTorch argument), and the
    target is a float tensor of the logits' shape.
    """

    kind = "cross_entropy"
    PARAMS = (("weight", None), ("size_average", None), ("ignore_index", -100), ("reduce", None),
              ("reduction", "mean"), ("label_smoothing", 0.0))
    KEYWORD_ONLY = (("probabilities", False),)

    def configure(self, weight=None, ignore_index=-100, label_smoothing=0.0, probabilities=False):
        super().configure(weight=weight, ignore_index=ignore_index)
        name = type(self).__name__
        self.label_smoothing = as_positive_number(name, "label_smoothing", label_smoothing, allow_zero=True)
        if self.label_smoothing > 1:
            raise CompileError(f"{name}: label_smoothing must be between 0 and 1, got {label_smoothing!r}")
        if probabilities not in (True, False):
            raise CompileError(f"{name}: probabilities must be True or False, got {probabilities!r}")
        self.probabilities = bool(probabilities)
        if self.probabilities:
            if self.ignore_index >= 0:
                raise CompileError(f"{name}: ignore_index={self.ignore_index} cannot be used with class-probability "
                                   f"targets (probabilities=True), as in PyTorch; leave ignore_index at its default")
            self.kind, self.target_dtype = "cross_entropy_probabilities", "float"

    def attrs(self):
        return super().attrs() | {"label_smoothing": self.label_smoothing}

    def target_shape(self, pred_shape):
        return tuple(pred_shape[1:]) if self.probabilities else tuple(pred_shape[2:])

    def mean_denominator(self, target, batch):
        return Loss.mean_denominator(self, target, batch) if self.probabilities else \
            super().mean_denominator(target, batch)

    def accuracy_counts(self, out, target):
        """With class probabilities, a prediction is correct where it picks the most probable class."""
        if not self.probabilities:
            return super().accuracy_counts(out, target)
        hits = np.asarray(out).argmax(1) == np.asarray(target).argmax(1)
        return int(hits.sum()), int(hits.size)

    def prepare_target(self, target, batch, pred_shape, dtype, what="target"):
        if self.probabilities:
            return Loss.prepare_target(self, target, batch, pred_shape, dtype, what)
        return super().prepare_target(target, batch, pred_shape, dtype, what)


class NLLLoss(_ClassIndexLoss):
    """The negative log-likelihood of log-probabilities (after ``nn.LogSoftmax(dim=1)``)."""

    kind = "nll"
    PARAMS = (("weight", None), ("size_average", None), ("ignore_index", -100), ("reduce", None),
              ("reduction", "mean"))


class MSELoss(Loss):
    kind = "mse"


class L1Loss(Loss):
    kind = "l1"


class SmoothL1Loss(Loss):
    """½d²/β where |d| < β, else |d| − ½β (β = 0: the L1 loss)."""

    kind = "smooth_l1"
    PARAMS = (("size_average", None), ("reduce", None), ("reduction", "mean"), ("beta", 1.0))

    def configure(self, beta=1.0):
        self.beta = as_positive_number(type(self).__name__, "beta", beta, allow_zero=True)

    def attrs(self):
        return super().attrs() | {"beta": self.beta}


class HuberLoss(Loss):
    """½d² where |d| < δ, else δ(|d| − ½δ)."""

    kind = "huber"
    PARAMS = (("reduction", "mean"), ("delta", 1.0))

    def configure(self, delta=1.0):
        self.delta = as_positive_number(type(self).__name__, "delta", delta, allow_zero=False)

    def attrs(self):
        return super().attrs() | {"delta": self.delta}


class BCEWithLogitsLoss(Loss):
    """Sigmoid and binary cross-entropy fused, in the numerically stable form; ``weight`` and
    ``pos_weight`` broadcast against one example's shape (they may vary along one axis)."""

    kind = "bce_with_logits"
    PARAMS = (("weight", None), ("size_average", None), ("reduce", None), ("reduction", "mean"),
              ("pos_weight", None))

    def configure(self, weight=None, pos_weight=None):
        self.weight = as_constant(type(self).__name__, "weight", weight)
        self.pos_weight = as_constant(type(self).__name__, "pos_weight", pos_weight)

    def attrs(self):
        return super().attrs() | {"weight": self.weight, "pos_weight": self.pos_weight}


def class_targets(y, shape: tuple, classes: int, ignore_index: int, what: str, loss: str) -> np.ndarray:
    """Class indices as int64 of exactly ``shape``, each in ``[0, classes)`` or ``ignore_index``."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    hint = (" (for class-probability targets, compile with CrossEntropyLoss(probabilities=True))"
            if loss == "CrossEntropyLoss" and arr.dtype.kind == "f" else "")
    if arr.shape != tuple(shape):
        raise ValueError(f"{what} has shape {arr.shape}; {loss} expects class indices of shape {tuple(shape)}"
                         + ("" if len(shape) == 1 else " (one class index per position of the map)") + hint)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold integer class indices, got non-integral floats{hint}")
    elif arr.dtype.kind not in "iub":
        raise TypeError(f"{what} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[((arr < 0) | (arr >= classes)) & (arr != ignore_index)]
    if bad.size:
        raise ValueError(f"{what} holds label {bad[0]}, outside 0..{classes - 1} (the network has {classes} outputs; "
                         f"{loss}'s ignore_index is {ignore_index})")
    return np.ascontiguousarray(arr)
