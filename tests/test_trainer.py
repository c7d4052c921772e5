"""Training: exact resume, schedules and callbacks, checkpoints that fail loudly, augmentation."""
import csv
import os

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.training.augment import Augment, compose, warp
from cnncompile.training.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, StepLR

rng = np.random.default_rng(0)
X = rng.standard_normal((96, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 3, 96)


def small_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(36, 3))


def make(backend="numpy", optimizer=None):
    return cc.compile(small_net(), (1, 8, 8), loss=nn.CrossEntropyLoss(),
                      optimizer=optimizer or cc.optim.Adam(lr=0.01), backend=backend, seed=3)


def fit(model, epochs, callbacks=None):
    return model.fit((X, Y), epochs=epochs, batch_size=16, validation=(X[:24], Y[:24]),
                     callbacks=callbacks if callbacks is not None else [StepLR(1, 0.5)],
                     augment=Augment(rotation=10, translation=1, hflip=True), verbose=False)


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_exact_resume(backend, tmp_path):
    straight = make(backend)
    fit(straight, 2)
    first = make(backend)
    fit(first, 1)
    first.save(tmp_path / "run.ckpt")
    resumed = cc.load(tmp_path / "run.ckpt", net=small_net())
    assert resumed.epoch == 1 and resumed.executable.name == backend
    fit(resumed, 1)
    assert resumed.optimizer.lr == straight.optimizer.lr == 0.0025
    for key, value in straight.state_dict().items():
        if backend == "numpy":
            assert np.array_equal(value, resumed.state_dict()[key]), key
        else:  # threads split work differently per call site but reduce in a fixed order
            np.testing.assert_allclose(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_load_with_trust_source_uses_the_saved_source(tmp_path):
    source = ("from cnncompile import nn\n"
              "net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))\n")
    namespace = {}
    exec(source, namespace)
    model = cc.compile(namespace["net"], (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    model.source_text = source
    model.train_step(X[:8], Y[:8])
    model.save(tmp_path / "a.ckpt")
    again = cc.load(tmp_path / "a.ckpt", trust_source=True)
    for key, value in model.state_dict().items():
        assert np.array_equal(value, again.state_dict()[key])
    np.testing.assert_array_equal(model.predict(X[:4]), again.predict(X[:4]))


@pytest.fixture
def saved(tmp_path):
    model = make()
    fit(model, 1)
    path = tmp_path / "good.ckpt"
    model.save(path)
    return model, path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped-byte", "empty"])
def test_damaged_checkpoint_is_a_clear_error(saved, damage, tmp_path):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b"",
                     "flipped-byte": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]}[damage])
    with pytest.raises(cc.CheckpointError, match="truncated or corrupted|not a cnncompile checkpoint"):
        cc.load(bad, net=small_net())


def test_another_networks_checkpoint_is_refused(saved):
    _, path = saved
    other = nn.Sequential(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(0.3), nn.Linear(45, 3))
    with pytest.raises(cc.CheckpointError, match=r"different network.*0\.weight"):
        cc.load(path, net=other)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(cc.CheckpointError, match="does not exist"):
        cc.load(tmp_path / "nope.ckpt", net=small_net())


def test_a_failed_save_keeps_the_old_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    fit(model, 1)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


# ----- schedules and callbacks ----------------------------------------------------------------------
class Holder:
    """Just enough of a model for a schedule: an optimizer with a learning rate."""

    def __init__(self, lr):
        self.optimizer = type("Opt", (), {"lr": lr})()
        self.stop_training = False


def test_reduce_on_plateau_divides_by_ten_after_patience():
    sched, m = ReduceLROnPlateau(monitor="val_accuracy", patience=2), Holder(0.1)
    accuracies = [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    lrs = []
    for epoch, acc in enumerate(accuracies, 1):
        sched.on_epoch_end(m, epoch, {"val_accuracy": acc})
        lrs.append(m.optimizer.lr)
    assert sched.mode == "max"
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.001])


def test_reduce_on_plateau_matches_pytorch():
    import torch
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1, min_lr=0.1)
    ours, m = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=1, min_lr=0.1), Holder(1.0)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.89999, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]
    for epoch, loss in enumerate(losses, 1):
        ref.step(loss)
        ours.on_epoch_end(m, epoch, {"val_loss": loss})
        assert m.optimizer.lr == pytest.approx(opt.param_groups[0]["lr"]), epoch


def test_early_stopping_restores_best_weights_even_when_interrupted():
    model = make()
    best = {}

    class Interrupt(cc.callbacks.Callback):
        def on_epoch_end(self, model_, epoch, logs):
            if epoch == 1:
                best.update(model_.state_dict())
            if epoch == 3:
                raise KeyboardInterrupt

    stopper = EarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True)
    stopper.on_epoch_end = lambda m, epoch, logs, orig=stopper.on_epoch_end: orig(
        m, epoch, {"val_loss": 1.0 if epoch == 1 else 2.0})  # epoch 1 is the best
    with pytest.raises(KeyboardInterrupt):
        fit(model, 5, [stopper, Interrupt()])
    for key, value in best.items():
        assert np.array_equal(model.state_dict()[key], value), key


def test_early_stopping_stops():
    model = make()
    history = fit(model, 20, [EarlyStopping(monitor="loss", patience=0, min_delta=10.0)])
    assert len(history["loss"]) == 2  # epoch 1 sets the best; epoch 2 does not improve by 10: stop (Keras)


def test_checkpoint_and_csv_callbacks(tmp_path):
    model = make()
    log = tmp_path / "log.csv"
    fit(model, 3, [StepLR(1, 0.5), ModelCheckpoint(tmp_path / "ep{epoch}.ckpt"), CSVLogger(log)])
    assert sorted(p.name for p in tmp_path.glob("ep*.ckpt")) == ["ep1.ckpt", "ep2.ckpt", "ep3.ckpt"]
    rows = list(csv.DictReader(open(log)))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(rows[0])
    assert [float(r["lr"]) for r in rows] == [0.01, 0.005, 0.0025]
    resumed = cc.load(tmp_path / "ep2.ckpt", net=small_net())
    assert resumed.epoch == 2 and resumed.optimizer.lr == 0.0025  # the schedule's decision of epoch 2


# ----- augmentation -------------------------------------------------------------------------------
def blob(size, points):
    """An image with a small bright Gaussian at each (x, y) pixel coordinate."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    return sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 1.5) for x, y in points).astype(np.float32)


def centroid(image):
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]] + 0.5
    w = np.clip(image, 0, None)
    return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


@pytest.mark.parametrize("options", [dict(rotation=40), dict(translation=6), dict(scale=(1 / 1.6, 1.6)),
                                     dict(hflip=True), dict(vflip=True), dict(shear=20), dict(stretch=(1 / 1.3, 1.3)),
                                     dict(rotation=25, translation=3, scale=(0.8, 1.2), shear=10, hflip=True)])
def test_augmented_keypoints_stay_on_their_marks(options):
    size, rng_ = 48, np.random.default_rng(5)
    points = rng_.uniform(18, 30, (6, 2))
    x = np.stack([blob(size, [p])[None] for p in points])
    y = {"kp": points / size, "cls": np.arange(6)}
    out, moved = Augment(points=("kp",), **options)(x, y, np.random.default_rng(1))
    assert np.array_equal(moved["cls"], y["cls"])
    for k in range(6):
        np.testing.assert_allclose(centroid(out[k, 0]), moved["kp"][k] * size, atol=0.35)
    assert not np.allclose(moved["kp"], y["kp"])


def test_quarter_turn_and_flips_are_exact():
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    n = 1
    one, zero = np.ones(n), np.zeros(n)
    quarter = compose(n, 6, 6, np.full(n, np.pi / 2), zero, one, one, one, one, np.zeros((n, 2)))
    np.testing.assert_allclose(warp(x, np.linalg.inv(quarter)), np.rot90(x, k=-1, axes=(2, 3)), atol=1e-6)
    flip = compose(n, 6, 6, zero, zero, one, one, -one, one, np.zeros((n, 2)))
    np.testing.assert_allclose(warp(x, np.linalg.inv(flip)), x[..., ::-1], atol=1e-6)
    shift = compose(n, 6, 6, zero, zero, one, one, one, one, np.array([[2.0, -1.0]]))
    expected = np.zeros_like(x)
    expected[..., :5, 2:] = x[..., 1:, :4]
    np.testing.assert_allclose(warp(x, np.linalg.inv(shift)), expected, atol=1e-6)


def test_rotated_box_is_its_rotated_corners():
    from cnncompile.training.data import synthetic
    data = synthetic.shapes(n=20, seed=3)["train"]
    x, y = data[0][:4], {k: v[:4] for k, v in data[1].items()}
    augment = Augment(rotation=30, points=("box",))
    out, moved = augment(x, y, np.random.default_rng(7))
    angles = np.deg2rad(np.random.default_rng(7).uniform(-30, 30, 4))  # the draw Augment made
    corners = y["box"].reshape(4, 4, 2) * 32 - 16
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    rotated = np.stack([c * corners[..., 0] - s * corners[..., 1], s * corners[..., 0] + c * corners[..., 1]], -1)
    np.testing.assert_allclose(moved["box"].reshape(4, 4, 2) * 32 - 16, rotated, atol=1e-4)
    for k in range(4):  # and the shape's pixels went with them: its centroid turned by the same angle
        before = centroid(x[k, 0] * (x[k, 0] > 0.3)) - 16
        turned = np.array([c[k, 0] * before[0] - s[k, 0] * before[1], s[k, 0] * before[0] + c[k, 0] * before[1]])
        np.testing.assert_allclose(centroid(out[k, 0] * (out[k, 0] > 0.3)), turned + 16, atol=0.5)


def test_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(2, 1))
    with pytest.raises(ValueError, match="magnitudes"):
        Augment(rotation=-5)
