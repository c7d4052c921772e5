"""The fit loop: batches through ``train_step``, progress, and metrics per epoch."""
from __future__ import annotations

import sys
import time

import numpy as np


def batches(x, y, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Shuffled from ``(seed, epoch)``, so an epoch's order can be reproduced after a restart."""
    order = np.random.default_rng((seed, epoch)).permutation(len(x)) if shuffle else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def accuracy(model, x, y, batch_size: int = 500) -> float:
    return float((model.predict(x, batch_size=batch_size).argmax(axis=1) == y).mean())


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
        self.stream.write(f"\repoch {self.epoch}/{self.epochs} {self.seen}/{self.total} loss {loss:.4f} "
                          f"{rate:,.0f} img/s ETA {eta:4.0f}s ")
        self.stream.flush()

    def close(self, summary: str) -> None:
        self.stream.write(("\r" if self.live else "") + summary + " " * 10 + "\n")
        self.stream.flush()


def fit(model, train, epochs: int = 1, batch_size: int = 64, validation=None, seed: int = 0,
        verbose: bool = True, stream=None) -> dict:
    """Train for ``epochs`` over ``train = (x, y)``; returns the history of losses and accuracies."""
    x, y = train
    history = {"epoch": [], "loss": [], "val_accuracy": [], "seconds": [], "lr": []}
    for epoch in range(1, epochs + 1):
        progress = Progress(len(x), epoch, epochs, stream) if verbose else None
        started, total, correct = time.perf_counter(), 0.0, 0
        for xb, yb in batches(x, y, batch_size, seed, epoch):
            loss = model.train_step(xb, yb)
            total += loss * len(xb)
            if progress:
                progress.update(len(xb), loss)
        seconds = time.perf_counter() - started
        history["epoch"].append(epoch)
        history["loss"].append(total / len(x))
        history["seconds"].append(seconds)
        history["lr"].append(model.optimizer.lr)
        val = accuracy(model, *validation) if validation is not None else float("nan")
        history["val_accuracy"].append(val)
        if progress:
            progress.close(f"epoch {epoch}/{epochs}: loss {total / len(x):.4f}, val acc {val:.4f}, {seconds:.1f}s "
                           f"({len(x) / seconds:,.0f} img/s)")
    return history
