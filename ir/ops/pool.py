"""Pooling as index sums: max records its winner (the lecture's P), mean is linear.

    Y[b,c,x,y] = max_{i,j} X[b,c, s·x + i − p, s·y + j − p]        (argmax i*, j* recorded)
    Y[b,c,x,y] = 1/(kh·kw) · Σ_{i,j} X[b,c, s·x + i − p, s·y + j − p]
"""
from __future__ import annotations

import sympy

from ..affine import Affine
from ..errors import CompileError, where
from ..expr import Stage, read, var
from .base import OpDef, expect_rank, register
from .conv import pair, window_out


class Pool(OpDef):
    def geometry(self, node):
        a = node.attrs
        k = pair(a["kernel_size"], "kernel_size", node, 1)
        s = pair(a["stride"] if a.get("stride") is not None else a["kernel_size"], "stride", node, 1)
        p = pair(a.get("padding", 0), "padding", node, 0)
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            raise CompileError(f"{where(node)}: padding {a.get('padding')} must be at most half the "
                               f"kernel size {a['kernel_size']} (as in PyTorch)")
        return k, s, p

    def infer(self, node, shapes):
        (shape,) = shapes
        expect_rank(node, shape, 4, "N, C, H, W")
        k, s, p = self.geometry(node)
        oh = window_out(node, shape[2], k[0], s[0], p[0], 1, "vertical")
        ow = window_out(node, shape[3], k[1], s[1], p[1], 1, "horizontal")
        return (shape[0], shape[1], oh, ow)

    def window_stage(self, node, shapes, out_shape, **kw) -> Stage:
        (kh, kw_), (sh, sw), (ph, pw) = self.geometry(node)
        b, c, x, y, i, j = (var(n) for n in "bcxyij")
        window = read(node.inputs[0], b, c, sh * x + i - ph, sw * y + j - pw)
        body = kw.pop("body")(window, (x, y), (kh, kw_), (sh, sw), (ph, pw), shapes[0])
        return Stage(out=node.output, out_index=tuple(Affine.var(n) for n in "bcxy"),
                     domain=tuple(zip("bcxy", out_shape)), reduce=(("i", kh), ("j", kw_)),
                     body=body, layer=node.name, **kw)


@register
class MaxPool2d(Pool):
    kind = "maxpool2d"

    def lower(self, node, shapes, out_shape):
        return [self.window_stage(node, shapes, out_shape, body=lambda w, *_: w, combine="max",
                                  argmax=(node.output + ".argmax_i", node.output + ".argmax_j"),
                                  note="max pooling")]


@register
class AvgPool2d(Pool):
    kind = "avgpool2d"

    def lower(self, node, shapes, out_shape):
        include_pad = node.attrs.get("count_include_pad", True)

        def body(window, xy, k, s, p, in_shape):
            if include_pad:
                return window / (k[0] * k[1])
            counts = [sympy.Min(s[a] * xy[a] - p[a] + k[a], in_shape[2 + a]) - sympy.Max(s[a] * xy[a] - p[a], 0)
                      for a in range(2)]
            return window / (counts[0] * counts[1])

        return [self.window_stage(node, shapes, out_shape, body=body, combine="sum", note="mean pooling")]


@register
class AdaptiveAvgPool2d(AvgPool2d):
    """Uniform windows only (input size a multiple of the output size): then it is AvgPool2d."""

    kind = "adaptive_avgpool2d"

    def infer(self, node, shapes):
        expect_rank(node, shapes[0], 4, "N, C, H, W")
        node.attrs["input_hw"] = tuple(shapes[0][2:])
        return super().infer(node, shapes)

    def geometry(self, node):
        out = pair(node.attrs["output_size"], "output_size", node, 1)
        h, w = node.attrs["input_hw"]
        if h % out[0] or w % out[1]:
            raise CompileError(f"{where(node)}: input {h}×{w} is not a multiple of output_size {out}; "
                               f"only uniform windows are supported, resize the input or use AvgPool2d")
        k = (h // out[0], w // out[1])
        return k, k, (0, 0)
