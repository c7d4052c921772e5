"""What every op provides: shape inference, its parameters, and its forward stages.

No op carries a backward: gradients come from `ir.autodiff` reading the forward stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..affine import Affine
from ..errors import ShapeError, where
from ..expr import Stage, var

OPS: dict[str, "OpDef"] = {}


@dataclass
class OpNode:
    """One op in the graph IR: the layer it came from and its static arguments."""

    name: str  # state_dict prefix of the layer ("0", "layer1.conv1") or a functional op's name
    kind: str  # key into OPS
    type: str  # the user's layer class name, for messages
    attrs: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # tensor names
    output: str = ""
    params: dict[str, str] = field(default_factory=dict)  # local name ("weight") → tensor name


class OpDef:
    kind = ""
    param_names: tuple[str, ...] = ()

    def infer(self, node: OpNode, shapes: list[tuple]) -> tuple:
        raise NotImplementedError(f"op {self.kind} has no shape rule")

    def param_shapes(self, node: OpNode, shapes: list[tuple]) -> dict[str, tuple]:
        return {}

    def buffer_shapes(self, node: OpNode, shapes: list[tuple]) -> dict[str, tuple]:
        """State that is not trained but saved (batch norm's running statistics)."""
        return {}

    def noise_shapes(self, node: OpNode, shapes: list[tuple]) -> dict[str, tuple]:
        """Per-batch random inputs the runtime draws in training (dropout's mask)."""
        return {}

    def lower(self, node: OpNode, shapes: list[tuple], out_shape: tuple) -> list[Stage]:
        raise NotImplementedError(f"op {self.kind} has no stages")


def register(cls):
    OPS[cls.kind] = cls()
    return cls


def expect_rank(node: OpNode, shape: tuple, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ShapeError(
            f"{where(node)} expects a {rank}-D input ({what}), got shape {fmt_shape(shape)}; "
            f"{'add Flatten() before it' if rank == 2 else 'check the layers before it'}"
        )


def fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def elementwise_domain(shape: tuple, prefix: str = "e") -> tuple[tuple, list]:
    """Loop variables over a whole tensor: for stages that touch each element once."""
    names = [f"{prefix}{k}" for k in range(len(shape))]
    return tuple(zip(names, shape)), [var(n) for n in names]


def identity_index(syms) -> tuple[Affine, ...]:
    return tuple(Affine.var(s.name) for s in syms)


def elementwise_stage(node: OpNode, out: str, shape: tuple, make_body, note: str = "") -> Stage:
    """``out[e] = f(reads at e)`` for every element: activations, sums, products."""
    domain, syms = elementwise_domain(shape)
    return Stage(out=out, out_index=identity_index(syms), domain=domain, body=make_body(syms),
                 layer=node.name, note=note)
