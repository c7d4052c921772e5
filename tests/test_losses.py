"""Losses and their options against PyTorch (float64): the loss value and every parameter's
gradient on both backends, finite differences for a few, and the errors for options a compiled
trainer cannot honour."""
import json

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn as cnn
from helpers import check_gradients, relative, torch_state

import torch  # noqa: E402  (the test extra)
import torch.nn.functional as F  # noqa: E402

BACKENDS = ["numpy", "llvm"]
rng = np.random.default_rng(7)
N, C = 6, 4
X_FLAT = rng.standard_normal((N, 5))
X_MAP = rng.standard_normal((N, 2, 3, 4))
LABELS = np.array([0, 3, 1, 2, 1, 3])
LABELS_IGNORED = np.array([0, -100, 1, 2, -100, 3])
MAP_LABELS = rng.integers(0, C, (N, 3, 4))
MAP_LABELS[0, 1, 2] = MAP_LABELS[3, 0, 0] = MAP_LABELS[5, 2, 3] = 2  # the class ignored below
PROBS = rng.dirichlet(np.ones(C), N)
PROB_MAPS = np.moveaxis(rng.dirichlet(np.ones(C), (N, 3, 4)), -1, 1)
REGRESSION = rng.standard_normal((N, C)) * 1.5
BINARY = (rng.random((N, C)) < 0.4).astype(np.float64)
BINARY_MAPS = (rng.random((N, 3, 3, 4)) < 0.4).astype(np.float64)
W = [0.5, 2.0, 1.0, 3.0]


def flat(nn):
    return nn.Sequential(nn.Linear(5, C))


def conv_map(nn):
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.Tanh(), nn.Conv2d(3, C, 1))


def flat_log_softmax(nn):
    return nn.Sequential(nn.Linear(5, C), nn.LogSoftmax(dim=1))


def map_log_softmax(nn):
    return nn.Sequential(nn.Conv2d(2, C, 1), nn.LogSoftmax(1))


def flat_softmax(nn):
    return nn.Sequential(nn.Linear(5, C), nn.Softmax(dim=1))


def map_softmax(nn):
    return nn.Sequential(nn.Conv2d(2, C, 1), nn.Softmax())


def map3(nn):
    return nn.Sequential(nn.Conv2d(2, 3, 1))


def tw(values):
    return torch.tensor(values, dtype=torch.float64)


# name → (builder, x, y, our loss, PyTorch's loss); the same arguments go to both constructors
CASES = {
    "ce": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss()),
    "ce_sum": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss(reduction="sum")),
    "ce_legacy_size_average": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss(size_average=False)),
    "ce_weight": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss(weight=tw(W))),
    "ce_ignore_a_class": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss(tw(W), None, 1)),
    "ce_smoothing": (flat, X_FLAT, LABELS, lambda nn: nn.CrossEntropyLoss(label_smoothing=0.2)),
    "ce_probabilities": (flat, X_FLAT, PROBS, lambda nn: nn.CrossEntropyLoss(tw(W), label_smoothing=0.15)),
    "ce_probability_maps_sum": (conv_map, X_MAP, PROB_MAPS, lambda nn: nn.CrossEntropyLoss(reduction="sum")),
    "nll": (flat_log_softmax, X_FLAT, LABELS, lambda nn: nn.NLLLoss(tw(W))),
    "softmax_mse": (flat_softmax, X_FLAT, PROBS, lambda nn: nn.MSELoss()),
    "softmax_map_l1_sum": (map_softmax, X_MAP, PROB_MAPS, lambda nn: nn.L1Loss(reduction="sum")),
    "mse_sum": (flat, X_FLAT, REGRESSION, lambda nn: nn.MSELoss(reduction="sum")),
    "l1_sum": (flat, X_FLAT, REGRESSION, lambda nn: nn.L1Loss(reduction="sum")),
    "smooth_l1": (flat, X_FLAT, REGRESSION, lambda nn: nn.SmoothL1Loss(beta=0.5)),
    "smooth_l1_beta0_sum": (flat, X_FLAT, REGRESSION, lambda nn: nn.SmoothL1Loss(None, None, "sum", 0.0)),
    "huber": (flat, X_FLAT, REGRESSION, lambda nn: nn.HuberLoss(delta=0.7)),
    "huber_sum": (flat, X_FLAT, REGRESSION, lambda nn: nn.HuberLoss("sum", 1.3)),
    "bce": (flat, X_FLAT, BINARY, lambda nn: nn.BCEWithLogitsLoss()),
    "bce_weights": (flat, X_FLAT, BINARY, lambda nn: nn.BCEWithLogitsLoss(weight=tw(W), pos_weight=tw([2.0, 0.5, 1.0, 4.0]))),
    "bce_map_sum": (map3, X_MAP, BINARY_MAPS,
                    lambda nn: nn.BCEWithLogitsLoss(tw(1.5), reduction="sum", pos_weight=tw([[[3.0]], [[0.5]], [[1.0]]]))),
}
PROBABILITY_CASES = {"ce_probabilities", "ce_probability_maps_sum"}


def ours(name):
    """Our loss from the case's constructor call (with probabilities=True where the targets are)."""
    loss = CASES[name][3](cnn)
    if name in PROBABILITY_CASES:
        return cnn.CrossEntropyLoss(loss.weight, reduction=loss.reduction, label_smoothing=loss.label_smoothing,
                                    probabilities=True)
    return loss


def compare(builder, x, y, loss, ref_loss, backend, loss_weights=None):
    """Loss and every gradient of the compiled model against PyTorch running ``ref_loss``."""
    model = cc.compile(builder(cnn), input_shape=x.shape[1:], loss=loss, dtype="float64", backend=backend, seed=4,
                       loss_weights=loss_weights)
    ref = builder(torch.nn).double()
    ref.load_state_dict(torch_state(model))
    value, grads = model.loss_and_grads(x, y)
    expected = ref_loss(ref(torch.tensor(x)))
    expected.backward()
    assert relative(value, expected.item()) < 1e-11, (value, expected.item())
    ref_grads = dict(ref.named_parameters())
    assert list(grads) == list(ref_grads)
    for name, g in grads.items():
        assert relative(g, ref_grads[name].grad.numpy()) < 1e-10, name
    return value


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")  # dim=None is one of the cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_pytorch_parity(backend, name):
    builder, x, y, make = CASES[name]
    theirs = make(torch.nn)
    target = torch.tensor(y)
    compare(builder, x, y, ours(name), lambda out: theirs(out, target), backend)


def test_options_change_the_loss():
    """The options are honoured, not dropped: each gives a different value than the default."""
    base = compare(flat, X_FLAT, LABELS, cnn.CrossEntropyLoss(), lambda out: F.cross_entropy(out, torch.tensor(LABELS)),
                   "numpy")
    for name in ("ce_sum", "ce_weight", "ce_smoothing", "ce_ignore_a_class"):
        builder, x, y, make = CASES[name]
        model = cc.compile(builder(cnn), input_shape=x.shape[1:], loss=ours(name), dtype="float64", backend="numpy",
                           seed=4)
        assert abs(model.evaluate_loss(x, y) - base) > 1e-3, name


@pytest.mark.parametrize("name", ["ce_probability_maps_sum", "ce_ignore_a_class", "nll", "bce_map_sum", "smooth_l1",
                                  "huber_sum"])
def test_finite_differences(name):
    builder, x, y, _ = CASES[name]
    check_gradients(builder(cnn), x.shape[1:], ours(name), x, y, "numpy", tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_gradient_at_zero_logit(backend):
    """At a logit of exactly 0 the derived slope is PyTorch's σ(0) − t, not a subgradient of |x|."""
    net = cnn.Sequential(cnn.Linear(2, 3, bias=False))
    model = cc.compile(net, input_shape=(2,), loss=cnn.BCEWithLogitsLoss(pos_weight=[2.0, 1.0, 3.0]), dtype="float64",
                       backend=backend)
    model.load_state_dict({"0.weight": np.zeros((3, 2))})
    x, t = np.array([[1.0, -2.0]]), np.array([[1.0, 0.0, 1.0]])
    _, grads = model.loss_and_grads(x, t)
    ref = torch.zeros((1, 3), dtype=torch.float64, requires_grad=True)
    F.binary_cross_entropy_with_logits(ref, torch.tensor(t), pos_weight=tw([2.0, 1.0, 3.0])).backward()
    np.testing.assert_allclose(grads["0.weight"], ref.grad.numpy().T @ x, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_heads_with_options(backend):
    """A classification head with label smoothing and a box head with Smooth L1, weighted as in bbox.py."""
    def two_heads(nn):
        class TwoHeads(cnn.Module if nn is cnn else torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.trunk = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten())
                self.cls = nn.Linear(6, 3)
                self.box = nn.Linear(6, 4)

            def forward(self, x):
                h = self.trunk(x)
                return {"cls": self.cls(h), "box": self.box(h)}

        return TwoHeads()

    y = {"cls": np.array([0, 2, 1, 1, 0, 2]), "box": rng.uniform(0, 1, (N, 4))}
    losses = {"cls": cnn.CrossEntropyLoss(label_smoothing=0.1), "box": cnn.SmoothL1Loss(beta=0.3)}
    weights = {"cls": 1.0, "box": 10.0}

    def total(out):
        return (F.cross_entropy(out["cls"], torch.tensor(y["cls"]), label_smoothing=0.1)
                + 10.0 * F.smooth_l1_loss(out["box"], torch.tensor(y["box"]), beta=0.3))

    compare(two_heads, X_MAP, y, losses, total, backend,
            loss_weights=weights)


# ----- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make,pattern", [
    (lambda: cnn.CrossEntropyLoss(foo=1), r"CrossEntropyLoss has no argument 'foo'.*label_smoothing"),
    (lambda: cnn.HuberLoss("mean", 1.0, 3), r"HuberLoss takes at most 2 positional arguments \(reduction, delta\)"),
    (lambda: cnn.MSELoss(reduction="avg"), r"MSELoss: reduction='avg' is not supported; use 'mean' or 'sum'"),
    (lambda: cnn.CrossEntropyLoss(label_smoothing=1.5), r"CrossEntropyLoss: label_smoothing must be between 0 and 1"),
    (lambda: cnn.CrossEntropyLoss(weight=[[1.0, 2.0]]), r"CrossEntropyLoss: weight must be a 1-D tensor"),
    (lambda: cnn.NLLLoss(ignore_index=1.5), r"NLLLoss: ignore_index must be an integer"),
    (lambda: cnn.CrossEntropyLoss(ignore_index=0, probabilities=True), r"ignore_index=0 cannot be used with class-prob"),
    (lambda: cnn.HuberLoss(delta=0), r"HuberLoss: delta must be > 0"),
    (lambda: cnn.SmoothL1Loss(beta=-1), r"SmoothL1Loss: beta must be ≥ 0"),
    (lambda: cnn.BCEWithLogitsLoss(pos_weight=[1.0, float("nan")]), r"BCEWithLogitsLoss: pos_weight contains NaN"),
    (lambda: cnn.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, True), r"at most 6 positional arguments"),
])
def test_constructor_errors(make, pattern):
    with pytest.raises(cc.CompileError, match=pattern):
        make()


def test_positional_order_is_pytorchs():
    loss = cnn.CrossEntropyLoss([1.0, 2.0], None, 3, None, "sum", 0.1)
    assert (loss.weight, loss.ignore_index, loss.reduction, loss.label_smoothing) == ([1.0, 2.0], 3, "sum", 0.1)
    assert cnn.BCEWithLogitsLoss(None, None, None, "sum", [2.0]).attrs()["pos_weight"] == [2.0]
    assert cnn.SmoothL1Loss(None, None, "sum", 0.5).attrs() == {"reduction": "sum", "beta": 0.5}
    assert cnn.L1Loss(True, False).reduction == "none"  # PyTorch's legacy flags
    assert repr(cnn.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"


@pytest.mark.parametrize("loss", [cnn.CrossEntropyLoss(tw(W), None, 2, label_smoothing=0.1),
                                  cnn.BCEWithLogitsLoss(np.ones((3, 1, 1)), pos_weight=tw([2.0])),
                                  cnn.HuberLoss("sum", 0.5), cnn.L1Loss(False)])
def test_given_arguments_rebuild_the_loss(loss):
    """The arguments a loss was given are plain JSON values (checkpoints store them) and rebuild it."""
    given = json.loads(json.dumps(loss._given))
    again = type(loss)(**given)
    assert again.attrs() == loss.attrs() and repr(again) == repr(loss)


@pytest.mark.parametrize("builder,shape,loss,pattern", [
    (flat, (5,), cnn.CrossEntropyLoss(reduction="none"), r"reduction='none'.*use reduction='mean' or reduction='sum'"),
    (flat, (5,), cnn.BCEWithLogitsLoss(reduction="none"), r"BCEWithLogitsLoss.*reduction='none'"),
    (flat, (5,), cnn.CrossEntropyLoss(weight=[1.0, 2.0]), r"weight has 2 entries but the prediction has 4 classes"),
    (flat, (5,), cnn.BCEWithLogitsLoss(pos_weight=np.ones((2, 4))), r"pos_weight of shape \(2, 4\) does not broadcast"),
    (conv_map, (2, 3, 4), cnn.BCEWithLogitsLoss(weight=rng.random((4, 3, 1))), r"varies along 2 axes"),
    (lambda nn: nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=0)), (5,), cnn.MSELoss(), r"only dim=1"),
])
def test_compile_errors(builder, shape, loss, pattern):
    with pytest.raises(cc.CompileError, match=pattern):
        cc.compile(builder(cnn), input_shape=shape, loss=loss, backend="numpy")


def test_accuracy_counts():
    """Accuracy counts every position of a map, leaves ignored targets out, and takes the most
    probable class of probability targets; regression losses report none."""
    out = np.zeros((2, 3, 1, 2))
    out[:, 1] = 1  # class 1 everywhere
    y = np.array([[[1, 0]], [[-100, 1]]])
    assert cnn.CrossEntropyLoss().accuracy_counts(out, y) == (2, 3)
    assert cnn.NLLLoss(ignore_index=1).accuracy_counts(out, y) == (0, 2)
    probs = np.moveaxis(np.eye(3)[[[[1, 2]], [[1, 1]]]], -1, 1)
    assert cnn.CrossEntropyLoss(probabilities=True).accuracy_counts(out, probs) == (3, 4)
    assert cnn.MSELoss().accuracy_counts(out, y) is None
