"""Dead-store analysis: values a train kernel makes, uses in registers, and never needs stored."""
from __future__ import annotations

from cnncompile.ir.expr import Program, tensor_of

from .schedule import REGISTER_ROWS, Kernel


def unobserved_outputs(plan: list[Kernel], prog: Program) -> dict[int, frozenset]:
    """Per kernel (by id), the values it makes, hands to its own epilogue stages in registers,
    and that nothing else in the phase reads or writes, nor the caller (outputs, loss, state):
    their stores are dead (ResNet-20's batch-norm outputs before the residual add, input
    gradients before ReLU′: up to 2 MiB each, written to memory and never read back). Only where
    every nest keeps its rows in registers and writes them whole (a fresh vector row)."""
    touched: dict[str, set[int]] = {}  # tensor → the kernels that read or write it
    for kernel in plan:
        for s in kernel.stages:
            for t in {tensor_of(r) for r in s.reads()} | {s.out}:
                touched.setdefault(t, set()).add(id(kernel))
    observed = set(prog.outputs) | {prog.loss_name}
    out = {}
    for kernel in plan:
        if not kernel.epilogue or any(t[0].kind not in REGISTER_ROWS or t[0].scatter or len(t) != 1
                                      for t in kernel.templates):
            continue
        fresh = all(t[0].fresh for t in kernel.templates)
        dead = frozenset(s.out for s in kernel.stages if (s is not kernel.main or fresh)
                         and touched[s.out] == {id(kernel)} and s.out not in observed
                         and prog.tensors[s.out].role in ("activation", "grad"))
        if dead:
            out[id(kernel)] = dead
    return out
