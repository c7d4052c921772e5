"""Class-index targets: maps (N, C, H, W) with (N, H, W) targets, ignore_index, and the checks
on target arrays (shape, integrality, range, the ignored value), against PyTorch in float64."""
import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn as cnn
from helpers import check_gradients, relative
from test_losses import (BACKENDS, LABELS, LABELS_IGNORED, MAP_LABELS, PROBS, W, X_FLAT, X_MAP, compare, conv_map,
                         flat, map_log_softmax, tw)

import torch  # noqa: E402  (the test extra)

CASES = {
    "ce_default_ignore": (flat, X_FLAT, LABELS_IGNORED, lambda nn: nn.CrossEntropyLoss(tw(W))),
    "ce_smoothing_weight_ignore": (flat, X_FLAT, LABELS_IGNORED,
                                   lambda nn: nn.CrossEntropyLoss(tw(W), label_smoothing=0.3)),
    "ce_smoothing_sum_ignore": (flat, X_FLAT, LABELS_IGNORED,
                                lambda nn: nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)),
    "ce_map": (conv_map, X_MAP, MAP_LABELS, lambda nn: nn.CrossEntropyLoss()),
    "ce_map_all_options": (conv_map, X_MAP, MAP_LABELS,
                           lambda nn: nn.CrossEntropyLoss(tw(W), ignore_index=2, label_smoothing=0.25)),
    "nll_map_sum": (map_log_softmax, X_MAP, MAP_LABELS, lambda nn: nn.NLLLoss(ignore_index=2, reduction="sum")),
    "nll_ignored": (lambda nn: nn.Sequential(nn.Linear(5, 4), nn.LogSoftmax(dim=1)), X_FLAT, LABELS_IGNORED,
                    lambda nn: nn.NLLLoss(tw(W))),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_parity(backend, name):
    builder, x, y, make = CASES[name]
    theirs = make(torch.nn)
    target = torch.tensor(y)
    compare(builder, x, y, make(cnn), lambda out: theirs(out, target), backend)


@pytest.mark.parametrize("name", ["ce_map_all_options", "ce_smoothing_weight_ignore", "nll_ignored"])
def test_finite_differences(name):
    builder, x, y, make = CASES[name]
    check_gradients(builder(cnn), x.shape[1:], make(cnn), x, y, "numpy", tol=1e-6)


@pytest.mark.parametrize("builder,x,loss,y,pattern", [
    (flat, X_FLAT, cnn.CrossEntropyLoss(ignore_index=-1), np.array([0, 1, 2, 3, -1, 4]), r"label 4, outside 0..3"),
    (flat, X_FLAT, cnn.CrossEntropyLoss(), np.array([0, 1, 2, 3, -1, 1]), r"label -1, outside 0..3.*ignore_index is -100"),
    (flat, X_FLAT, cnn.NLLLoss(), LABELS[:5], r"class indices of shape \(6,\)"),
    (conv_map, X_MAP, cnn.CrossEntropyLoss(ignore_index=7), np.where(MAP_LABELS == 1, 10, MAP_LABELS), r"label 10"),
    (conv_map, X_MAP, cnn.CrossEntropyLoss(), MAP_LABELS[:, 0], r"class indices of shape \(6, 3, 4\)"),
    (flat, X_FLAT, cnn.CrossEntropyLoss(), PROBS, r"class indices of shape \(6,\).*probabilities=True"),
    (flat, X_FLAT, cnn.CrossEntropyLoss(), PROBS[:, 0], r"integer class indices.*probabilities=True"),
    (flat, X_FLAT, cnn.CrossEntropyLoss(probabilities=True), LABELS, r"target has shape \(6,\); expected \(N, 4\)"),
])
def test_target_errors(builder, x, loss, y, pattern):
    model = cc.compile(builder(cnn), input_shape=x.shape[1:], loss=loss, backend="numpy")
    with pytest.raises(ValueError, match=pattern):
        model.loss_and_grads(x, y)


def test_ignored_targets_count_for_nothing():
    """A batch whose extra examples are all ignored has the loss and gradients of the batch without them."""
    model = cc.compile(conv_map(cnn), input_shape=(2, 3, 4), loss=cnn.CrossEntropyLoss([1.0, 2.0, 0.5, 1.0]),
                       dtype="float64", backend="numpy")
    y = MAP_LABELS.copy()
    y[4:] = -100
    loss, grads = model.loss_and_grads(X_MAP, y)
    loss4, grads4 = model.loss_and_grads(X_MAP[:4], MAP_LABELS[:4])
    assert relative(loss, loss4) < 1e-12
    for name in grads:
        assert relative(grads[name], grads4[name]) < 1e-12, name


@pytest.mark.parametrize("loss", [cnn.CrossEntropyLoss([1.0, 2.0, 0.5, 3.0], ignore_index=2, label_smoothing=0.2),
                                  cnn.CrossEntropyLoss(), cnn.NLLLoss(ignore_index=1)])
def test_chunks_combine_into_the_batch_mean(loss):
    """Losses of chunks weighted by ``mean_denominator`` give the whole batch's (weighted) mean."""
    model = cc.compile(map_log_softmax(cnn), input_shape=(2, 3, 4), loss=loss, dtype="float64", backend="numpy")
    whole = model.evaluate_loss(X_MAP, MAP_LABELS)
    parts = [(model.evaluate_loss(X_MAP[s], MAP_LABELS[s]), loss.mean_denominator(MAP_LABELS[s], 3))
             for s in (slice(0, 3), slice(3, 6))]
    combined = sum(v * d for v, d in parts) / sum(d for _, d in parts)
    assert relative(combined, whole) < 1e-12
