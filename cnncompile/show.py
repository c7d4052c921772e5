"""Pictures (PNG, headless): first-layer filters, training curves, the input patches that excite
a channel most (cropped to its receptive field: the lecture's "what do the filters learn"),
and the graph IR.

The arrays behind each picture are separate functions (`filter_grid`, `top_patches`), so that
what a picture claims can be tested on numbers.
"""
from __future__ import annotations

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - depends on the installation
        raise ImportError("pictures need matplotlib: pip install 'cnncompile[show]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def first_conv(model):
    node = next((n for n in model.tracer.graph.ops if n.kind == "conv2d"), None)
    if node is None:
        raise ValueError("the network has no Conv2d layer, so it has no filters to show")
    return node


def filter_grid(model, layer: str | None = None) -> np.ndarray:
    """Filters of a convolution (default: the first) tiled into one image, each scaled to [0, 1]
    on its own; RGB when the layer sees 3 channels, else one tile per (filter, input channel)."""
    node = first_conv(model) if layer is None else next(n for n in model.tracer.graph.ops if n.name == layer)
    w = model.state_dict()[f"{node.name}.weight"].astype(np.float64)
    tiles = [w[n].transpose(1, 2, 0) for n in range(len(w))] if w.shape[1] == 3 else \
        [w[n, m][..., None] for n in range(w.shape[0]) for m in range(w.shape[1])]
    tiles = [(t - t.min()) / max(t.max() - t.min(), 1e-12) for t in tiles]
    return tile(tiles, columns=w.shape[1] if w.shape[1] != 3 else int(np.ceil(np.sqrt(len(tiles)))))


def tile(tiles: list, columns: int, gap: int = 1) -> np.ndarray:
    h, w, c = tiles[0].shape
    rows = int(np.ceil(len(tiles) / columns))
    out = np.ones((rows * (h + gap) - gap, columns * (w + gap) - gap, c))
    for k, t in enumerate(tiles):
        r, q = divmod(k, columns)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = t
    return out


def save_image(array: np.ndarray, path, title: str = "") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(2, array.shape[1] / 8), max(2, array.shape[0] / 8)), dpi=100)
    ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", interpolation="nearest",
              vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def save_filters(model, path, layer=None) -> None:
    node = first_conv(model) if layer is None else next(n for n in model.tracer.graph.ops if n.name == layer)
    save_image(filter_grid(model, layer), path, f"filters of layer '{node.name}' ({node.type})")


def save_curves(history: dict, path) -> None:
    """Loss and accuracy per epoch, training and validation, as ``fit`` logged them."""
    plt = _pyplot()
    if not history.get("epoch"):
        raise ValueError("no history to plot: train with fit() first (or load a checkpoint written by fit)")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            if prefix + metric in history:
                ax.plot(history["epoch"], history[prefix + metric], style, marker="o",
                        label=("validation " if prefix else "training ") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def top_patches(model, layer: str, channel: int, images: np.ndarray, top: int = 16):
    """The ``top`` strongest activations of ``channel`` at ``layer`` over ``images`` and the input
    patch each one sees: its receptive field (size, jump, start from `summary`), zero-padded at
    the border. Returns a list of (activation, image index, row, column, patch)."""
    from .summary import receptive_fields
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


def graph_dot(model) -> str:
    """The graph IR in DOT: ops as boxes (name, type), tensors as edges labelled with shapes."""
    graph = model.tracer.graph
    lines = ["digraph cnncompile {", "  rankdir=TB;", '  node [shape=box, fontname="Helvetica"];']
    for t in graph.inputs:
        lines.append(f'  "{t}" [shape=ellipse, label="{t}\\n{fmt(graph.shape(t))}"];')
    producer = {n.output: n.name for n in graph.ops}
    for n in graph.ops:
        params = sum(int(np.prod(graph.shape(p))) for p in set(n.params.values())
                     if graph.tensors[p].role == "param")
        lines.append(f'  "{n.name}" [label="{n.name}\\n{n.type}' + (f"\\n{params:,} params" if params else "")
                     + '"];')
        for t in n.inputs:
            lines.append(f'  "{producer.get(t, t)}" -> "{n.name}" [label="{fmt(graph.shape(t))}"];')
    lines.append("}")
    return "\n".join(lines)


def fmt(shape) -> str:
    return "×".join("N" if not isinstance(s, int) else str(s) for s in shape)


def save_graph(model, path) -> None:
    """The graph IR as a PNG, drawn with networkx's layered layout (no graphviz needed)."""
    import networkx as nx
    plt = _pyplot()
    graph = model.tracer.graph
    g = nx.DiGraph()
    producer = {n.output: n.name for n in graph.ops}
    for t in graph.inputs:
        g.add_node(t, layer=0)
    depth = {t: 0 for t in graph.inputs}
    for n in graph.ops:
        depth[n.output] = 1 + max(depth.get(t, 0) for t in n.inputs)
        g.add_node(n.name, layer=depth[n.output])
        for t in n.inputs:
            g.add_edge(producer.get(t, t), n.name)
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1)
    pos = {k: (x, -y) for k, (x, y) in pos.items()}  # the input on top
    fig, ax = plt.subplots(figsize=(6, max(4, 0.45 * (max(depth.values()) + 1))), dpi=100)
    types = {n.name: n.type for n in graph.ops}
    nx.draw_networkx(g, pos, ax=ax, node_shape="s", node_color="#dde6f5", node_size=300, font_size=6,
                     labels={k: f"{k}\n{types.get(k, 'input')}" for k in g.nodes}, arrows=True)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
