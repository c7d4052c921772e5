"""Mistakes in the data or the call are refused before any computation, with a message that says
what to change (not an obscure error from inside NumPy or the loop)."""
import warnings

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.validate import PixelScaleWarning


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten())
        self.cls = nn.Linear(3 * 6 * 6, 3)
        self.box = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        h = self.trunk(x)
        return self.cls(h), self.box(h)


def single(optimizer=True):
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    return cc.compile(net, input_shape=(1, 8, 8), loss=nn.CrossEntropyLoss(), backend="numpy",
                      optimizer=cc.optim.SGD(lr=0.1) if optimizer else None)


def two_heads(seed=0):
    return cc.compile(TwoHeads(), input_shape=(1, 8, 8), loss=(nn.CrossEntropyLoss(), nn.MSELoss()),
                      optimizer=cc.optim.SGD(lr=0.1, momentum=0.9), backend="numpy", seed=seed)


def data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, n),
            rng.standard_normal((n, 2)).astype(np.float32))


@pytest.mark.parametrize("size", [0, -1])
@pytest.mark.parametrize("call", ["predict", "evaluate", "fit"])
def test_batch_size_below_one_is_refused(call, size):
    """A batch size of zero or less names the call and the value (not a range() or concatenate error)."""
    model = single()
    x, y, _ = data()
    run = {"predict": lambda: model.predict(x, batch_size=size),
           "evaluate": lambda: model.evaluate(x, y, batch_size=size),
           "fit": lambda: model.fit((x, y), batch_size=size, verbose=False)}[call]
    with pytest.raises(ValueError, match=rf"{call}: batch_size must be at least 1, got {size}"):
        run()


@pytest.mark.parametrize("rows", [6, 14])
def test_fit_refuses_targets_of_another_length(rows):
    """y shorter or longer than x is refused before the first step, and nothing is trained."""
    model = single()
    x, _, _ = data()
    before = model.state_dict()
    with pytest.raises(ValueError, match=rf"fit: the target has {rows} rows but x has 10 examples"):
        model.fit((x, np.zeros(rows, int)), verbose=False)
    assert model.step == 0
    for k, v in before.items():
        np.testing.assert_array_equal(model.state_dict()[k], v)


def test_fit_refuses_a_head_target_of_another_length():
    model = two_heads()
    x, y, box = data()
    with pytest.raises(ValueError, match=r"fit: the target for head 1 has 9 rows but x has 10"):
        model.fit((x, (y, box[:9])), verbose=False)
    with pytest.raises(ValueError, match=r"fit \(validation\): the target for head 0 has 4 rows"):
        model.fit((x, (y, box)), validation=(x, (y[:4], box)), verbose=False)


def test_evaluate_refuses_targets_of_another_length():
    model = single()
    x, y, _ = data()
    with pytest.raises(ValueError, match=r"evaluate: the target has 12 rows but x has 10"):
        model.evaluate(x, np.zeros(12, int))


@pytest.mark.parametrize("call", ["fit", "train_step"])
def test_training_without_an_optimizer_says_so(call):
    """A model compiled without an optimizer names the missing argument (was an AttributeError in fit)."""
    model = single(optimizer=False)
    x, y, _ = data()
    run = {"fit": lambda: model.fit((x, y), verbose=False), "train_step": lambda: model.train_step(x, y)}[call]
    with pytest.raises(cc.CompileError, match=rf"{call}: this model was compiled without an optimizer.*optimizer="):
        run()


def test_uint8_pixels_warn_and_scaled_ones_do_not():
    """Raw 0..255 pixels are trained on with a warning; the same images scaled to 0..1, or a
    0/1 uint8 mask, give none."""
    model = single()
    x, y, _ = data()
    pixels = np.clip(x * 60 + 128, 0, 255).astype(np.uint8)
    with pytest.warns(PixelScaleWarning, match=r"uint8 with values up to 255.*/ 255"):
        model.fit((pixels, y), verbose=False)
    with pytest.warns(PixelScaleWarning):
        model.predict(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit((pixels.astype(np.float32) / 255, y), verbose=False)
        model.predict((pixels > 128).astype(np.uint8))


def test_list_of_head_targets_works_like_a_tuple():
    """Several heads' targets given as a list train and evaluate exactly as the same tuple
    (over several batches and chunks, where a list used to be indexed as if it were one array)."""
    x, y, box = data(n=20)
    as_list, as_tuple = two_heads(seed=3), two_heads(seed=3)
    h_list = as_list.fit((x, [y, box]), epochs=2, batch_size=6, validation=(x, [y, box]), verbose=False)
    h_tuple = as_tuple.fit((x, (y, box)), epochs=2, batch_size=6, validation=(x, (y, box)), verbose=False)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert h_list[key] == h_tuple[key], key
    assert as_list.evaluate(x, [y, box], batch_size=7) == as_tuple.evaluate(x, (y, box), batch_size=7)
    for k, v in as_tuple.state_dict().items():
        np.testing.assert_array_equal(as_list.state_dict()[k], v, err_msg=k)


def test_single_head_labels_as_a_python_list_fit():
    model = single()
    x, y, _ = data()
    model.fit((x, [int(v) for v in y]), batch_size=4, verbose=False)
    assert model.step == 3
