"""``model.summary()``: per layer its output shape, parameters, MACs and receptive field.

The receptive field follows the usual recurrence along the vertical axis: with an effective
kernel ``k' = d·(k−1)+1``, ``jump ← jump·s``, ``size ← size + (k'−1)·jump_in`` and
``start ← start + ((k'−1)/2 − p)·jump_in`` (the centre of the first window, in input pixels).
"""
from __future__ import annotations

from dataclasses import dataclass

from cnncompile.ir.ops import OPS


@dataclass(frozen=True)
class Field:
    size: int = 1
    jump: int = 1
    start: float = 0.5

    def through(self, k: int, s: int, p: int, d: int = 1) -> "Field":
        span = d * (k - 1) + 1
        return Field(self.size + (span - 1) * self.jump, self.jump * s,
                     self.start + ((span - 1) / 2 - p) * self.jump)


def window(node):
    """(k, s, p, d) of a windowed op along the vertical axis, or None for pointwise ops."""
    op = OPS[node.kind]
    if node.kind == "conv2d":
        k, s, p, d = op.geometry(node)
        return k[0], s[0], p[0], d[0]
    if node.kind in ("maxpool2d", "avgpool2d", "adaptive_avgpool2d"):
        k, s, p = op.geometry(node)
        return k[0], s[0], p[0], 1
    return None


def receptive_fields(graph) -> dict[str, Field]:
    fields = {t: Field() for t in graph.inputs}
    for node in graph.ops:
        ins = [fields.get(t, Field()) for t in node.inputs]
        widest = max(ins, key=lambda f: (f.size, f.jump))
        geo = window(node)
        fields[node.output] = widest.through(*geo) if geo else widest
    return fields


def macs(node, graph) -> int:
    out = graph.shape(node.output)
    per_batch = 1
    for s in out[1:]:
        per_batch *= s
    if node.kind == "conv2d":
        w = graph.shape(node.params["weight"])
        return per_batch * w[1] * w[2] * w[3]
    if node.kind == "linear":
        return per_batch * node.attrs["in_features"]
    return 0


def summary(model) -> str:
    graph = model.tracer.graph
    fields = receptive_fields(graph)
    rows = [("layer", "type", "output shape", "params", "MACs", "RF size", "jump", "start")]
    total_params = total_macs = 0
    for node in graph.ops:
        params = sum(_count(graph.shape(t)) for t in set(node.params.values()) if graph.tensors[t].role == "param")
        m = macs(node, graph)
        total_params, total_macs = total_params + params, total_macs + m
        f = fields[node.output]
        shape = "(" + ", ".join("N" if not isinstance(s, int) else str(s) for s in graph.shape(node.output)) + ")"
        rows.append((node.name, node.type, shape, f"{params:,}", f"{m:,}", str(f.size), str(f.jump), f"{f.start:g}"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"total: {total_params:,} parameters, {total_macs:,} MACs per example (forward)")
    return "\n".join(lines)


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
