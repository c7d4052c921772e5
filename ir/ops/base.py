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


# ----- the lowering memo ---------------------------------------------------------------------------------
# A network repeats layers (ResNet's twenty batch norms, its 3×3 convolutions): `lower_op` builds the
# stages of each distinct (kind, attrs, shapes) once and gives a repeat that one's stages with the tensor
# names replaced, as `ir.canonical.relabel` does for the derivation. A renaming that keeps the names'
# sorted order gives, argument for argument, what lowering the repeat itself gives; any other (or an op
# whose notes or symbols mention its names) is lowered afresh. ``CNNCOMPILE_DERIVE_MEMO=0`` lowers every
# op afresh (`ir.autodiff.MEMO`).

_lowered: dict = {}  # lowering_key → LoweredTemplate, or None where the op's stages cannot be renamed


class Unfrozen(Exception):
    """An attribute with no exact hashable form: the op is lowered afresh."""


def frozen(v):
    """``v`` as a hashable value that tells apart what prints differently (1 and 1.0, 0.0 and -0.0)."""
    if v is None or isinstance(v, (bool, int, str)):
        return type(v), v
    if isinstance(v, float):
        return float, repr(v)
    if isinstance(v, (tuple, list)):
        return type(v), tuple(frozen(x) for x in v)
    if isinstance(v, dict):
        return dict, tuple((frozen(k), frozen(x)) for k, x in v.items())
    if type(v).__module__ == "numpy" and hasattr(v, "tobytes"):
        return "numpy", v.dtype.str, v.shape, v.tobytes()
    raise Unfrozen(type(v).__name__)


def slot_names(node: OpNode) -> list[str]:
    """The tensors an op is given: its inputs, parameters (by local name) and output, in a fixed order."""
    return list(node.inputs) + [node.params[k] for k in sorted(node.params)] + [node.output]


def lowering_key(node: OpNode, shapes: list[tuple], out_shape: tuple):
    """What an op's stages depend on but its tensor names: None where an attribute has no exact key."""
    try:
        attrs = frozen(node.attrs)
    except Unfrozen:
        return None
    slots = slot_names(node)
    repeats = tuple(slots.index(n) for n in slots)  # add(x, x): which slots name the same tensor
    return (node.kind, node.type, attrs, len(node.inputs), tuple(sorted(node.params)), repeats,
            tuple(tuple(s) for s in shapes), tuple(out_shape))


class LoweredTemplate:
    """An op's stages with each tensor written as (slot, suffix): ``Z.out.mean`` is the output's + ``.mean``."""

    def __init__(self, names: list[str], parts: list[tuple[int, str]], stages: list[Stage]):
        self.names, self.parts, self.stages = names, parts, stages

    def renamed(self, node: OpNode) -> list[Stage] | None:
        """The stages for ``node``, or None where its names sort otherwise than the template's."""
        from ..autodiff import relabel_stage

        slots = slot_names(node)
        new = [slots[k] + suffix for k, suffix in self.parts]
        if any(a >= b for a, b in zip(new, new[1:])):  # (self.names is sorted: the order must be kept)
            return None
        names = {old: n for old, n in zip(self.names, new) if old != n}
        return [relabel_stage(s, names).with_(layer=node.name) for s in self.stages]


def template(node: OpNode, stages: list[Stage]) -> LoweredTemplate | None:
    """The stages as a template, or None where renaming them could differ from lowering afresh: a
    tensor not named after one of the op's own, or a note or symbol that mentions a name."""
    from ..canonical import tensor_names

    slots = slot_names(node)
    names = set()
    for s in stages:
        names |= tensor_names(s.body) | {s.out, *s.argmax}
    parts = []
    for n in sorted(names):
        owners = [k for k, slot in enumerate(slots) if n == slot or n.startswith(slot + ".")]
        if not owners:
            return None
        k = max(owners, key=lambda j: len(slots[j]))
        parts.append((k, n[len(slots[k]):]))
    mentioned = [node.name.split("#")[0], *slots]
    for s in stages:
        words = [s.note, s.wrt, s.lanes, *(x.name for x in symbols(s.body))]
        if s.layer != node.name or s.packed or any(m in w for m in mentioned for w in words):
            return None
    return LoweredTemplate(sorted(names), parts, stages)


def symbols(e) -> set:
    """The symbols of ``e`` that are not tensor names (loop variables, ``B``, runtime scalars)."""
    import sympy

    return e.atoms(sympy.Symbol) - {b.label for b in e.atoms(sympy.IndexedBase)}


def lower_op(op: OpDef, node: OpNode, shapes: list[tuple], out_shape: tuple) -> list[Stage]:
    """``op.lower``, done once per `lowering_key` (see above)."""
    from .. import autodiff

    key = lowering_key(node, shapes, out_shape) if autodiff.MEMO else None
    if key is None:
        return op.lower(node, shapes, out_shape)
    if key in _lowered:
        hit = _lowered[key]
        stages = hit.renamed(node) if hit is not None else None
        return stages if stages is not None else op.lower(node, shapes, out_shape)
    stages = op.lower(node, shapes, out_shape)
    autodiff.remember(_lowered, key, template(node, stages))
    return stages
