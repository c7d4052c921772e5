"""Every callback's state survives a checkpoint: a run interrupted and resumed ends exactly like the
uninterrupted one (weights, EarlyStopping's restored best weights, the CSV log); ModelCheckpoint
templates are checked before training."""
import csv

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn
from cnncompile.training.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, StepLR

rng = np.random.default_rng(0)
X = rng.standard_normal((48, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 3, 48)
SCORES = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.4, 5: 0.2}  # epoch 2 is the best, after it only worse


def net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(36, 3))


class Score(cc.callbacks.Callback):
    """Logs a made-up score per epoch, so the best epoch is known in advance."""

    def on_epoch_end(self, model, epoch, logs):
        logs["score"] = SCORES[epoch]


class Crash(cc.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of epoch ``at`` (after the CSV row, before the checkpoint)."""

    def __init__(self, at=None):
        self.at = at

    def on_epoch_end(self, model, epoch, logs):
        if epoch == self.at:
            raise KeyboardInterrupt


def callbacks(tmp_path, log, crash_at=None):
    return [Score(), StepLR(1, 0.7), ReduceLROnPlateau(monitor="score", patience=0, factor=0.5),
            EarlyStopping(monitor="score", patience=10, restore_best_weights=True), CSVLogger(log),
            Crash(crash_at), ModelCheckpoint(tmp_path / "run.ckpt")]


def fit(model, epochs, cbs):
    return model.fit((X, Y), epochs=epochs, batch_size=16, validation=(X[:16], Y[:16]), callbacks=cbs,
                     augment=cc.Augment(rotation=10, translation=1), verbose=False)


def rows(path):
    """The CSV's rows without the timing columns (wall time differs between runs)."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")}
            for r in csv.DictReader(open(path, newline=""))]


def test_interrupted_and_resumed_run_ends_like_the_straight_run(tmp_path):
    straight = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.Adam(lr=0.01),
                          backend="numpy", seed=3)
    (tmp_path / "a").mkdir()
    fit(straight, 5, callbacks(tmp_path / "a", tmp_path / "straight.csv"))

    first = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.Adam(lr=0.01),
                       backend="numpy", seed=3)
    log = tmp_path / "resumed.csv"
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 3: CSV has 3 rows, the checkpoint 2 epochs
        fit(first, 5, callbacks(tmp_path, log, crash_at=3))
    assert len(rows(log)) == 3
    resumed = cc.load(tmp_path / "run.ckpt", net=net())
    assert resumed.epoch == 2
    fit(resumed, 3, callbacks(tmp_path, log))

    assert resumed.epoch == straight.epoch == 5
    assert resumed.optimizer.lr == straight.optimizer.lr
    for key, value in straight.state_dict().items():  # epoch 2's weights, restored by EarlyStopping
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)
    assert rows(log) == rows(tmp_path / "straight.csv")
    assert [int(r["epoch"]) for r in rows(log)] == [1, 2, 3, 4, 5]
    assert resumed.history["loss"] == straight.history["loss"]


def test_early_stopping_state_holds_its_best_weights(tmp_path):
    model = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    stopper = EarlyStopping(monitor="score", patience=10, restore_best_weights=True)
    fit(model, 2, [Score(), stopper])
    model.save(tmp_path / "m.ckpt")
    loaded = cc.load(tmp_path / "m.ckpt", net=net())
    (name, state), = [s for s in loaded.pending_callback_states if s[0] == "EarlyStopping"]
    assert state["best_epoch"] == 2 and state["best"] == 0.1
    for key, value in stopper.best_weights.items():
        np.testing.assert_array_equal(state["best_weights"][key], value, err_msg=key)


def test_resumed_csv_with_append_keeps_what_came_before(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("an earlier run's lines\n")
    model = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    cbs = [CSVLogger(log, append=True), ModelCheckpoint(tmp_path / "m.ckpt")]
    fit(model, 2, cbs)
    fit(model, 1, [CSVLogger(log, append=True)])  # a row the checkpoint does not know about
    resumed = cc.load(tmp_path / "m.ckpt", net=net())
    fit(resumed, 1, [CSVLogger(log, append=True), ModelCheckpoint(tmp_path / "m.ckpt")])
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier run's lines"  # (appended to a non-empty file: no second header)
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]


def test_fresh_csv_logger_starts_the_file_anew(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("old\n")
    model = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    fit(model, 1, [CSVLogger(log)])
    assert [r["epoch"] for r in rows(log)] == ["1"]


@pytest.mark.parametrize("template,message", [
    ("run-{epoch}-{val_los:.3f}.ckpt", r"uses \['val_los'\], which fit does not log"),
    ("run-{}.ckpt", r"uses \[''\]"),
    ("run-{epoch.ckpt", "not a valid template"),
    ("run-{epoch:.3q}.ckpt", "cannot be filled in"),
])
def test_bad_checkpoint_templates_fail_at_construction(template, message):
    with pytest.raises(ValueError, match=message):
        ModelCheckpoint(template)


def test_good_checkpoint_templates(tmp_path):
    model = cc.compile(net(), (1, 8, 8), loss=nn.CrossEntropyLoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    fit(model, 1, [ModelCheckpoint(str(tmp_path / "r-{epoch:02d}-{val_loss:.2f}-{lr}.ckpt"))])
    (saved,) = tmp_path.glob("r-01-*.ckpt")
    assert saved.name.endswith("-0.1.ckpt")


def test_accuracy_template_without_a_classifier_fails_before_training(tmp_path):
    model = cc.compile(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), (1, 8, 8), loss=nn.MSELoss(),
                       optimizer=cc.optim.SGD(lr=0.1), backend="numpy")
    with pytest.raises(ValueError, match="uses an accuracy"):
        model.fit((X, np.zeros((48, 2), np.float32)), epochs=1, verbose=False,
                  callbacks=[ModelCheckpoint(tmp_path / "{accuracy}.ckpt")])
    assert model.epoch == 0 and model.step == 0
