"""Stages: what one step of a layer computes, as an index-sum formula.

A stage is ``out[g(I)] = combine_{R} body`` over a box of outer variables ``I`` and reduction
variables ``R``. Reads in ``body`` are sympy ``Indexed`` objects with affine indices; a read
outside its tensor is a guard (the term is skipped), never a padded copy. Gradient stages
have exactly this form too, plus the constraints and lattice guards that transposition
produced. Backends and `explain()` read the same objects: there is one source of truth.
"""
from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass, field, replace

from .affine import Affine, Box, Divides
from .lazy import sympy


class BatchAxis:
    """The batch axis of a shape, whose size is known only when a batch arrives. Plain Python,
    so that shapes (and a stored program's runtime) need no sympy; inside a formula it is the
    positive integer symbol ``B`` (sympy converts it through ``_sympy_``, and arithmetic on it
    gives that symbol's expressions). One object: shapes compare it with ``is BATCH``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "B"

    def __reduce__(self):
        return "BATCH"  # pickled as a reference to this module's one object

    def _sympy_(self):
        return batch_symbol()

    def __add__(self, other):
        return batch_symbol() + other

    def __radd__(self, other):
        return other + batch_symbol()

    def __sub__(self, other):
        return batch_symbol() - other

    def __rsub__(self, other):
        return other - batch_symbol()

    def __mul__(self, other):
        return batch_symbol() * other

    def __rmul__(self, other):
        return other * batch_symbol()

    def __truediv__(self, other):
        return batch_symbol() / other

    def __rtruediv__(self, other):
        return other / batch_symbol()


BATCH = BatchAxis()


def batch_symbol():
    """``B`` in formulas (sympy caches symbols: every call gives an equal one)."""
    return sympy.Symbol("B", integer=True, positive=True)


def concrete_shape(shape, batch: int) -> tuple:
    """``shape`` with the batch axis replaced by ``batch``."""
    return tuple(batch if d is BATCH else d for d in shape)


def grad_name(tensor: str) -> str:
    """The name of the loss's gradient with respect to ``tensor``."""
    return f"dL/d{tensor}"


def var(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True)


def read(tensor: str, *index) -> sympy.Indexed:
    return sympy.IndexedBase(tensor)[tuple(sympy.sympify(i) for i in index)]


@dataclass(frozen=True)
class TensorSpec:
    """A buffer the program reads or writes. ``shape[0]`` may be the batch axis ``BATCH``."""

    name: str
    shape: tuple
    role: str  # input | label | param | buffer | activation | grad | state | argmax | loss
    dtype: str = "float"  # float | int (labels: int64) | index (window positions: int32)



@dataclass(frozen=True)
class Stage:
    out: str
    out_index: tuple[Affine, ...]
    domain: tuple[tuple[str, object], ...]  # outer variables and their extents
    body: sympy.Expr
    reduce: tuple[tuple[str, object], ...] = ()  # extent None: bounded by constraints only
    combine: str | None = None  # None (elementwise) | "sum" | "max"
    constraints: tuple[Box, ...] = ()
    guards: tuple[Divides, ...] = ()
    accumulate: bool = False  # out += ... instead of out = ...
    argmax: tuple[str, ...] = ()  # one int tensor per reduce variable, recorded by "max"
    differentiable: bool = True  # False: a numerical device (softmax's shift) with no gradient
    layer: str = ""
    role: str = "forward"  # forward | loss | backward | update | stats (running statistics)
    note: str = ""
    wrt: str = ""  # for backward stages: which read was differentiated
    mode: str = "any"  # any | train | eval: batch norm and dropout differ between the two
    lanes: str = ""  # an output variable the LLVM schedule runs as vector lanes (set by `layout`)
    packed: tuple = ()  # packed copies of its reads that the generated code loads from (set by `parity`)

    def with_(self, **kw) -> "Stage":
        return replace(self, **kw)

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.domain) + tuple(v for v, _ in self.reduce)

    def reads(self) -> list[sympy.Indexed]:
        """Distinct reads, in a stable order."""
        return sorted(self.body.atoms(sympy.Indexed), key=sympy.default_sort_key)

    def read_index(self, r: sympy.Indexed) -> tuple[Affine, ...]:
        return tuple(Affine.from_sympy(i) for i in r.indices)


def tensor_of(r: sympy.Indexed) -> str:
    return r.base.label.name


BATCH_LAST = "B-1"  # the last batch index, known only at run time


def extent_minus_one(ext):
    return Affine.constant(ext - 1) if isinstance(ext, int) else BATCH_LAST


def fm_bounds(order: list, grid, constraints, last=extent_minus_one) -> dict | None:
    """The one bounds rule (what the code runs and what `explain` prints): per loop variable,
    lower and upper bounds as ``(numerator, divisor)`` lists (``v ≥ ⌈num/div⌉``, ``v ≤ ⌊num/div⌋``),
    Fourier–Motzkin style: the box (``[0, last(extent)]``; none for an extent of None), and each
    constraint bounding the innermost variable (in ``order``) that it mentions; what it says of
    the others is a guard that bound already implies. None: a constraint on constants only is
    false, so the nest never runs."""
    extents = dict(grid)
    bounds = {v: ([(Affine.constant(0), 1)], [(last(extents[v]), 1)]) if extents[v] is not None else ([], [])
              for v in order}
    position = {v: k for k, v in enumerate(order)}
    for c in constraints:
        present = [v for v in order if c.expr.coeff(v) != 0]
        if not present:
            if not c.lo <= c.expr.const <= c.hi:
                return None
            continue
        v = max(present, key=position.get)
        lo_num, hi_num, div = c.bounds_on(v)
        bounds[v][0].append((lo_num, div))
        bounds[v][1].append((hi_num, div))
    return bounds


def var_bounds(stage: Stage) -> dict[str, tuple[list, list]]:
    """`fm_bounds` of a stage's reduction variables in their order, as `explain` prints them
    (a batch extent's last index as the sympy expression ``B - 1``); constraints on output
    variables alone are guards, not bounds."""
    order = [v for v, _ in stage.reduce]
    constraints = [c for c in stage.constraints if any(c.expr.coeff(v) for v in order)]
    return fm_bounds(order, stage.reduce, constraints,
                     lambda ext: Affine.constant(ext - 1) if isinstance(ext, int) else ext - 1)


STAGE_PARTS = ("forward", "loss", "backward", "update")
STAGES_BLOB = "_stages_pickled"
_stages_lock = threading.Lock()


@dataclass
class Program:
    """Every stage of a compiled network, in execution order, and every buffer they touch."""

    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    forward: list[Stage] = field(default_factory=list)  # network output (predict)
    loss: list[Stage] = field(default_factory=list)
    backward: list[Stage] = field(default_factory=list)
    update: list[Stage] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    grad_inputs: list[str] = field(default_factory=list)  # inputs whose gradient the grads phases hand out
    buffers: list[str] = field(default_factory=list)
    state_names: list[str] = field(default_factory=list)  # params + buffers in state_dict order
    noise: dict[str, float] = field(default_factory=dict)  # dropout masks → probability
    loss_name: str = ""
    scalars: dict[str, float] = field(default_factory=dict)  # runtime symbols: lr, step...
    cuts: list[str] = field(default_factory=list)  # grads also runs in segments, cut after each of these is written

    def __getstate__(self):
        """Pickled with its stages as one nested pickle, unpickled when first read: a stored
        program's runtime (tensors, names, phases) loads without sympy (a warm start)."""
        state = dict(self.__dict__)
        if STAGES_BLOB not in state:
            state[STAGES_BLOB] = pickle.dumps({p: state.pop(p) for p in STAGE_PARTS}, pickle.HIGHEST_PROTOCOL)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __getattr__(self, name):
        """(Only for attributes not set:) the stage lists of a loaded program, on first read."""
        if name in STAGE_PARTS:
            with _stages_lock:
                if name not in self.__dict__ and STAGES_BLOB in self.__dict__:
                    self.__dict__.update(pickle.loads(self.__dict__[STAGES_BLOB]))
                    del self.__dict__[STAGES_BLOB]
                if name in self.__dict__:
                    return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def add_tensor(self, spec: TensorSpec) -> None:
        self.tensors[spec.name] = spec

    def all_stages(self) -> list[Stage]:
        return self.forward + self.loss + self.backward + self.update

    def phase_stages(self, phase: str) -> list[tuple[str, int, Stage]]:
        """The stages a phase runs, in order, as (part, index in part, stage)."""
        if phase.startswith(SEGMENT):
            return self.segments()[int(phase[len(SEGMENT):])]
        parts, mode = PHASES[phase]
        return [(part, k, s) for part in parts for k, s in enumerate(getattr(self, part))
                if s.mode in ("any", mode)]

    def segments(self) -> list[list[tuple[str, int, Stage]]]:
        """The grads phase cut after the last stage writing each of `cuts` (synchronized batch
        norm: the ranks sum a statistic, or its gradient, between two segments)."""
        stages = self.phase_stages("grads")
        ends = {max(i for i, (_, _, s) in enumerate(stages) if s.out == name) for name in self.cuts}
        out, current = [], []
        for i, item in enumerate(stages):
            current.append(item)
            if i in ends:
                out.append(current)
                current = []
        return out + [current]

    def phase_names(self) -> list[str]:
        """Every phase the backends compile: `PHASES`, and the grads phase's segments if cut."""
        return list(PHASES) + ([f"{SEGMENT}{k}" for k in range(len(self.segments()))] if self.cuts else [])

    @property
    def has_modes(self) -> bool:
        return any(s.mode != "any" for s in self.forward)


# phase → (parts it runs, mode of the forward pass). ``train`` is one fused step; ``*_eval``
# give loss and gradients with eval-mode batch norm and dropout (a PyTorch model in eval()).
PHASES = {
    "predict": (("forward",), "eval"),
    "predict_train": (("forward",), "train"),
    "loss": (("forward", "loss"), "train"),
    "loss_eval": (("forward", "loss"), "eval"),
    "grads": (("forward", "loss", "backward"), "train"),
    "grads_eval": (("forward", "loss", "backward"), "eval"),
    "train": (("forward", "loss", "backward", "update"), "train"),
    # the train step's update stages alone, fed the gradients (and batch statistics) that a
    # ``grads`` phase handed out: data-parallel training reduces them between the two
    "update": (("update",), "train"),
}
SEGMENT = "grads_s"  # "grads_s3": the grads phase's fourth segment (`Program.segments`)
