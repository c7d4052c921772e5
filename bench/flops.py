"""Floating-point work of a compiled network, to turn step times into GFLOP/s.

One multiply-add is 2 FLOP. Only convolutions and linear layers count for a whole network (what
`cnncompile.summary.macs` counts); for a single stage, every summed term counts.
"""
from __future__ import annotations

import numpy as np
import sympy

from cnncompile.ir.expr import BATCH
from cnncompile.summary import macs


def train_flops(model) -> int:
    """FLOPs of one training example: 2 FLOP per multiply-add of the convolution and linear layers,
    three times over (forward, input gradient, weight gradient), except that no input gradient is
    computed for a layer that reads the network input. The conventional figure, not the exact work:
    bias, normalisation, activation, pooling, loss and update work is left out, and padded positions
    count as in `summary` though the input gradient skips them (`stage_flops` counts exactly)."""
    graph = model.tracer.graph
    total = 0
    for node in graph.ops:
        passes = 2 if all(t in graph.inputs for t in node.inputs) else 3
        total += passes * macs(node, graph)
    return 2 * total


def stage_flops(stage, batch: int) -> int | None:
    """FLOPs of one call of a summing stage: 2 × the (output element, reduction point) pairs that
    satisfy its constraints and guards, counted exactly. None for other stages, and where a
    reduction extent is left to the constraints alone."""
    if stage.combine != "sum":
        return None
    extents = {}
    for v, ext in stage.domain + stage.reduce:
        if ext is None:
            return None
        extents[v] = int(sympy.sympify(ext).subs(BATCH, batch))
    conditions = list(stage.constraints) + list(stage.guards)
    count = 1
    for group in coupled(extents, conditions):
        count *= points(group, extents, [c for c in conditions if set(c.expr.vars) <= group])
    return 2 * count


def coupled(extents: dict, conditions: list) -> list[set]:
    """The variables in groups that no condition links to one another: a count is their product."""
    groups = [{v} for v in extents]
    for c in conditions:
        linked = [g for g in groups if g & set(c.expr.vars)]
        groups = [g for g in groups if g not in linked] + [set().union(*linked)]
    return groups


def points(group: set, extents: dict, conditions: list) -> int:
    """Points of the box over ``group`` that satisfy ``conditions`` (all of them within the group)."""
    if not conditions:
        return int(np.prod([extents[v] for v in group]))
    names = sorted(group)
    grid = dict(zip(names, np.meshgrid(*(np.arange(extents[v]) for v in names), indexing="ij", sparse=True)))
    keep = np.ones([extents[v] for v in names], dtype=bool)
    for c in conditions:
        keep &= holds(c, grid)
    return int(keep.sum())


def holds(condition, grid: dict) -> np.ndarray:
    """A `Box` (lo ≤ expr ≤ hi) or `Divides` (modulus | expr), in integers scaled by the denominators."""
    scale = condition.expr.denominator_lcm()
    value = sum(int(c * scale) * grid[v] for v, c in condition.expr.coeffs) + int(condition.expr.const * scale)
    if hasattr(condition, "modulus"):
        return value % (condition.modulus * scale) == 0
    return (condition.lo * scale <= value) & (value <= condition.hi * scale)
