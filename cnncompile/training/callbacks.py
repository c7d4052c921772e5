"""Callbacks for ``model.fit``: learning-rate schedules, early stopping, checkpoints, a CSV log.

Each sees the epoch's logs (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``lr``) and
keeps its whole state in ``state_dict()`` (arrays included: EarlyStopping's best weights), so that
a run resumed from a checkpoint ends exactly like the uninterrupted one.
Defaults are PyTorch's (schedules) and Keras's (early stopping), as their users expect.
"""
from __future__ import annotations

import csv
import io
import math
import os
import string

LOG_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds", "images_per_second")


class Callback:
    def on_train_begin(self, model, logs=None): ...
    def on_epoch_end(self, model, epoch: int, logs: dict): ...
    def on_train_end(self, model, logs=None): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _better(mode: str, threshold: float, relative: bool):
    def test(value, best):
        if best is None:
            return True
        if mode == "min":
            return value < (best * (1 - threshold) if relative else best - threshold)
        return value > (best * (1 + threshold) if relative else best + threshold)
    return test


def _mode_for(monitor: str, mode: str) -> str:
    if mode in ("min", "max"):
        return mode
    return "max" if "acc" in monitor else "min"


class StepLR(Callback):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs (PyTorch's StepLR)."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        if step_size < 1 or not gamma > 0:
            raise ValueError("StepLR: step_size must be ≥ 1 and gamma > 0")
        self.step_size, self.gamma, self.base_lr = step_size, gamma, None

    def on_train_begin(self, model, logs=None):
        if self.base_lr is None:
            self.base_lr = model.optimizer.lr

    def on_epoch_end(self, model, epoch, logs):
        model.optimizer.lr = self.base_lr * self.gamma ** (epoch // self.step_size)

    def state_dict(self):
        return {"base_lr": self.base_lr}


class ReduceLROnPlateau(Callback):
    """Divide the learning rate when ``monitor`` stops improving (the lecture's "divide by 10 when
    validation accuracy plateaus"); PyTorch's defaults: factor 0.1, patience 10, threshold 1e-4
    relative, cooldown 0, min_lr 0. ``mode`` is inferred from the name unless given."""

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0, mode: str = "auto"):
        if not 0 < factor < 1:
            raise ValueError(f"ReduceLROnPlateau: factor must be in (0, 1), got {factor}")
        self.monitor, self.factor, self.patience, self.threshold = monitor, factor, patience, threshold
        self.relative, self.cooldown, self.min_lr = threshold_mode == "rel", cooldown, min_lr
        self.mode = _mode_for(monitor, mode)
        self.best, self.bad_epochs, self.cooldown_left = None, 0, 0

    def on_epoch_end(self, model, epoch, logs):
        value = logs.get(self.monitor)
        if value is None or math.isnan(value):
            raise ValueError(f"ReduceLROnPlateau monitors {self.monitor!r}, which this fit does not log "
                             f"(pass validation=... for val_ metrics); logged: {sorted(logs)}")
        if _better(self.mode, self.threshold, self.relative)(value, self.best):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            new = max(model.optimizer.lr * self.factor, self.min_lr)
            if model.optimizer.lr - new > 1e-12:
                model.optimizer.lr = new
            self.cooldown_left, self.bad_epochs = self.cooldown, 0

    def state_dict(self):
        return {"best": self.best, "bad_epochs": self.bad_epochs, "cooldown_left": self.cooldown_left}


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs (Keras's
    defaults); ``restore_best_weights`` puts the best epoch's weights back however training ends."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, mode: str = "auto",
                 restore_best_weights: bool = False):
        self.monitor, self.min_delta, self.patience = monitor, abs(min_delta), patience
        self.mode = _mode_for(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best, self.wait, self.best_epoch, self.best_weights, self.stopped_epoch = None, 0, 0, None, 0

    def on_epoch_end(self, model, epoch, logs):
        value = logs.get(self.monitor)
        if value is None or math.isnan(value):
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does not log; "
                             f"logged: {sorted(logs)}")
        if _better(self.mode, self.min_delta, False)(value, self.best):
            self.best, self.wait, self.best_epoch = value, 0, epoch
            if self.restore_best_weights:
                self.best_weights = model.state_dict()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                model.stop_training = True

    def on_train_end(self, model, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            model.load_state_dict(self.best_weights)

    def state_dict(self):
        return {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch, "best_weights": self.best_weights}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if self.best_weights is not None:
            self.best_weights = {k: v.copy() for k, v in self.best_weights.items()}


def _template_fields(path: str) -> list[str]:
    """The log values a ModelCheckpoint path fills in; a template that cannot be filled is an
    error now, not after the first epoch."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(path) if field is not None]
    except ValueError as exc:
        raise ValueError(f"ModelCheckpoint: path {path!r} is not a valid template ({exc}); write braces "
                         f"as {{{{ and }}}}") from None
    names = [field.split(".")[0].split("[")[0] for field in fields]
    unknown = sorted({n for n in names if n not in LOG_FIELDS})
    if unknown:
        raise ValueError(f"ModelCheckpoint: path {path!r} uses {unknown}, which fit does not log; "
                         f"the fields are {list(LOG_FIELDS)} (e.g. 'run-{{epoch:03d}}-{{val_loss:.3f}}.ckpt')")
    try:
        path.format(**{k: (1 if k == "epoch" else 0.5) for k in LOG_FIELDS})
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"ModelCheckpoint: path {path!r} cannot be filled in ({type(exc).__name__}: {exc})") from None
    return names


class ModelCheckpoint(Callback):
    """Save a checkpoint after each epoch (``{epoch}`` and other logged values in the path are
    filled in: see LOG_FIELDS), or only when ``monitor`` improves with ``save_best_only``.
    Writes are atomic."""

    def __init__(self, path: str, monitor: str = "val_loss", save_best_only: bool = False, mode: str = "auto"):
        self.path, self.monitor, self.save_best_only = str(path), monitor, save_best_only
        self.fields = _template_fields(self.path)
        self.mode, self.best = _mode_for(monitor, mode), None

    def on_train_begin(self, model, logs=None):
        classifier = getattr(model, "classification_head", lambda: 0)() is not None
        if not classifier and {"accuracy", "val_accuracy"} & set(self.fields):
            raise ValueError(f"ModelCheckpoint: path {self.path!r} uses an accuracy, but this network has no "
                             f"head trained with CrossEntropyLoss; use {{loss}} or {{val_loss}}")

    def on_epoch_end(self, model, epoch, logs):
        if self.save_best_only:
            value = logs.get(self.monitor)
            if value is None or not _better(self.mode, 0.0, False)(value, self.best):
                return
            self.best = value
        values = {k: v for k, v in logs.items() if k != "epoch"}
        missing = sorted(set(self.fields) - set(values) - {"epoch"})
        if missing:
            raise ValueError(f"ModelCheckpoint: path {self.path!r} uses {missing}, which this fit does not log "
                             f"(val_ values need validation=...)")
        model.save(self.path.format(epoch=epoch, **values))

    def state_dict(self):
        return {"best": self.best}


class CSVLogger(Callback):
    """One row per epoch with every logged value. A fresh run starts the file anew (unless
    ``append``); a run resumed from a checkpoint rewrites it with the rows logged up to the
    checkpoint (rows an interrupted run wrote after it are dropped), so it ends like an
    uninterrupted run's."""

    def __init__(self, path: str, append: bool = False):
        self.path, self.append = str(path), append
        self.rows: list[dict] = []  # this run's rows, kept in the checkpoint
        self.prefix = 0  # bytes of the file kept from before this run (append=True)
        self.resumed = False

    def on_train_begin(self, model, logs=None):
        if self.resumed:
            self._rewrite()
        elif self.append:
            self.prefix = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        elif os.path.exists(self.path):
            os.remove(self.path)

    def _rewrite(self) -> None:
        kept = b""
        if self.prefix and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                kept = f.read(self.prefix)
        text = io.StringIO(newline="")
        for row in self.rows:
            self._write(text, row, fresh=not kept and row is self.rows[0])
        with open(self.path, "wb") as f:
            f.write(kept + text.getvalue().encode())
        self.resumed = False

    @staticmethod
    def _write(f, row, fresh):
        writer = csv.DictWriter(f, fieldnames=list(row))
        if fresh:
            writer.writeheader()
        writer.writerow(row)

    def on_epoch_end(self, model, epoch, logs):
        row = {"epoch": epoch, **{k: v for k, v in logs.items() if k != "epoch"}}
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            self._write(f, row, fresh)
        self.rows.append(row)

    def state_dict(self):
        return {"rows": self.rows, "prefix": self.prefix}

    def load_state_dict(self, state):
        self.rows, self.prefix = [dict(r) for r in state.get("rows", [])], int(state.get("prefix", 0))
        self.resumed = True


class CurvesPNG(Callback):
    """Redraw the training curves (loss and accuracy, training and validation) to a PNG after
    every epoch, so the picture is current while training runs."""

    def __init__(self, path: str):
        self.path = str(path)

    def on_epoch_end(self, model, epoch, logs):
        from .pictures import save_curves
        save_curves(model.history, self.path)
