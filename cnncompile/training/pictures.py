"""Pictures (PNG, headless): a convolution's filters, training curves, the input patches that
excite a channel most (cropped to its receptive field: the lecture's "what do the filters
learn"), and the graph IR as a layered graph.

The arrays and graphs behind each picture are separate functions (`filter_grid`, `top_patches`,
`op_graph`, `layered_layout`), so that what a picture claims can be tested on numbers. The graph
is drawn by Graphviz's ``dot`` where it is installed, else by a layered layout of our own in
matplotlib; both read the graph IR's networkx graph (`ir/graph.py`).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError("pictures need matplotlib: pip install 'cnncompile[show]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def conv_layer(model, layer: str | None = None):
    """The convolution named ``layer`` (default: the first), or an error naming the convolutions."""
    convs = [n for n in model.tracer.graph.ops if n.kind == "conv2d"]
    if not convs:
        raise ValueError("the network has no Conv2d layer, so it has no filters to show")
    if layer is None:
        return convs[0]
    node = next((n for n in convs if n.name == layer), None)
    if node is None:
        raise KeyError(f"no convolution named {layer!r}; the convolutions are {[n.name for n in convs]}")
    return node


def first_conv(model):
    return conv_layer(model)


def filter_grid(model, layer: str | None = None) -> np.ndarray:
    """Filters of a convolution (default: the first) tiled into one image, each scaled to [0, 1]
    on its own: one row per output channel and one column per input channel, or one RGB tile per
    filter (in rows of `rgb_columns`) when the layer sees 3 channels."""
    w = filter_weights(model, conv_layer(model, layer))
    tiles = [w[n].transpose(1, 2, 0) for n in range(len(w))] if w.shape[1] == 3 else \
        [w[n, m][..., None] for n in range(w.shape[0]) for m in range(w.shape[1])]
    tiles = [(t - t.min()) / max(t.max() - t.min(), 1e-12) for t in tiles]
    return tile(tiles, columns=w.shape[1] if w.shape[1] != 3 else rgb_columns(len(tiles)))


def filter_weights(model, node) -> np.ndarray:
    """(output channels, input channels per group, kh, kw) as float64."""
    return model.state_dict()[f"{node.name}.weight"].astype(np.float64)


def rgb_columns(count: int) -> int:
    return int(np.ceil(np.sqrt(count)))


def tile(tiles: list, columns: int, gap: int = 1) -> np.ndarray:
    h, w, c = tiles[0].shape
    rows = int(np.ceil(len(tiles) / columns))
    out = np.ones((rows * (h + gap) - gap, columns * (w + gap) - gap, c))
    for k, t in enumerate(tiles):
        r, q = divmod(k, columns)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = t
    return out


def pixel_scale(array: np.ndarray, longest: int = 1600, most: int = 24) -> int:
    """Screen pixels per array pixel: a 5×5 filter gets at least 40, a big grid stays under
    ``longest`` pixels (but never below one per weight)."""
    return int(np.clip(longest // max(array.shape[:2]), 1, most))


def save_image(array: np.ndarray, path, title: str = "", rows=None, columns=None, labels=("", "")) -> None:
    """``array`` drawn with one square of `pixel_scale` pixels per element. ``rows``/``columns``:
    (centre, label) ticks along each axis, with ``labels`` naming the two axes."""
    plt = _pyplot()
    scale, dpi = pixel_scale(array), 100
    height, width = array.shape[0] * scale / dpi, array.shape[1] * scale / dpi
    margin = (0.9 if rows else 0.15, 0.55 if title or columns else 0.15)
    fig = plt.figure(figsize=(max(width + margin[0] + 0.15, 2.5), height + margin[1] + 0.15), dpi=dpi)
    fw, fh = fig.get_size_inches()
    ax = fig.add_axes([margin[0] / fw, 0.15 / fh, width / fw, height / fh])
    ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", interpolation="nearest",
              vmin=0, vmax=1, aspect="equal")
    for ticks, set_ticks, set_labels, name, set_name in (
            (rows, ax.set_yticks, ax.set_yticklabels, labels[0], ax.set_ylabel),
            (columns, ax.set_xticks, ax.set_xticklabels, labels[1], ax.set_xlabel)):
        set_ticks([t for t, _ in ticks or []])
        set_labels([str(label) for _, label in ticks or []], fontsize=7)
        if ticks and name:
            set_name(name, fontsize=8)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / fh, va="top")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def tick_marks(count: int, size: int, gap: int = 1, most: int = 32) -> list[tuple[float, int]]:
    """(centre, index) of tiles of ``size`` pixels along an axis; every k-th where there are many."""
    every = int(np.ceil(count / most))
    return [(k * (size + gap) + (size - 1) / 2, k) for k in range(0, count, every)]


def save_filters(model, path, layer=None) -> None:
    """The filter grid, scaled up and labelled: rows are output channels n, columns input
    channels m (each tile W[n, m]); an RGB layer shows one colour tile per output channel."""
    node = conv_layer(model, layer)
    w = filter_weights(model, node)
    grid = filter_grid(model, node.name)
    kh, kw = w.shape[2:]
    title = f"filters of layer '{node.name}' ({node.type} {w.shape[2]}×{w.shape[3]})"
    if w.shape[1] == 3:
        columns = rgb_columns(len(w))
        save_image(grid, path, title + ": output channel = row + column",
                   rows=[(t, k * columns) for t, k in tick_marks(int(np.ceil(len(w) / columns)), kh)],
                   columns=tick_marks(columns, kw), labels=("output channel", ""))
    else:
        save_image(grid, path, title, rows=tick_marks(w.shape[0], kh), columns=tick_marks(w.shape[1], kw),
                   labels=("output channel n", "input channel m"))


CURVE_SKIP = {"epoch", "lr", "seconds", "images_per_second"}


def curve_panels(history: dict) -> list[str]:
    """One panel per logged quantity, training and validation together: the total loss first,
    then each head's loss (``cls_loss``, ...), then the other metrics (accuracy, ...)."""
    names = []
    for key in history:
        base = key[4:] if key.startswith("val_") else key
        if base not in CURVE_SKIP and base not in names:
            names.append(base)
    return sorted(names, key=lambda n: (n != "loss", not n.endswith("loss")))


def curves_figure(history: dict):
    """Training and validation curves per whole epoch, as ``fit`` logged them: the loss, every
    head's loss on several-head networks, and accuracy where there is a classification head."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    if not history.get("epoch"):
        raise ValueError("no history to plot: train with fit() first (or load a checkpoint written by fit)")
    panels = curve_panels(history)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=100, squeeze=False)
    epochs = history["epoch"]
    for ax, metric in zip(axes[0], panels):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + metric)
            if values is not None and len(values) == len(epochs):
                ax.plot(epochs, values, style, marker="o", label=("validation " if prefix else "training ") + metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(min(epochs) - 0.25, max(epochs) + 0.25)
        ax.set_xlabel("epoch")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_curves(history: dict, path) -> None:
    """`curves_figure` as a PNG."""
    fig = curves_figure(history)
    fig.savefig(path)
    _pyplot().close(fig)


def top_patches(model, layer: str, channel: int, images: np.ndarray, top: int = 16):
    """The ``top`` strongest activations of ``channel`` at ``layer`` over ``images`` and the input
    patch each one sees: its receptive field (size, jump, start from `summary`), zero-padded at
    the border. Returns a list of (activation, image index, row, column, patch)."""
    from ..summary import receptive_fields
    graph = model.tracer.graph
    node = next((n for n in graph.ops if n.name == layer), None)
    if node is None:
        raise KeyError(f"no layer named {layer!r}; the layers are {[n.name for n in graph.ops]}")
    shape = graph.shape(node.output)
    if len(shape) != 4:
        raise ValueError(f"layer '{layer}' outputs shape {shape}; pick a convolutional layer (N, C, H, W)")
    if not 0 <= channel < shape[1]:
        raise ValueError(f"layer '{layer}' has {shape[1]} channels; channel {channel} does not exist")
    field = receptive_fields(graph)[node.output]
    x = np.asarray(images, np.float32)
    acts = []
    for start in range(0, len(x), 256):
        env = model.executable.run("predict", len(x[start:start + 256]), {"input": x[start:start + 256]},
                                     share=False)  # intermediate activations stay readable
        acts.append(env[node.output][:, channel].copy())
    acts = np.concatenate(acts)
    order = np.argsort(acts.reshape(-1))[::-1][:top]
    size = field.size
    pad = size
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = []
    for flat in order:
        b, r, c = np.unravel_index(flat, acts.shape)
        top_row = int(round(field.start + r * field.jump - size / 2))
        left = int(round(field.start + c * field.jump - size / 2))
        patch = padded[b, :, pad + top_row:pad + top_row + size, pad + left:pad + left + size]
        out.append((float(acts[b, r, c]), int(b), int(r), int(c), patch))
    return out


def save_patches(model, path, layer: str, channel: int, images, top: int = 16) -> None:
    found = top_patches(model, layer, channel, images, top)
    tiles = []
    for _, _, _, _, patch in found:
        p = patch.transpose(1, 2, 0).astype(np.float64)
        tiles.append((p - p.min()) / max(p.max() - p.min(), 1e-12))
    save_image(tile(tiles, columns=int(np.ceil(np.sqrt(len(tiles))))), path,
               f"top {len(tiles)} patches for layer '{layer}', channel {channel}")


@dataclass
class OpGraph:
    """The graph IR seen as ops and the activations between them (parameters folded into labels)."""
    nodes: list = field(default_factory=list)   # ids: the inputs, then the ops in order
    label: dict = field(default_factory=dict)   # id → lines of text
    kind: dict = field(default_factory=dict)    # id → "input" or the op's kind (conv2d, add, cat, ...)
    edges: list = field(default_factory=list)   # (producer id, consumer id, shape): every data input


def fmt(shape) -> str:
    return "×".join("N" if not isinstance(s, int) else str(s) for s in shape)


def op_graph(graph) -> OpGraph:
    """Read the graph IR's networkx graph (tensor and op nodes): each op with every data input it
    takes, in order (a join lists all of its inputs), its output shape without the batch axis,
    and its parameter count."""
    g, out = graph.nx, OpGraph()
    for t in graph.inputs:
        out.nodes.append(t)
        out.label[t] = [t, fmt(g.nodes[t]["shape"])]
        out.kind[t] = "input"
    producer = {}
    for name in (n for n in g.nodes if g.nodes[n]["kind"] == "op"):
        op = g.nodes[name]["op"]
        ins = sorted((d["position"], t) for t, _, d in g.in_edges(name, data=True) if d["position"] != "param")
        params = sum(int(np.prod(g.nodes[t]["shape"])) for t, _, d in g.in_edges(name, data=True)
                     if d["position"] == "param" and g.nodes[t]["role"] == "param")
        outputs = list(g.successors(name))
        shape = g.nodes[outputs[0]]["shape"][1:] if outputs else ()
        out.nodes.append(name)
        out.kind[name] = op.kind
        out.label[name] = [name, f"{op.type} {fmt(shape)}" + (f", {params:,} params" if params else "")]
        for _, t in ins:
            out.edges.append((producer.get(t, t), name, fmt(g.nodes[t]["shape"][1:])))
        for t in outputs:
            producer[t] = name
    return out


COLOURS = {"input": "#f2f2f2", "conv2d": "#cfe0f7", "linear": "#cfe0f7", "batchnorm2d": "#d9f0d3",
           "maxpool2d": "#fde3c8", "avgpool2d": "#fde3c8", "adaptive_avgpool2d": "#fde3c8",
           "adaptive_maxpool2d": "#fde3c8", "add": "#fff2a8", "cat": "#fff2a8"}


def colour(kind: str) -> str:
    return "#f6cfcf" if "loss" in kind or kind in ("cross_entropy", "mse", "weighted_sum", "nll") else \
        COLOURS.get(kind, "#ececf6")


def graph_dot(model) -> str:
    """The graph IR in DOT: ops as boxes (name, type, output shape, parameters), the inputs as
    ellipses, one edge per data input of each op (so joins show all of theirs)."""
    og = op_graph(model.tracer.graph)
    lines = ["digraph cnncompile {", "  rankdir=TB; nodesep=0.25; ranksep=0.3;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555", arrowsize=0.6];']
    for n in og.nodes:
        label = "\\n".join(dot_escape(line) for line in og.label[n])
        shape = ", shape=ellipse" if og.kind[n] == "input" else ""
        lines.append(f'  "{dot_escape(n)}" [label="{label}", fillcolor="{colour(og.kind[n])}"{shape}];')
    for src, dst, _ in og.edges:
        lines.append(f'  "{dot_escape(src)}" -> "{dot_escape(dst)}";')
    lines.append("}")
    return "\n".join(lines)


def dot_escape(text) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


def dot_program() -> str | None:
    """Graphviz's ``dot`` where installed (None: draw with matplotlib instead)."""
    return shutil.which("dot")


def save_graph(model, path) -> str:
    """The graph IR as a PNG: Graphviz's layered layout where ``dot`` is installed (and succeeds),
    else `layered_layout` drawn with matplotlib. Returns which one drew it ("dot" or "matplotlib")."""
    dot = dot_program()
    if dot is not None:
        try:
            subprocess.run([dot, "-Tpng", "-Gdpi=96", "-o", str(path)], input=graph_dot(model), text=True,
                           check=True, capture_output=True, timeout=120)
            return "dot"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # a dot that fails on this graph: our own drawing instead
    draw_layered(op_graph(model.tracer.graph), path)
    return "matplotlib"


def ranks(og: OpGraph) -> dict:
    """Layer of each node: one below its lowest producer; an input sits just above its first
    consumer (so the loss's target is drawn beside the loss, not at the top)."""
    preds = {n: [s for s, d, _ in og.edges if d == n] for n in og.nodes}
    rank = {}
    for n in og.nodes:
        if og.kind[n] != "input":
            rank[n] = 1 + max((rank.get(p, 0) for p in preds[n]), default=0)
    for n in og.nodes:
        if og.kind[n] == "input":
            rank[n] = min((rank[d] for s, d, _ in og.edges if s == n), default=1) - 1
    return rank


def layered_layout(og: OpGraph, sweeps: int = 4) -> dict:
    """(column, rank) of every node: ranks from `ranks`, and within a rank an order that follows
    the producers' (barycentre sweeps), centred on column 0."""
    rank = ranks(og)
    layers: dict[int, list] = {}
    for n in og.nodes:
        layers.setdefault(rank[n], []).append(n)
    column = {}
    for r in sorted(layers):
        column.update({n: k - (len(layers[r]) - 1) / 2 for k, n in enumerate(layers[r])})
    preds = {n: [s for s, d, _ in og.edges if d == n] for n in og.nodes}
    for _ in range(sweeps):
        for r in sorted(layers):
            def centre(n):
                return np.mean([column[p] for p in preds[n]]) if preds[n] else column[n]
            layers[r].sort(key=centre)
            column.update({n: k - (len(layers[r]) - 1) / 2 for k, n in enumerate(layers[r])})
    return {n: (column[n], rank[n]) for n in og.nodes}


def side_lanes(og: OpGraph, pos: dict) -> dict:
    """For each edge that skips ranks: (the rightmost column on the ranks it spans, lane number k);
    it runs down k lanes right of that column's boxes, edges whose spans overlap on lanes of their
    own (shorter edges nearer the boxes)."""
    right = {}
    for n, (c, r) in pos.items():
        right[r] = max(right.get(r, -np.inf), c)
    long_edges = sorted({(s, d) for s, d, _ in og.edges if pos[d][1] - pos[s][1] > 1},
                        key=lambda e: pos[e[1]][1] - pos[e[0]][1])
    placed, lanes = [], {}
    for s, d in long_edges:
        lo, hi = pos[s][1], pos[d][1]
        taken = {k for (a, b, k) in placed if a <= hi and lo <= b}  # touching too: one node, two lines
        k = next(k for k in range(len(placed) + 1) if k not in taken)
        placed.append((lo, hi, k))
        lanes[(s, d)] = (max(right[r] for r in range(lo, hi + 1) if r in right), k)
    return lanes


MAX_PIXELS = 60000  # below Agg's limit of 2^16 pixels a side


def draw_layered(og: OpGraph, path, dpi: int = 100) -> None:
    """Boxes on their ranks, an arrow per data input: to the next rank directly, further down
    along a lane right of every box it passes, so that a skip connection is never hidden."""
    plt = _pyplot()
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path
    pos = layered_layout(og)
    longest = max(len(line) for lines in og.label.values() for line in lines)
    box_w, box_h, row_sep = max(1.3, 0.068 * longest), 0.38, 0.62
    col_sep, gap, step = box_w + 0.45, 0.22, 0.16
    lanes = side_lanes(og, pos)
    lane_x = {e: c * col_sep + box_w / 2 + gap + k * step for e, (c, k) in lanes.items()}
    columns = [c for c, _ in pos.values()]
    depth = max(r for _, r in pos.values())
    left = min(columns) * col_sep - box_w / 2 - 0.2
    right = max([max(columns) * col_sep + box_w / 2] + list(lane_x.values())) + 0.2
    height = depth * row_sep + box_h + 0.4
    dpi = min(dpi, int(MAX_PIXELS / height))  # a very deep network: smaller, but drawn
    fig = plt.figure(figsize=(right - left, height), dpi=dpi)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(left, right)
    ax.set_ylim(-depth * row_sep - box_h / 2 - 0.2, box_h / 2 + 0.2)
    ax.set_axis_off()
    xy = {n: (c * col_sep, -r * row_sep) for n, (c, r) in pos.items()}
    for n, (x, y) in xy.items():
        rounding = 0.12 if og.kind[n] == "input" else 0.05
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle=f"round,pad=0.02,rounding_size={rounding}", facecolor=colour(og.kind[n]),
                                    edgecolor="#444444", linewidth=0.7, zorder=2))
        ax.text(x, y + 0.075, og.label[n][0], ha="center", va="center", fontsize=7.5, weight="bold", zorder=3)
        ax.text(x, y - 0.085, og.label[n][1], ha="center", va="center", fontsize=7, zorder=3)
    arrow = dict(arrowstyle="-|>", mutation_scale=10, color="#555555", linewidth=0.8, shrinkA=0, shrinkB=1, zorder=1)
    for src, dst, _ in og.edges:
        (x0, y0), (x1, y1) = xy[src], xy[dst]
        if (src, dst) in lane_x:
            lane = lane_x[(src, dst)]
            route = Path([(x0 + box_w / 2, y0), (lane, y0), (lane, y1), (x1 + box_w / 2 + 0.02, y1)])
            ax.add_patch(FancyArrowPatch(path=route, **arrow))
        else:
            ax.add_patch(FancyArrowPatch((x0, y0 - box_h / 2), (x1, y1 + box_h / 2), **arrow))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
