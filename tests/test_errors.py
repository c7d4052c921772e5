"""Bad input gets a clear exception naming the layer or parameter and what to change."""
import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn


def lenet():
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 10))


def compiled(**kw):
    return cc.compile(lenet(), input_shape=(1, 32, 32), loss=nn.CrossEntropyLoss(),
                      optimizer=cc.optim.SGD(lr=0.1), **kw)


def test_channel_mismatch_names_the_layer():
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.Conv2d(4, 8, 3))
    with pytest.raises(cc.ShapeError, match=r"layer '1' \(Conv2d\) expects 4 input channels.*\(B, 6, 28, 28\).*in_channels=6"):
        cc.compile(net, input_shape=(1, 32, 32))


def test_linear_mismatch_says_what_to_set():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(10, 3))
    with pytest.raises(cc.ShapeError, match=r"layer '2' \(Linear\).*set in_features=1800"):
        cc.compile(net, input_shape=(1, 32, 32))


def test_missing_flatten():
    with pytest.raises(cc.ShapeError, match="add Flatten"):
        cc.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(10, 3)), input_shape=(1, 8, 8))


@pytest.mark.parametrize("layer,message", [
    (nn.Conv2d(1, 2, 3, stride=0), "stride must be ≥ 1"),
    (nn.Conv2d(1, 2, 3, padding=-1), "padding must be ≥ 0"),
    (nn.Conv2d(1, 2, 3, dilation=0), "dilation must be ≥ 1"),
    (nn.Conv2d(1, 2, 9), "kernel spans 9 but the padded input is only 8"),
    (nn.Conv2d(1, 2, 3, dilation=4), "kernel spans 9"),
    (nn.Conv2d(1, 2, 2.5), "kernel_size must be an int or a pair"),
    (nn.MaxPool2d(2, padding=2), "at most half the kernel size"),
    (nn.MaxPool2d(9), "kernel spans 9"),
])
def test_invalid_arguments(layer, message):
    with pytest.raises(cc.CompileError, match=message) as info:
        cc.compile(nn.Sequential(layer), input_shape=(1, 8, 8))
    assert "layer '0'" in str(info.value)


def test_join_shape_mismatch():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.a(x) + x

    with pytest.raises(cc.ShapeError, match="cannot add tensors of shapes"):
        cc.compile(Bad(), input_shape=(1, 8, 8))


def test_calling_a_layer_outside_compile():
    with pytest.raises(cc.CompileError, match="inside cc.compile"):
        lenet()(np.zeros((1, 1, 32, 32)))


def test_compile_rejects_non_modules_and_bad_input_shapes():
    with pytest.raises(cc.CompileError, match="expects a cnncompile.nn.Module"):
        cc.compile(lambda x: x, input_shape=(1, 8, 8))
    with pytest.raises(cc.CompileError, match="input_shape"):
        cc.compile(lenet(), input_shape=(1, 0, 32))


def test_unknown_backend_and_dtype():
    with pytest.raises(cc.CompileError, match="unknown backend"):
        compiled(backend="cuda")
    with pytest.raises(cc.CompileError, match="dtype"):
        compiled(dtype="float16")


@pytest.fixture(scope="module")
def model():
    return compiled()


X = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
Y = np.array([1, 2, 3, 4])


@pytest.mark.parametrize("x,y,error,message", [
    (X[:, :, :31], Y, ValueError, r"shape \(4, 1, 31, 32\); expected \(N, 1, 32, 32\)"),
    (X[0], Y, ValueError, "expected"),
    (X[:0], Y[:0], ValueError, "empty batch"),
    (np.full_like(X, np.nan), Y, ValueError, "NaN or Inf"),
    (X.astype(str), Y, TypeError, "must hold numbers"),
    (X, np.array([1, 2, 3, 10]), ValueError, r"label 10, outside 0..9"),
    (X, np.array([1, 2, 3, -1]), ValueError, "label -1"),
    (X, np.array([1, 2, 3]), ValueError, r"class indices of shape \(4,\)"),
    (X, np.array([1.5, 2, 3, 4]), ValueError, "integer class indices"),
])
def test_bad_batches_are_rejected_before_any_computation(model, x, y, error, message):
    before = model.state_dict()
    with pytest.raises(error, match=message):
        model.train_step(x, y)
    after = model.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_inputs_are_converted(model):
    x64 = X.astype(np.float64)
    noncontiguous = np.asfortranarray(X)
    a = model.predict(x64)
    b = model.predict(noncontiguous)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32


def test_load_state_dict_errors_change_nothing(model):
    good = model.state_dict()
    bad = dict(good)
    del bad["0.bias"]
    with pytest.raises(KeyError, match=r"missing keys \['0.bias'\]"):
        model.load_state_dict(bad)
    bad = dict(good, extra=np.zeros(3))
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        model.load_state_dict(bad)
    bad = {k: v + 1 for k, v in good.items()}
    bad["7.weight"] = np.zeros((10, 399))
    with pytest.raises(ValueError, match=r"'7.weight' has shape \(10, 399\).*model's is \(10, 400\)"):
        model.load_state_dict(bad)
    now = model.state_dict()
    assert all(np.array_equal(good[k], now[k]) for k in good)


def test_training_needs_loss_and_optimizer():
    plain = cc.compile(lenet(), input_shape=(1, 32, 32))
    assert plain.predict(X).shape == (4, 10)
    with pytest.raises(cc.CompileError, match="without a loss"):
        plain.loss_and_grads(X, Y)
    no_opt = cc.compile(lenet(), input_shape=(1, 32, 32), loss=nn.CrossEntropyLoss())
    with pytest.raises(cc.CompileError, match="without an optimizer"):
        no_opt.train_step(X, Y)


def test_explain_unknown_layer(model):
    with pytest.raises(KeyError, match="no layer named 'nope'"):
        model.explain("nope")
