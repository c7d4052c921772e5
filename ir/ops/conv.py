"""Convolution and dense layers as index sums.

    Zc[b,n,x,y] = Σ_{m,i,j} W[n,m,i,j]·X[b,m, s·x + d·i − p, s·y + d·j − p]
    Z[b,n,x,y]  = Zc[b,n,x,y] + bias[n]

With groups, the channel n is ``g·N_g + n'`` and the input channel ``g·M_g + m``: still affine,
so the same derivation covers depth-wise convolution.
"""
from __future__ import annotations

from ..affine import Affine
from ..errors import CompileError, ShapeError, where
from ..expr import Stage, read, var
from .base import OpDef, OpNode, expect_rank, fmt_shape, register


def pair(value, name: str, node: OpNode, minimum: int) -> tuple[int, int]:
    """PyTorch's int-or-pair arguments, checked."""
    v = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(v) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        raise CompileError(f"{where(node)}: {name} must be an int or a pair of ints, got {value!r}")
    if min(v) < minimum:
        raise CompileError(f"{where(node)}: {name} must be ≥ {minimum}, got {value!r}")
    return v


def window_out(node: OpNode, size: int, k: int, s: int, p: int, d: int, axis: str) -> int:
    span = d * (k - 1) + 1
    if size + 2 * p < span:
        raise ShapeError(
            f"{where(node)}: the {axis} kernel spans {span} but the padded input is only "
            f"{size + 2 * p} ({size} + 2·{p}); use a smaller kernel or dilation, more padding, "
            f"or a larger input"
        )
    return (size + 2 * p - span) // s + 1


@register
class Conv2d(OpDef):
    kind = "conv2d"
    param_names = ("weight", "bias")

    def geometry(self, node: OpNode):
        a = node.attrs
        k = pair(a["kernel_size"], "kernel_size", node, 1)
        s = pair(a.get("stride", 1), "stride", node, 1)
        p = pair(a.get("padding", 0), "padding", node, 0)
        d = pair(a.get("dilation", 1), "dilation", node, 1)
        return k, s, p, d

    def infer(self, node, shapes):
        (shape,) = shapes
        expect_rank(node, shape, 4, "N, C, H, W")
        a = node.attrs
        cin, cout, groups = a["in_channels"], a["out_channels"], a.get("groups", 1)
        if shape[1] != cin:
            raise ShapeError(
                f"{where(node)} expects {cin} input channels, got input of shape {fmt_shape(shape)}; "
                f"set in_channels={shape[1]} or fix the layer before it"
            )
        if groups < 1 or cin % groups or cout % groups:
            raise CompileError(
                f"{where(node)}: groups={groups} must divide in_channels={cin} and out_channels={cout}"
            )
        k, s, p, d = self.geometry(node)
        oh = window_out(node, shape[2], k[0], s[0], p[0], d[0], "vertical")
        ow = window_out(node, shape[3], k[1], s[1], p[1], d[1], "horizontal")
        return (shape[0], cout, oh, ow)

    def param_shapes(self, node, shapes):
        a = node.attrs
        k, *_ = self.geometry(node)
        out = {"weight": (a["out_channels"], a["in_channels"] // a.get("groups", 1), *k)}
        if a.get("bias", True):
            out["bias"] = (a["out_channels"],)
        return out

    def lower(self, node, shapes, out_shape):
        (xs,) = shapes
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry(node)
        groups = a.get("groups", 1)
        ng, mg = a["out_channels"] // groups, a["in_channels"] // groups
        b, n, x, y, m, i, j, g = (var(c) for c in "bnxymijg")
        W, X = node.params["weight"], node.inputs[0]
        if groups == 1:
            chan_out, chan_in, gdom = n, m, ()
        else:
            chan_out, chan_in, gdom = g * ng + n, g * mg + m, (("g", groups),)
        body = read(W, chan_out, m, i, j) * read(X, b, chan_in, sh * x + dh * i - ph, sw * y + dw * j - pw)
        conv_out = node.output if "bias" not in node.params else node.output + ".conv"
        index = tuple(Affine.from_sympy(e) for e in (b, chan_out, x, y))
        _, _, oh, ow = out_shape
        stages = [Stage(out=conv_out, out_index=index,
                        domain=(("b", out_shape[0]),) + gdom + (("n", ng), ("x", oh), ("y", ow)),
                        reduce=(("m", mg), ("i", kh), ("j", kw)), combine="sum", body=body,
                        layer=node.name, note="convolution")]
        if "bias" in node.params:
            stages.append(add_bias(node, conv_out, out_shape, channel_axis=1))
        return stages


@register
class Linear(OpDef):
    kind = "linear"
    param_names = ("weight", "bias")

    def infer(self, node, shapes):
        (shape,) = shapes
        expect_rank(node, shape, 2, "N, features")
        if shape[1] != node.attrs["in_features"]:
            raise ShapeError(
                f"{where(node)} expects {node.attrs['in_features']} input features, got input of "
                f"shape {fmt_shape(shape)}; set in_features={shape[1]}"
            )
        return (shape[0], node.attrs["out_features"])

    def param_shapes(self, node, shapes):
        a = node.attrs
        out = {"weight": (a["out_features"], a["in_features"])}
        if a.get("bias", True):
            out["bias"] = (a["out_features"],)
        return out

    def lower(self, node, shapes, out_shape):
        b, n, k = var("b"), var("n"), var("k")
        W, X = node.params["weight"], node.inputs[0]
        mm_out = node.output if "bias" not in node.params else node.output + ".mm"
        stages = [Stage(out=mm_out, out_index=(Affine.var("b"), Affine.var("n")),
                        domain=(("b", out_shape[0]), ("n", out_shape[1])),
                        reduce=(("k", node.attrs["in_features"]),), combine="sum",
                        body=read(W, n, k) * read(X, b, k), layer=node.name, note="dense")]
        if "bias" in node.params:
            stages.append(add_bias(node, mm_out, out_shape, channel_axis=1))
        return stages


def add_bias(node: OpNode, src: str, shape: tuple, channel_axis: int) -> Stage:
    """``Z[...] = Zc[...] + bias[channel]``: kept as its own elementwise stage (fused later)."""
    names = ["b", "n", "x", "y"][: len(shape)]
    syms = [var(c) for c in names]
    return Stage(out=node.output, out_index=tuple(Affine.var(c) for c in names),
                 domain=tuple(zip(names, shape)),
                 body=read(src, *syms) + read(node.params["bias"], syms[channel_axis]),
                 layer=node.name, note="bias")
