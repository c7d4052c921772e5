"""Generated data sets for the examples that have no download: shapes with boxes, stick figures,
and plain random images for networks (AlexNet, ResNet-18) that only need the right shapes.

Every generator is seeded and vectorized; images are float32 NCHW in [0, 1].
"""
from __future__ import annotations

import numpy as np

SHAPES = ("square", "disc", "triangle")


def _grid(size: int):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def shapes(n: int = 6000, size: int = 32, seed: int = 0, noise: float = 0.05) -> dict:
    """One filled shape per image (square, disc or triangle) of random size and place.

    Targets: ``cls`` (the shape's index) and ``box``, the four corners of its bounding box as
    8 coordinates ``(x1, y1, x2, y1, x2, y2, x1, y2)`` divided by the image size (the lecture's
    classification + bounding-box regression). Split 80/10/10 into train, val and test.
    """
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, len(SHAPES), n)
    half = rng.uniform(size * 0.12, size * 0.32, n).astype(np.float32)
    cx = rng.uniform(half, size - half).astype(np.float32)
    cy = rng.uniform(half, size - half).astype(np.float32)
    xs, ys = _grid(size)
    dx = (xs[None] - cx[:, None, None]) / half[:, None, None]
    dy = (ys[None] - cy[:, None, None]) / half[:, None, None]
    square = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    disc = dx ** 2 + dy ** 2 <= 1
    triangle = (dy <= 1) & (dy >= -1) & (np.abs(dx) <= (dy + 1) / 2)  # apex at the top
    masks = np.where(cls[:, None, None] == 0, square, np.where(cls[:, None, None] == 1, disc, triangle))
    images = masks.astype(np.float32) * rng.uniform(0.6, 1.0, (n, 1, 1)).astype(np.float32)
    images += noise * rng.standard_normal(images.shape).astype(np.float32)
    x1, y1, x2, y2 = (cx - half) / size, (cy - half) / size, (cx + half) / size, (cy + half) / size
    box = np.stack([x1, y1, x2, y1, x2, y2, x1, y2], axis=1).astype(np.float32)
    return split(images[:, None], {"cls": cls.astype(np.int64), "box": box})


# the stick figure's joints and its bones
JOINTS = ("head", "neck", "hip", "left hand", "right hand", "left foot", "right foot")
BONES = ((0, 1), (1, 2), (1, 3), (1, 4), (2, 5), (2, 6))


def stick_figures(n: int = 6000, size: int = 32, seed: int = 0, noise: float = 0.05) -> dict:
    """Stick figures in random poses; target ``(N, 14)``: each joint's (x, y) divided by the size."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.6, 1.0, n) * size / 32
    neck = np.stack([rng.uniform(12, 20, n), rng.uniform(9, 13, n)], 1)
    angle = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731 - local shorthand
    def limb(origin, theta, length):
        return origin + (length * scale)[:, None] * np.stack([np.sin(theta), np.cos(theta)], 1)
    head = limb(neck, np.pi + angle(-0.4, 0.4), np.full(n, 5.0))
    hip = limb(neck, angle(-0.3, 0.3), np.full(n, 9.0))
    joints = [head, neck, hip, limb(neck, angle(0.4, 2.6), np.full(n, 8.0)),
              limb(neck, -angle(0.4, 2.6), np.full(n, 8.0)), limb(hip, angle(0.1, 0.8), np.full(n, 9.0)),
              limb(hip, -angle(0.1, 0.8), np.full(n, 9.0))]
    points = np.clip(np.stack(joints, 1), 0.5, size - 0.5).astype(np.float32)  # (n, joints, 2)
    xs, ys = _grid(size)
    images = np.zeros((n, size, size), np.float32)
    for a, b in BONES:  # distance from each pixel to the segment a–b
        pa, pb = points[:, a], points[:, b]
        d = pb - pa
        t = ((xs[None] - pa[:, 0, None, None]) * d[:, 0, None, None] + (ys[None] - pa[:, 1, None, None])
             * d[:, 1, None, None]) / np.maximum((d ** 2).sum(1), 1e-6)[:, None, None]
        t = np.clip(t, 0, 1)
        px = pa[:, 0, None, None] + t * d[:, 0, None, None]
        py = pa[:, 1, None, None] + t * d[:, 1, None, None]
        images = np.maximum(images, (np.hypot(xs[None] - px, ys[None] - py) <= 0.9).astype(np.float32))
    images += noise * rng.standard_normal(images.shape).astype(np.float32)
    return split(images[:, None], (points / size).reshape(n, -1))


def random_images(shape: tuple, classes: int, n: int = 64, seed: int = 0) -> dict:
    """Noise with random labels: enough to compile, time and check a network with no data set here."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    return split(x, rng.integers(0, classes, n))


def take(y, idx):
    """Rows ``idx`` of a target: an array, or a dict / tuple of arrays (several heads)."""
    if isinstance(y, dict):
        return {k: v[idx] for k, v in y.items()}
    if isinstance(y, tuple):
        return tuple(v[idx] for v in y)
    return y[idx]


def split(x, y, fractions=(0.8, 0.1)) -> dict:
    n = len(x)
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return {"train": (x[:a], take(y, slice(0, a))), "val": (x[a:b], take(y, slice(a, b))),
            "test": (x[b:], take(y, slice(b, n)))}


def box_iou(pred, true) -> np.ndarray:
    """IoU of axis-aligned boxes given as 8 corner coordinates (their extremes are used)."""
    def extent(b):
        b = np.asarray(b).reshape(len(b), 4, 2)
        return b[:, :, 0].min(1), b[:, :, 1].min(1), b[:, :, 0].max(1), b[:, :, 1].max(1)
    px1, py1, px2, py2 = extent(pred)
    tx1, ty1, tx2, ty2 = extent(true)
    iw = np.clip(np.minimum(px2, tx2) - np.maximum(px1, tx1), 0, None)
    ih = np.clip(np.minimum(py2, ty2) - np.maximum(py1, ty1), 0, None)
    inter = iw * ih
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter
    return inter / np.maximum(union, 1e-12)
