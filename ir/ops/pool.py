"""Pooling as index sums: max records its winner (the lecture's P), mean is linear.

    Y[b,c,x,y] = max_{i,j} X[b,c, s·x + d·i − p, s·y + d·j − p]        (argmax i*, j* recorded)
    Y[b,c,x,y] = 1/n(x,y) · Σ_{i,j} X[b,c, s·x + i − p, s·y + j − p]

A read outside the input is skipped, which is max pooling's −∞ padding and mean pooling's zero
padding; with ``ceil_mode`` the last window may also run past the padding (PyTorch's rule: it
must start inside the input or the left padding), and its reads there are skipped the same way.
Mean pooling's divisor n is PyTorch's: the window clipped to input + padding (count_include_pad),
or to the input alone, or ``divisor_override``.

Adaptive pooling with windows that do not tile the input (``start = ⌊x·H/O⌋``, ``end =
⌈(x+1)·H/O⌉``) reduces over the whole input axis under the affine constraint
``1 − O ≤ O·h − H·x ≤ H − 1``, which says exactly ``start ≤ h < end``.
"""
from __future__ import annotations

from math import ceil, floor

from cnncompile.ir.lazy import sympy

from ..affine import Affine, Box
from ..errors import CompileError, ShapeError, where
from ..expr import Stage, read, var
from .base import OpDef, expect_rank, fmt_shape, register
from .conv import pair, window_out


def pooled_size(node, size: int, k: int, s: int, p: int, d: int, ceil_mode: bool, axis: str) -> int:
    """PyTorch's ``pooling_output_shape``: floor or ceil, and in ceil mode the last window must
    start inside the input or its left padding."""
    window_out(node, size, k, s, p, d, axis)  # the window must fit the padded input at least once
    span = d * (k - 1) + 1
    out = (size + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class Pool(OpDef):
    dilated = False  # max pooling takes dilation, mean pooling does not (as in PyTorch)

    def geometry(self, node):
        """(kernel, stride, padding) pairs; the summary's receptive fields read these too."""
        a = node.attrs
        k = pair(a["kernel_size"], "kernel_size", node, 1)
        s = pair(a["stride"] if a.get("stride") is not None else a["kernel_size"], "stride", node, 1)
        p = pair(a.get("padding", 0), "padding", node, 0)
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise CompileError(f"{where(node)}: padding {a.get('padding')} must be at most half the "
                               f"kernel size {a['kernel_size']} (as in PyTorch)")
        return k, s, p

    def dilation(self, node):
        return pair(node.attrs.get("dilation", 1), "dilation", node, 1) if self.dilated else (1, 1)

    def infer(self, node, shapes):
        (shape,) = shapes
        expect_rank(node, shape, 4, "N, C, H, W")
        (k, s, p), d = self.geometry(node), self.dilation(node)
        ceil_mode = bool(node.attrs.get("ceil_mode", False))
        oh = pooled_size(node, shape[2], k[0], s[0], p[0], d[0], ceil_mode, "vertical")
        ow = pooled_size(node, shape[3], k[1], s[1], p[1], d[1], ceil_mode, "horizontal")
        return (shape[0], shape[1], oh, ow)

    def window_stage(self, node, shapes, out_shape, **kw) -> Stage:
        (kh, kw_), (sh, sw), (ph, pw) = self.geometry(node)
        dh, dw = self.dilation(node)
        b, c, x, y, i, j = (var(n) for n in "bcxyij")
        window = read(node.inputs[0], b, c, sh * x + dh * i - ph, sw * y + dw * j - pw)
        body = kw.pop("body")(window, (x, y), (kh, kw_), (sh, sw), (ph, pw), shapes[0], out_shape)
        return Stage(out=node.output, out_index=tuple(Affine.var(n) for n in "bcxy"),
                     domain=tuple(zip("bcxy", out_shape)), reduce=(("i", kh), ("j", kw_)),
                     body=body, layer=node.name, constraints=self.partial_windows(node, shapes[0], out_shape), **kw)

    def partial_windows(self, node, in_shape, out_shape) -> tuple[Box, ...]:
        """Where ceil_mode lets the last window run past the input, the window's range as an explicit
        constraint: the skipped reads would be skipped anyway, but so `explain` shows the bounds."""
        if not node.attrs.get("ceil_mode"):
            return ()
        (k, s, p), d = self.geometry(node), self.dilation(node)
        boxes = []
        for t, (x, i) in enumerate(("xi", "yj")):
            if s[t] * (out_shape[2 + t] - 1) + d[t] * (k[t] - 1) - p[t] > in_shape[2 + t] - 1:
                boxes.append(Box(Affine.make({x: s[t], i: d[t]}, -p[t]), 0, in_shape[2 + t] - 1))
        return tuple(boxes)


@register
class MaxPool2d(Pool):
    kind = "maxpool2d"
    dilated = True

    def infer(self, node, shapes):
        if node.attrs.get("return_indices"):
            raise CompileError(f"{where(node)}: return_indices=True is not supported (the winners are recorded "
                               f"for the derived gradient, not handed out); use return_indices=False")
        return super().infer(node, shapes)

    def lower(self, node, shapes, out_shape):
        return [self.window_stage(node, shapes, out_shape, body=lambda w, *_: w, combine="max",
                                  argmax=(node.output + ".argmax_i", node.output + ".argmax_j"),
                                  note="max pooling")]


def window_count(start, k: int, size: int, p: int, last_start: int, include_pad: bool):
    """How many of a window's positions PyTorch counts along one axis, for a window starting at
    ``start`` (an affine sympy expression of the output index; ``last_start`` its largest value)."""
    if include_pad:  # the window clipped to input + padding: all k unless a ceil-mode window runs past it
        return k if last_start + k <= size + p else sympy.Min(start + k, size + p) - start
    if p == 0 and last_start + k <= size:
        return k
    return sympy.Min(start + k, size) - sympy.Max(start, 0)


@register
class AvgPool2d(Pool):
    kind = "avgpool2d"

    def lower(self, node, shapes, out_shape):
        a = node.attrs
        include_pad, override = a.get("count_include_pad", True), a.get("divisor_override")

        def body(window, xy, k, s, p, in_shape, out_shape):
            if override is not None:
                return window / override
            counts = [window_count(s[t] * xy[t] - p[t], k[t], in_shape[2 + t], p[t],
                                   s[t] * (out_shape[2 + t] - 1) - p[t], include_pad) for t in range(2)]
            return window / (counts[0] * counts[1])

        note = "mean pooling" if override is None else f"sum pooling / {override} (divisor_override)"
        return [self.window_stage(node, shapes, out_shape, body=body, combine="sum", note=note)]


def adaptive_size(node, in_hw) -> tuple[int, int]:
    """PyTorch's output_size: an int, or a pair whose ``None`` keeps that input axis."""
    value = node.attrs["output_size"]
    sizes = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(sizes) != 2:
        raise CompileError(f"{where(node)}: output_size must be an int or a pair, got {value!r}")
    out = tuple(h if o is None else o for o, h in zip(sizes, in_hw))
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 1 for o in out):
        raise CompileError(f"{where(node)}: output_size must hold ints ≥ 1 (or None), got {value!r}")
    return out


def window_lengths(size: int, out: int) -> list[int]:
    """PyTorch's adaptive windows: ``[⌊x·H/O⌋, ⌈(x+1)·H/O⌉)`` for each output x."""
    return [ceil((x + 1) * size / out) - floor(x * size / out) for x in range(out)]


def reciprocal_by_run(x, lengths: list[int]):
    """1/length(x) as a piecewise function of the output index: one piece per run of equal lengths."""
    pieces = []
    for k, n in enumerate(lengths):
        if k + 1 < len(lengths) and lengths[k + 1] == n:
            continue
        pieces.append((sympy.Rational(1, n), x <= k))
    if len(pieces) == 1:
        return pieces[0][0]
    return sympy.Piecewise(*pieces[:-1], (pieces[-1][0], True))


class Adaptive(Pool):
    """Windows that tile the input (input size a multiple of the output size): the plain pool;
    otherwise one reduction over the whole input axis under the window constraints."""

    def infer(self, node, shapes):
        (shape,) = shapes
        expect_rank(node, shape, 4, "N, C, H, W")
        if node.attrs.get("return_indices"):
            raise CompileError(f"{where(node)}: return_indices=True is not supported; use return_indices=False")
        node.attrs["input_hw"] = tuple(shape[2:])
        return (shape[0], shape[1], *adaptive_size(node, shape[2:]))  # (an output larger than the input repeats rows)

    @staticmethod
    def uniform(shapes, out_shape) -> bool:
        return all(h % o == 0 for h, o in zip(shapes[0][2:], out_shape[2:]))

    def geometry(self, node):
        """The equivalent plain pool where windows tile the input. Otherwise (the summary's
        receptive field only) the widest window and the mean stride."""
        hw = node.attrs["input_hw"]
        out = adaptive_size(node, hw)
        k = tuple(max(window_lengths(h, o)) for h, o in zip(hw, out))
        return k, tuple(max(1, h // o) for h, o in zip(hw, out)), (0, 0)

    def window_sum(self, node, shapes, out_shape, out: str, **kw) -> Stage:
        (_, _, hh, ww), (_, _, oh, ow) = shapes[0], out_shape
        b, c, h, w = (var(n) for n in "bchw")
        constraints = (Box(Affine.make({"h": oh, "x": -hh}), 1 - oh, hh - 1),
                       Box(Affine.make({"w": ow, "y": -ww}), 1 - ow, ww - 1))
        return Stage(out=out, out_index=tuple(Affine.var(n) for n in "bcxy"), domain=tuple(zip("bcxy", out_shape)),
                     reduce=(("h", hh), ("w", ww)), body=read(node.inputs[0], b, c, h, w),
                     constraints=constraints, layer=node.name, **kw)


@register
class AdaptiveAvgPool2d(Adaptive, AvgPool2d):
    kind = "adaptive_avgpool2d"

    def lower(self, node, shapes, out_shape):
        if self.uniform(shapes, out_shape):
            return AvgPool2d.lower(self, node, shapes, out_shape)
        total = node.output + ".sum"
        x, y = var("x"), var("y")
        scale = (reciprocal_by_run(x, window_lengths(shapes[0][2], out_shape[2]))
                 * reciprocal_by_run(y, window_lengths(shapes[0][3], out_shape[3])))
        mean = Stage(out=node.output, out_index=tuple(Affine.var(n) for n in "bcxy"),
                     domain=tuple(zip("bcxy", out_shape)), body=read(total, *(var(n) for n in "bcxy")) * scale,
                     layer=node.name, note="adaptive mean: ÷ window size")
        return [self.window_sum(node, shapes, out_shape, total, combine="sum",
                                note="adaptive windows ⌊x·H/O⌋ ≤ h < ⌈(x+1)·H/O⌉: sum"), mean]


@register
class AdaptiveMaxPool2d(Adaptive, MaxPool2d):
    kind = "adaptive_maxpool2d"

    def lower(self, node, shapes, out_shape):
        if self.uniform(shapes, out_shape):
            return MaxPool2d.lower(self, node, shapes, out_shape)
        return [self.window_sum(node, shapes, out_shape, node.output, combine="max",
                                argmax=(node.output + ".argmax_h", node.output + ".argmax_w"),
                                note="adaptive max over ⌊x·H/O⌋ ≤ h < ⌈(x+1)·H/O⌉")]
