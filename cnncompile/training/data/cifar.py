"""CIFAR-10 from its Python batches (``data_batch_1`` … ``data_batch_5``, ``test_batch``)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .mnist import Dataset

MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)[:, None, None]
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)[:, None, None]


def _batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(entry[b"data"], np.uint8), np.asarray(entry[b"labels"], np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR-10: {path} is missing; give the directory 'cifar-10-batches-py' "
                                f"holding data_batch_1..5 and test_batch") from None
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a data error
        raise ValueError(f"CIFAR-10: {path} is not a CIFAR-10 Python batch ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10: {path} holds data of shape {data.shape}; expected (N, 3072) with N labels")
    return data, labels


def load_cifar10(directory, validation: int = 5000) -> dict[str, Dataset]:
    """Train (the first 50 000 − ``validation``), val and test splits, float32 NCHW, normalized
    per channel with the training set's mean and standard deviation."""
    directory = Path(directory)
    parts = [_batch(directory / f"data_batch_{k}") for k in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    tx, ty = _batch(directory / "test_batch")

    def images(raw):
        return ((raw.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0) - MEAN) / STD

    cut = len(x) - validation
    return {"train": Dataset(images(x[:cut]), y[:cut]), "val": Dataset(images(x[cut:]), y[cut:]),
            "test": Dataset(images(tx), ty)}
