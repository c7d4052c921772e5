"""Even/odd packed copies for stride-2 reads, so that a vector row loads them contiguously.

A stride-2 convolution reads ``X[b, m, 2x + i − 1, 2y + j − 1]``: along its row ``y`` every other
element, which a vector row loads as twice the lanes under a mask and then picks apart (two
masked loads and two shuffles per vector; ResNet-20's downsampling filter gradients ran at a
third of the other kernels' speed, spilling registers). This pass gives such a tensor a copy with
its last axis split by parity, ``X.parity[b, m, h, p, w] = X[b, m, h, 2w + p]`` (one cheap stage,
right after ``X`` is made), and marks each sum that reads ``X`` so (``Stage.packed``); the code
generator then loads element ``2v + c`` from ``X.parity[.., c mod 2, v + ⌊c/2⌋]``: one contiguous
vector. The stages' formulas are unchanged; the NumPy reference runs the program as derived.
"""
from __future__ import annotations

from dataclasses import replace

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, Stage, TensorSpec, read, tensor_of, var


def parity_name(tensor: str) -> str:
    return f"{tensor}.parity"


def pack_parity(prog: Program) -> Program:
    """A copy of the program in which every tensor read at stride 2 along its last axis by a sum
    (and at stride 2 by nothing else) has an even/odd copy, made once in the forward pass."""
    readers = strided_readers(prog)
    packed = {t for t, stages in readers.items() if packable(prog, t, stages)}
    if not packed:
        return prog
    out = replace(prog, tensors=dict(prog.tensors))
    forward = list(prog.forward)
    for t in sorted(packed):
        stage, spec = parity_stage(prog.tensors[t])
        out.add_tensor(spec)
        last = max((k for k, s in enumerate(forward) if s.out == t), default=-1)
        forward.insert(last + 1, stage)
    copies = {parity_name(t) for t in packed}
    out.forward = [s if s.out in copies else mark(s, packed) for s in forward]
    out.backward = [mark(s, packed) for s in prog.backward]
    return out


def mark(stage: Stage, packed: set[str]) -> Stage:
    """The stage, told which of its strided reads have a packed copy."""
    reads = packed & strided_reads(stage)
    return stage.with_(packed=tuple(sorted(parity_name(t) for t in reads))) if reads else stage


def strided_reads(stage: Stage) -> set[str]:
    """The tensors a stage reads with some variable at stride 2 in their last index."""
    found = set()
    for r in stage.body.atoms(sympy.Indexed):
        try:
            last = Affine.from_sympy(r.indices[-1])
        except (TypeError, ValueError, NotImplementedError):
            continue
        if any(c == 2 for _, c in last.coeffs):
            found.add(tensor_of(r))
    return found


def strided_readers(prog: Program) -> dict[str, list[Stage]]:
    readers: dict[str, list[Stage]] = {}
    for stage in prog.forward + prog.backward:
        for t in strided_reads(stage):
            readers.setdefault(t, []).append(stage)
    return readers


def packable(prog: Program, tensor: str, stages: list[Stage]) -> bool:
    """Worth a copy: a float activation or input with an even last axis, made in the forward pass
    (or fed), read at stride 2 only by sums (a max pool keeps its own loads)."""
    spec = prog.tensors[tensor]
    if spec.dtype != "float" or spec.role not in ("activation", "input") or not spec.shape:
        return False
    width = spec.shape[-1]
    if not isinstance(width, int) or width % 2 or width < 4:
        return False
    if any(s.out == tensor for s in prog.backward + prog.loss + prog.update):
        return False
    return all(s.combine == "sum" and not s.argmax for s in stages)


def parity_stage(spec: TensorSpec) -> tuple[Stage, TensorSpec]:
    """``X.parity[.., p, w] = X[.., 2w + p]``."""
    names = [f"p{d}" for d in range(len(spec.shape) - 1)]
    shape = tuple(spec.shape[:-1]) + (2, spec.shape[-1] // 2)
    packed = TensorSpec(parity_name(spec.name), shape, "activation")
    index = tuple(Affine.var(n) for n in names) + (Affine.var("par"), Affine.var("half"))
    stage = Stage(out=packed.name, out_index=index,
                  domain=tuple(zip(names, spec.shape[:-1])) + (("par", 2), ("half", spec.shape[-1] // 2)),
                  body=read(spec.name, *(var(n) for n in names), 2 * var("half") + var("par")),
                  role="forward", note=f"{spec.name}, even and odd columns apart, for stride-2 vector loads")
    return stage, packed
