"""Packed layouts: a transposed copy of a read, so that output channels can run as vector lanes.

A register row vectorizes a stage along its output's last, unit-stride variable. When that row is
short (LeNet-5's second convolution: 10-wide output rows fill 10 of 16 lanes; its filter gradient:
5-wide kernel rows fill 5 of 8), another output variable ``u`` whose extent is a multiple of the
vector width (the 16 output channels) fills every lane instead, if each read that carries ``u``
has it as its last, unit-stride index. This pass gives each such read a packed copy with ``u``'s
axis moved last (``dY[b, n, x, y]`` → ``dY.lanes[b, x, y, n]``: one cheap transposing stage) and
marks the stage (``Stage.lanes``), so that the schedule runs ``u`` as the vector (`templates.lanes_row`;
the output is then written lane by lane). The stages keep their meaning: only where a value is
read from changes. The LLVM backend generates code from the packed copy; the NumPy reference runs the program as derived.
"""
from __future__ import annotations

from dataclasses import replace

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, Stage, TensorSpec, read, tensor_of, var
from cnncompile.ir.loops import lower

from ..target import Target, resolve
from .templates import template

UTILIZATION = 0.75  # a row using less of its vector lanes than this is worth packing for


def pack_lanes(prog: Program, lanes: int, target: Target | str | None = None) -> Program:
    """A copy of the program with every forward and backward stage that gains from channel lanes
    (``lanes`` elements a vector) rewritten for ``target`` (default: the resolved one; the
    derivation's own program, which `explain` shows, is left as derived)."""
    target = resolve(target)
    out = replace(prog, tensors=dict(prog.tensors))
    for part in ("forward", "backward"):
        rewritten = []
        for stage in getattr(prog, part):
            rewritten.extend(lane_plan(stage, out, target, lanes) or [stage])
        setattr(out, part, rewritten)
    return out


def lane_plan(stage: Stage, prog: Program, target: Target, lanes: int) -> list[Stage] | None:
    """The pack stages and the rewritten stage, or None where the row fills its lanes well
    enough, no output variable can be the lanes, or the schedule would not take them."""
    if stage.combine != "sum" or stage.accumulate or stage.argmax or not stage.reduce or stage.guards:
        return None
    current = single_template(stage, prog, target, lanes)
    if current is None or current.kind not in ("row", "tiled_row") or current.scatter:
        return None
    if current.extent / (lanes * -(-current.extent // lanes)) >= UTILIZATION:
        return None
    for u, extent in stage.domain:
        if not isinstance(extent, int) or extent % lanes or not lane_output(stage, u):
            continue
        packs, body = packed_reads(stage, prog, u, extent)
        if body is None:
            continue
        candidate = stage.with_(body=body, lanes=u)
        for p in packs:
            prog.add_tensor(p[1])
        chosen = single_template(candidate, prog, target, lanes)
        if chosen is not None and chosen.scatter:
            return [p[0] for p in packs] + [candidate]
        for p in packs:
            del prog.tensors[p[1].name]
    return None


def single_template(stage: Stage, prog: Program, target: Target, lanes: int):
    """The template of a stage that lowers to one loop nest with one term, else None."""
    nests = lower(stage, prog)
    if len(nests) != 1 or len(nests[0].terms) != 1 or nests[0].empty:
        return None
    return template(nests[0], nests[0].terms[0], prog, target, lanes)


def lane_output(stage: Stage, u: str) -> bool:
    """``u`` indexes one axis of the output, not the last, by itself, unconstrained."""
    at = [k for k, e in enumerate(stage.out_index) if e.coeff(u)]
    return (len(at) == 1 and at[0] != len(stage.out_index) - 1 and stage.out_index[at[0]] == Affine.var(u)
            and not any(c.expr.coeff(u) for c in stage.constraints))


def packed_reads(stage: Stage, prog: Program, u: str, extent: int):
    """Pack stages for the reads that carry ``u`` on an axis other than their last, and the body
    reading the packed copies; (.., None) where some read carries ``u`` otherwise than as a
    whole axis of its own."""
    packs, replace = [], {}
    for r in stage.reads():
        index = [Affine.from_sympy(i) for i in r.indices]
        at = [k for k, e in enumerate(index) if e.coeff(u)]
        if not at:
            continue
        spec = prog.tensors[tensor_of(r)]
        if len(at) != 1 or index[at[0]] != Affine.var(u) or spec.shape[at[0]] != extent or spec.dtype != "float":
            return packs, None
        axis = at[0]
        if axis == len(index) - 1:
            continue
        order = [k for k in range(len(index)) if k != axis] + [axis]
        pack, packed = pack_stage(prog, spec, order, stage, len(packs))
        packs.append((pack, packed))
        replace[r] = read(packed.name, *(r.indices[k] for k in order))
    return packs, stage.body.xreplace(replace)


def pack_stage(prog: Program, spec: TensorSpec, order: list[int], consumer: Stage, k: int):
    """``packed[i_order] = tensor[i]``: the tensor with its axes in ``order``, written contiguously."""
    name = f"{spec.name}.lanes"
    while name in prog.tensors:
        k += 1
        name = f"{spec.name}.lanes{k}"
    names = [f"p{d}" for d in range(len(spec.shape))]
    packed = TensorSpec(name, tuple(spec.shape[d] for d in order), "activation")
    stage = Stage(out=name, out_index=tuple(Affine.var(names[d]) for d in order),
                  domain=tuple((names[d], spec.shape[d]) for d in order),
                  body=read(spec.name, *(var(n) for n in names)), layer=consumer.layer, role=consumer.role,
                  note=f"{spec.name} with axis {order[-1]} last, for vector lanes in {consumer.out}",
                  mode=consumer.mode)
    return stage, packed

