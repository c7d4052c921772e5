"""Per-kernel overrides of the schedule's rules, for the tuner (`backends/llvm/tuner.py`).

A *choice* is a small dict that changes one of the blockings whose rule is a guess; an empty
dict is the `Target`'s rules. Keys (each ignored where it does not apply or would break a rule):

- ``tile``: the block of output channels beside a ``tiled_row`` (`blocks.output_tile`,
  `blocks.lanes_tile`): a divisor of the channels, within the accumulator budget;
- ``pair``: False keeps a tiled row to one example (no `blocks.batch_pair`);
- ``jam``: the largest unroll-and-jam block of plain loops (`blocks.dot_block`), 0 for none.

None of them reorders a sum: each output still adds its terms in the same order, so a tuned
build's results equal the untuned build's bit for bit (tests/test_tuner.py checks it).

A kernel is known by the structural fingerprint of its main stage (tensors renamed by order of
appearance, with their shapes) and the target: repeated blocks of a network, and the same layer
in another network, share one choice.
"""
from __future__ import annotations

import hashlib

import sympy

from cnncompile.ir.expr import Program, Stage, tensor_of
from cnncompile.ir.loops import lower

from ..target import Target

KEYS = {"tile": int, "pair": bool, "jam": int}
MAX_CANDIDATES = 4  # per kernel, the rules' choice included


def valid(choice) -> bool:
    """Is ``choice`` a dict of known keys with values of the right type and range?"""
    if not isinstance(choice, dict):
        return False
    for k, v in choice.items():
        kind = KEYS.get(k)
        if kind is None or type(v) is not kind or (kind is int and not 0 <= v <= 64):
            return False
    return True


def fingerprint(stage: Stage, prog: Program, target: Target, ftype: str) -> str:
    """A hash of what decides the stage's schedule: its loops, body, constraints and the shapes
    of what it touches, with tensors renamed in order of appearance; and the target."""
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        return names.setdefault(name, f"T{len(names)}")

    def shape(name: str) -> str:
        return repr(prog.tensors[name].shape) if name in prog.tensors else ""

    rename(stage.out)  # (reads in an order of their indices and shapes, not of their names: layer 9 and 10 alike)
    reads = sorted(stage.reads(), key=lambda r: (sympy.srepr(r.indices), shape(tensor_of(r)), tensor_of(r)))
    swap = {r: sympy.Indexed(sympy.IndexedBase(rename(tensor_of(r))), *r.indices) for r in reads}
    body = sympy.srepr(stage.body.xreplace(swap))
    packed = tuple(rename(p) if p in prog.tensors else repr(p) for p in stage.packed)
    shapes = [(short, repr(prog.tensors[long].shape), str(prog.tensors[long].dtype))
              for long, short in names.items() if long in prog.tensors]
    text = repr((ftype, target.key(), repr(stage.out_index), repr(stage.domain), body, repr(stage.reduce),
                 stage.combine, repr(stage.constraints), repr(stage.guards), stage.accumulate, len(stage.argmax),
                 stage.lanes, packed, shapes))
    return hashlib.sha256(text.encode()).hexdigest()


def candidates(stage: Stage, prog: Program, target: Target, lanes: int) -> list[dict]:
    """The choices worth timing for ``stage``: the rules' ({}) first, then up to
    MAX_CANDIDATES - 1 alternatives to the blocks the rules picked in its nests."""
    from .templates import template

    out = [{}]
    for nest in lower(stage, prog):
        for term in nest.terms:
            for alt in alternatives(template(nest, term, prog, target, lanes), lanes, target):
                if alt not in out:
                    out.append(alt)
    return out[:MAX_CANDIDATES]


def alternatives(tpl, lanes: int, target: Target) -> list[dict]:
    """Other blockings for one template: a smaller channel block, no batch pair, a smaller or no
    unroll-and-jam block."""
    if tpl.kind == "tiled_row" and tpl.tile is not None:
        _, size, extent = tpl.tile
        if tpl.pair is not None:
            return [{"pair": False}, {"pair": False, "tile": size}]
        smaller = [d for d in range(2, size) if extent % d == 0]
        return [{"tile": smaller[-1]}] if smaller else []
    if tpl.kind == "scalar" and tpl.block is not None:
        _, size, extent = tpl.block
        smaller = [s for s in target.jam_sizes() if s < size and extent % s == 0]
        return [{"jam": s} for s in smaller[:1]] + [{"jam": 0}]
    return []


def resized(tile: tuple | None, size: int | None, chunks: int, budget: int) -> tuple | None:
    """A channel block (variable, size, extent) with the chosen ``size`` where it divides the
    extent and keeps size × chunks within ``budget`` accumulators; else as it was."""
    if tile is None or size is None:
        return tile
    if size >= 2 and tile[2] % size == 0 and size * chunks <= budget:
        return tile[0], size, tile[2]
    return tile


def jam_sizes(target: Target, choice: dict) -> tuple:
    """The unroll-and-jam blocks to try, largest first, at most the chosen one."""
    cap = choice.get("jam")
    sizes = target.jam_sizes()
    return sizes if cap is None else tuple(s for s in sizes if s <= cap)
