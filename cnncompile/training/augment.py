"""Data augmentation, the lecture's list, as one random affine map per image (vectorized NumPy).

Every transformation (rotation, translation, rescaling, flips, shearing, stretching) is a 2×3
affine map about the image centre; they compose into one matrix per image, the image is
resampled through its inverse (bilinear, zero outside), and coordinate targets (bounding-box
corners, keypoints) go through the matrix itself, so they stay on what they mark.

Coordinates are in pixels with pixel (row i, column j) centred at (j + ½, i + ½); targets
named in ``points`` hold (x, y) pairs divided by the image width and height (as
`cnncompile.training.data.synthetic` makes them).
"""
from __future__ import annotations

import numpy as np


class Augment:
    """Random transformations for training batches; all off unless given.

    rotation: max |angle| in degrees (uniform); translation: max shift in pixels per axis;
    scale: (lo, hi) zoom, log-uniform (the lecture: 1/1.6 to 1.6); hflip/vflip: probability 0.5
    each when True; shear: max |angle| in degrees; stretch: (lo, hi) horizontal/vertical aspect,
    log-uniform (1/1.3 to 1.3); points: target keys (or True for a single target) that are
    coordinates to move with the image.
    """

    def __init__(self, rotation=0.0, translation=0.0, scale=None, hflip=False, vflip=False, shear=0.0,
                 stretch=None, points=(), fill=0.0):
        for name, pair_ in (("scale", scale), ("stretch", stretch)):
            if pair_ is not None and not (len(pair_) == 2 and 0 < pair_[0] <= pair_[1]):
                raise ValueError(f"Augment: {name} must be a pair 0 < lo ≤ hi, got {pair_!r}")
        if rotation < 0 or translation < 0 or shear < 0:
            raise ValueError("Augment: rotation, translation and shear are maximum magnitudes (≥ 0)")
        self.rotation, self.translation, self.scale = float(rotation), float(translation), scale
        self.hflip, self.vflip, self.shear, self.stretch = hflip, vflip, float(shear), stretch
        self.points, self.fill = points, float(fill)

    def __repr__(self):
        parts = {k: v for k, v in vars(self).items() if v not in (0.0, None, False, ())}
        return f"Augment({', '.join(f'{k}={v!r}' for k, v in parts.items())})"

    # ----- the random maps ----------------------------------------------------------------------
    def matrices(self, n: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3, 3) forward maps, input pixel coordinates → output pixel coordinates."""
        def log_uniform(pair_):
            return np.exp(rng.uniform(np.log(pair_[0]), np.log(pair_[1]), n)) if pair_ else np.ones(n)

        theta = np.deg2rad(rng.uniform(-self.rotation, self.rotation, n))
        shear = np.tan(np.deg2rad(rng.uniform(-self.shear, self.shear, n)))
        zoom, aspect = log_uniform(self.scale), log_uniform(self.stretch)
        fx = np.where(rng.random(n) < 0.5, -1.0, 1.0) if self.hflip else np.ones(n)
        fy = np.where(rng.random(n) < 0.5, -1.0, 1.0) if self.vflip else np.ones(n)
        shift = rng.uniform(-self.translation, self.translation, (n, 2))
        return compose(n, height, width, theta, shear, zoom, aspect, fx, fy, shift)

    def __call__(self, x: np.ndarray, y=None, rng: np.random.Generator | None = None):
        rng = rng if rng is not None else np.random.default_rng()
        n, _, height, width = x.shape
        forward = self.matrices(n, height, width, rng)
        out = warp(x, np.linalg.inv(forward), self.fill)
        return out, (move_points(y, forward, self.points, height, width) if y is not None else None)


def compose(n, height, width, theta, shear, zoom, aspect, fx, fy, shift) -> np.ndarray:
    """centre⁻¹ → flip → stretch → scale → shear → rotate → centre + shift, as 3×3 matrices."""
    def stack(rows):
        return np.stack([np.stack(r, -1) for r in rows], -2)

    one, zero = np.ones(n), np.zeros(n)
    cx, cy = width / 2.0, height / 2.0
    to_centre = stack([[one, zero, -cx * one], [zero, one, -cy * one], [zero, zero, one]])
    linear = stack([[fx * zoom * aspect, zero, zero], [zero, fy * zoom, zero], [zero, zero, one]])
    sheared = stack([[one, shear, zero], [zero, one, zero], [zero, zero, one]])
    c, s = np.cos(theta), np.sin(theta)
    rotate = stack([[c, -s, zero], [s, c, zero], [zero, zero, one]])
    back = stack([[one, zero, cx + shift[:, 0]], [zero, one, cy + shift[:, 1]], [zero, zero, one]])
    return back @ rotate @ sheared @ linear @ to_centre


def warp(x: np.ndarray, inverse: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Bilinear resampling: output pixel p takes the input at ``inverse @ p`` (zero outside)."""
    n, channels, height, width = x.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    sx = inverse[:, 0, 0, None, None] * xs + inverse[:, 0, 1, None, None] * ys + inverse[:, 0, 2, None, None] - 0.5
    sy = inverse[:, 1, 0, None, None] * xs + inverse[:, 1, 1, None, None] * ys + inverse[:, 1, 2, None, None] - 0.5
    sx, sy = np.round(sx, 9), np.round(sy, 9)  # exact maps (flips, quarter turns) land on exact pixels
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    ax, ay = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    flat = x.reshape(n, channels, -1)
    out = np.zeros(x.shape, np.float32)
    batch = np.arange(n)[:, None, None]
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            cx_, cy_ = x0 + dx, y0 + dy
            inside = (cx_ >= 0) & (cx_ < width) & (cy_ >= 0) & (cy_ < height)
            index = np.where(inside, cy_ * width + cx_, 0)
            values = flat[batch, :, index]  # (n, H, W, C)
            weight = (wx * wy * inside)[..., None]
            out += np.moveaxis(values * weight + fill * (wx * wy * ~inside)[..., None], -1, 1)
    return out


def move_points(y, forward: np.ndarray, keys, height: int, width: int):
    """Targets with their coordinate entries mapped by ``forward`` (others unchanged)."""
    def move(values):
        pts = np.asarray(values, np.float64).reshape(len(values), -1, 2) * [width, height]
        moved = np.einsum("nij,nkj->nki", forward[:, :2, :2], pts) + forward[:, None, :2, 2]
        return (moved / [width, height]).reshape(np.shape(values)).astype(np.asarray(values).dtype)

    if keys is True:
        return move(y)
    if isinstance(y, dict):
        return {k: move(v) if k in keys else v for k, v in y.items()}
    return y
