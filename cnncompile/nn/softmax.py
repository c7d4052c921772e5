"""Softmax and LogSoftmax layers (over dim 1: the classes, or a map's channels).

Stages like any other layer (`cnncompile.ir.ops.loss`): max shift, exp, Σ; their backward is
derived. ``LogSoftmax`` followed by ``NLLLoss`` is cross-entropy in two layers, as in PyTorch.
"""
from __future__ import annotations

from .module import Layer


class _SoftmaxLayer(Layer):
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def attrs(self):
        return dict(dim=self.dim)


class Softmax(_SoftmaxLayer):
    kind = "softmax"


class LogSoftmax(_SoftmaxLayer):
    kind = "log_softmax"
