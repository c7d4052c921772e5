"""The fit loop: seeded batches through ``train_step``, augmentation, metrics, callbacks, progress.

Everything random in an epoch is drawn from ``(seed, epoch, …)``: the batch order, the
augmentation of each batch, and (through the model's draw counter) dropout masks. So an
interrupted run resumed from a checkpoint repeats exactly what the uninterrupted one does.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .data.synthetic import take

from .. import validate


def batch_rows(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Each batch's example indices, shuffled from ``(seed, epoch)``, so an epoch's order can be
    reproduced after a restart."""
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def batches(x, y, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    for idx in batch_rows(len(x), batch_size, seed, epoch, shuffle):
        yield x[idx], take(y, idx)


def accuracy(model, x, y, batch_size: int = 500) -> float:
    """Share of correct classes (the first classification head of a multi-head net)."""
    k = model.classification_head()
    if k is None:
        raise ValueError("accuracy needs a head trained with CrossEntropyLoss")
    out = model.predict(x, batch_size=batch_size)
    out = out if len(model.heads) == 1 else out[model.heads[k][0]]
    return float((out.argmax(axis=1) == model.head_target(y, k)).mean())


class Progress:
    """A live line with throughput and ETA on a terminal; a plain line per epoch otherwise."""

    def __init__(self, total: int, epoch: int, epochs: int, stream=None):
        self.total, self.epoch, self.epochs = total, epoch, epochs
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.seen = 0

    def update(self, n: int, loss: float) -> None:
        self.seen += n
        if not self.live:
            return
        rate = self.seen / max(time.perf_counter() - self.start, 1e-9)
        eta = (self.total - self.seen) / max(rate, 1e-9)
        width = 20
        done = int(width * self.seen / max(self.total, 1))
        self.stream.write(f"\repoch {self.epoch}/{self.epochs} [{'=' * done}{'.' * (width - done)}] "
                          f"{self.seen}/{self.total} loss {loss:.4f} {rate:,.0f} img/s ETA {eta:4.0f}s ")
        self.stream.flush()

    def close(self, summary: str) -> None:
        self.stream.write(("\r" if self.live else "") + summary + " " * 10 + "\n")
        self.stream.flush()


def fit(model, train, epochs: int = 1, batch_size: int = 64, validation=None, callbacks=(), seed: int = 0,
        verbose: bool = True, augment=None, stream=None, nan_guard: bool | None = None) -> dict:
    """Train ``epochs`` more epochs, numbered on from those already done (so a model loaded from a
    checkpoint continues its schedule and its seeded batch order); returns the history, one
    list per logged value."""
    model.require_optimizer("fit")
    x, y = checked_split(model, train, "fit")
    if len(x) == 0:
        raise ValueError("fit: the training set is empty")
    batch_size = validate.batch_size(batch_size, "fit")
    if validation is not None:
        validation = checked_split(model, validation, "fit (validation)")
    # checkpoints last, so that they save what the schedules decided this epoch
    if nan_guard is not None:
        model.nan_guard = nan_guard
    callbacks = sorted(callbacks or (), key=lambda cb: type(cb).__name__ == "ModelCheckpoint")
    if model.distributed is not None:  # the same data and settings on every rank; rank 0 alone prints and writes
        model.distributed.check_fit(model, len(x), batch_size, seed, epochs, augment,
                                    None if validation is None else len(validation[0]))
        callbacks, verbose = model.distributed.callbacks(callbacks), verbose and model.distributed.rank == 0
    model.callbacks, model.stop_training = callbacks, False
    pending = getattr(model, "pending_callback_states", None) or []
    for cb, (name, state) in zip(callbacks, pending):  # a resumed schedule continues where it stopped
        if type(cb).__name__ == name:
            cb.load_state_dict(state)
    model.pending_callback_states = []
    history: dict[str, list] = {k: list(v) for k, v in (model.history or {}).items()}  # resumed runs add on
    for cb in callbacks:
        cb.on_train_begin(model)
    try:
        last = model.epoch + epochs
        for epoch in range(model.epoch + 1, last + 1):
            logs = run_epoch(model, x, y, batch_size, seed, epoch, last, augment,
                             Progress(len(x), epoch, last, stream) if verbose else None, validation)
            model.epoch = epoch
            for k, v in logs.items():
                history.setdefault(k, []).append(v)
            model.history = history  # before the callbacks, so a checkpoint holds this epoch too
            for cb in callbacks:
                cb.on_epoch_end(model, epoch, logs)
            if not all(math.isfinite(v) for k, v in logs.items() if k.endswith("loss")):
                raise FloatingPointError(f"fit: the loss became {logs['loss']} in epoch {epoch}; lower the "
                                         f"learning rate (now {model.optimizer.lr:g})")
            if model.stop_training:
                break
    finally:  # EarlyStopping restores its best weights however training ends
        for cb in callbacks:
            cb.on_train_end(model)
    return history


def checked_split(model, data, where: str) -> tuple:
    """``(x, y)`` with x an array and y one target row per example (a list of heads' targets
    becomes a tuple), checked before the first step rather than failing at some batch."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{where}: give the data as a pair (x, y), got {type(data).__name__}")
    x, y = data
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    y = validate.targets(y, model.heads)
    validate.same_rows(x, y, model.heads, where)
    return x, y


def run_epoch(model, x, y, batch_size, seed, epoch, epochs, augment, progress, validation) -> dict:
    started, total, correct, heads = time.perf_counter(), 0.0, 0, {}
    lr = model.optimizer.lr
    head = model.classification_head()
    dist = model.distributed  # data-parallel: this rank reads and trains on its rows of each batch
    for k, idx in enumerate(batch_rows(len(x), batch_size, seed, epoch)):
        n, idx = len(idx), idx[dist.rows(len(idx))] if dist else idx
        xb, yb = x[idx], take(y, idx)
        if augment is not None:
            rng = np.random.default_rng((seed, epoch, k, 1))
            xb, yb = dist.augment(augment, xb, yb, rng, n) if dist else augment(xb, yb, rng)
        loss, outputs = dist.step(model, xb, yb, n) if dist else model._train_step(xb, yb)
        total += loss * n
        for key, value in ({} if dist else model.last_head_losses).items():  # several heads: each one's loss
            heads[key] = heads.get(key, 0.0) + value * n
        if head is not None and len(xb):
            correct += int((outputs[head].argmax(1) == model.head_target(yb, head)).sum())
        if progress:
            progress.update(n, loss)
    if dist:
        correct = int(dist.group.total(correct)[0])
    seconds = time.perf_counter() - started
    logs = {"epoch": epoch, "loss": total / len(x)} | {k: v / len(x) for k, v in heads.items()}
    if head is not None:
        logs["accuracy"] = correct / len(x)
    if validation is not None:
        for k, v in model.evaluate(*validation).items():
            logs[f"val_{k}"] = v
    logs.update(lr=lr, seconds=seconds, images_per_second=len(x) / seconds)
    if progress:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in logs.items() if k.endswith(("loss", "accuracy")))
        progress.close(f"epoch {epoch}/{epochs}: {shown}, {seconds:.1f}s ({len(x) / seconds:,.0f} img/s)")
    return logs
