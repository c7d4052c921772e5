"""Check every array at the API boundary before any computation, so that native code only ever
sees buffers of exactly the shapes it was planned for."""
from __future__ import annotations

import warnings

import numpy as np


class PixelScaleWarning(UserWarning):
    """Raw 8-bit pixel values (0..255) given where a network expects scaled inputs."""


def as_batch(x, example_shape: tuple, dtype, what: str = "input") -> np.ndarray:
    """``x`` as a C-contiguous ``dtype`` array of shape ``(N, *example_shape)``."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - anything that is not array-like
        raise TypeError(f"{what} must be an array, got {type(x).__name__}") from exc
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{what} must hold numbers, got dtype {arr.dtype}")
    if arr.shape[1:] != tuple(example_shape) or arr.ndim != len(example_shape) + 1:
        raise ValueError(f"{what} has shape {arr.shape}; expected (N, {', '.join(map(str, example_shape))}) "
                         f"(batch first, then the input_shape given to cc.compile)")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (N = 0)")
    if arr.dtype == np.uint8 and arr.max() > 1:
        warnings.warn(f"{what} is uint8 with values up to {arr.max()}: the network sees raw 0..255 pixel values "
                      f"(which make training unstable); scale it first, e.g. x.astype(np.float32) / 255 "
                      f"(silence with warnings.simplefilter('ignore', cc.validate.PixelScaleWarning))",
                      PixelScaleWarning, stacklevel=3)
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or Inf values")
    return arr


def as_labels(y, batch: int, classes: int, what: str = "target") -> np.ndarray:
    """Class indices as int64 in ``[0, classes)``."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.shape != (batch,):
        raise ValueError(f"{what} has shape {arr.shape}; CrossEntropyLoss expects class indices of shape ({batch},)")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{what} must hold integer class indices, got non-integral floats")
    elif arr.dtype.kind not in "iub":
        raise TypeError(f"{what} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= classes):
        bad = arr[(arr < 0) | (arr >= classes)][0]
        raise ValueError(f"{what} holds label {bad}, outside 0..{classes - 1} (the network has {classes} outputs)")
    return arr


def batch_statistics(batch: int, prog, batchnorms: list[str]) -> None:
    """Batch norm in training needs more than one value per channel (as PyTorch demands)."""
    for name in batchnorms:
        spec = prog.tensors[f"{name}.out"]
        per_channel = batch * spec.shape[2] * spec.shape[3]
        if per_channel < 2:
            raise ValueError(f"layer '{name}' (BatchNorm2d) sees {per_channel} value per channel in this batch; "
                             f"training needs at least 2: use a larger batch, or call model.eval()")


def batch_size(value, where: str) -> int:
    """A chunk size of at least one example."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: batch_size must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{where}: batch_size must be at least 1, got {value}")
    return int(value)


def targets(y, heads):
    """``y`` as `take` and the feeds expect it: the heads' targets as a tuple where given as a
    list (several heads), a single head's target as an array (a list of labels indexes like one)."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    if len(heads) == 1 and heads[0][0] is None:
        return np.asarray(y) if isinstance(y, (list, tuple)) else y
    return tuple(y) if isinstance(y, list) else y


def same_rows(x, y, heads, where: str) -> None:
    """Every head's target has one row per example of ``x``."""
    keys = [k for k, _ in heads]
    if keys == [None]:
        parts = [(None, y)]
    elif isinstance(y, dict):
        parts = [(k, y[k]) for k in keys if k in y]
    else:
        parts = list(zip(keys, y))
    for key, target in parts:
        rows = len(target)
        if rows != len(x):
            what = "the target" if key is None else f"the target for head {key!r}"
            raise ValueError(f"{where}: {what} has {rows} rows but x has {len(x)} examples; "
                             f"give one target row per example")
