"""Losses: what the target looks like and which op computes the mean penalty."""
from __future__ import annotations


class Loss:
    kind = ""
    target_dtype = "float"

    def target_shape(self, pred_shape: tuple) -> tuple:
        return tuple(pred_shape[1:])

    def __repr__(self):
        return f"{type(self).__name__}()"


class CrossEntropyLoss(Loss):
    """Integer class targets; log-softmax fused; mean over the batch."""

    kind = "cross_entropy"
    target_dtype = "int"

    def target_shape(self, pred_shape):
        return ()


class MSELoss(Loss):
    kind = "mse"


class L1Loss(Loss):
    kind = "l1"
