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


def window_out(node: OpNode, size: int, k: int, s: int, p: int, d: int, axis: str, p_after: int | None = None) -> int:
    """Output length of a window sliding over ``p`` + ``size`` + ``p_after`` (default ``p``) positions."""
    span, p_after = d * (k - 1) + 1, p if p_after is None else p_after
    if size + p + p_after < span:
        padded = f"{size} + 2·{p}" if p == p_after else f"{p} + {size} + {p_after}"
        raise ShapeError(
            f"{where(node)}: the {axis} kernel spans {span} but the padded input is only "
            f"{size + p + p_after} ({padded}); use a smaller kernel or dilation, more padding, "
            f"or a larger input"
        )
    return (size + p + p_after - span) // s + 1


@register
class Conv2d(OpDef):
    kind = "conv2d"
    param_names = ("weight", "bias")

    def geometry(self, node: OpNode):
        """(kernel, stride, padding before, dilation) pairs: the read is ``s·x + d·i − p``."""
        k, s, pads, d = self.full_geometry(node)
        return k, s, tuple(before for before, _ in pads), d

    def full_geometry(self, node: OpNode):
        """As `geometry`, with the padding as (before, after) per axis: ``padding='same'`` with an
        even span pads one more after than before, as PyTorch does."""
        a = node.attrs
        k = pair(a["kernel_size"], "kernel_size", node, 1)
        s = pair(a.get("stride", 1), "stride", node, 1)
        d = pair(a.get("dilation", 1), "dilation", node, 1)
        padding = a.get("padding", 0)
        if padding == "valid":
            return k, s, ((0, 0), (0, 0)), d
        if padding == "same":
            if s != (1, 1):
                raise CompileError(f"{where(node)}: padding='same' is not supported for strided convolutions "
                                   f"(stride={a.get('stride')}), as in PyTorch; give the padding as numbers")
            totals = [dd * (kk - 1) for kk, dd in zip(k, d)]
            return k, s, tuple((t // 2, t - t // 2) for t in totals), d
        if isinstance(padding, str):
            raise CompileError(f"{where(node)}: padding={padding!r} is not one of 'same', 'valid' or numbers")
        p = pair(padding, "padding", node, 0)
        return k, s, tuple((q, q) for q in p), d

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
        k, s, pads, d = self.full_geometry(node)
        oh = window_out(node, shape[2], k[0], s[0], pads[0][0], d[0], "vertical", pads[0][1])
        ow = window_out(node, shape[3], k[1], s[1], pads[1][0], d[1], "horizontal", pads[1][1])
        check_padding_mode(node, shape, pads)
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
        stages = []
        if a.get("padding_mode", "zeros") != "zeros":  # pad into a tensor of its own, then convolve it unpadded
            stages, X = padding_stages(node, xs, self.full_geometry(node)[2], a["padding_mode"]), node.output + ".pad"
            ph = pw = 0
        if groups == 1:
            chan_out, chan_in, gdom = n, m, ()
        else:
            chan_out, chan_in, gdom = g * ng + n, g * mg + m, (("g", groups),)
        body = read(W, chan_out, m, i, j) * read(X, b, chan_in, sh * x + dh * i - ph, sw * y + dw * j - pw)
        conv_out = node.output if "bias" not in node.params else node.output + ".conv"
        index = tuple(Affine.from_sympy(e) for e in (b, chan_out, x, y))
        _, _, oh, ow = out_shape
        stages.append(Stage(out=conv_out, out_index=index,
                            domain=(("b", out_shape[0]),) + gdom + (("n", ng), ("x", oh), ("y", ow)),
                            reduce=(("m", mg), ("i", kh), ("j", kw)), combine="sum", body=body,
                            layer=node.name, note="convolution"))
        if "bias" in node.params:
            stages.append(add_bias(node, conv_out, out_shape, channel_axis=1))
        return stages


def check_padding_mode(node: OpNode, shape: tuple, pads) -> None:
    mode = node.attrs.get("padding_mode", "zeros")
    if mode not in PADDING_MODES:
        raise CompileError(f"{where(node)}: padding_mode={mode!r} is not one of {', '.join(map(repr, PADDING_MODES))}")
    for (before, after), size, axis in zip(pads, shape[2:], ("vertical", "horizontal")):
        limit = size - 1 if mode == "reflect" else size
        if mode in ("reflect", "circular") and max(before, after) > limit:
            raise ShapeError(f"{where(node)}: padding_mode={mode!r} needs the {axis} padding "
                             f"({max(before, after)}) {'below' if mode == 'reflect' else 'at most'} the input's "
                             f"size {size} (input {fmt_shape(shape)}), as PyTorch does; pad less")


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def border_regions(size: int, before: int, after: int, mode: str) -> list[tuple[int, int, int, int]]:
    """One axis of a padded copy as regions ``(out start, length, read coefficient, read offset)``:
    padded position ``start + t`` holds input position ``coefficient·t + offset``. The last region
    comes first, so that the first stage written covers the padded tensor's full extent."""
    left = {"reflect": (-1, before), "replicate": (0, 0), "circular": (1, size - before)}[mode]
    right = {"reflect": (-1, size - 2), "replicate": (0, size - 1), "circular": (1, 0)}[mode]
    regions = [(before + size, after, *right), (before, size, 1, 0), (0, before, *left)]
    return [r for r in regions if r[1] > 0]


def padding_stages(node: OpNode, shape: tuple, pads, mode: str) -> list[Stage]:
    """``P[b, m, u, v] = X[b, m, r(u), r'(v)]`` with ``r`` affine on each of the border regions
    (left, middle, right per axis): one gather stage per pair of regions, so each input gradient is
    the transposed gather that the derivation produces for any affine read."""
    b, m, u, v = (var(c) for c in "bmuv")
    stages = []
    for (top, rows, a_u, c_u) in border_regions(shape[2], *pads[0], mode):
        for (left, cols, a_v, c_v) in border_regions(shape[3], *pads[1], mode):
            body = read(node.inputs[0], b, m, a_u * u + c_u, a_v * v + c_v)
            stages.append(Stage(out=node.output + ".pad",
                                out_index=(Affine.var("b"), Affine.var("m"), Affine.make({"u": 1}, top),
                                           Affine.make({"v": 1}, left)),
                                domain=(("b", shape[0]), ("m", shape[1]), ("u", rows), ("v", cols)), body=body,
                                layer=node.name, note=f"{mode} padding: rows {top}…{top + rows - 1}, "
                                                      f"columns {left}…{left + cols - 1}"))
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
