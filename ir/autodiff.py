"""Reverse mode over stages: every backward formula derived, none written by hand.

For a stage ``out[g(I)] = combine_R body`` and each read ``T[f(I, R)]`` in ``body``:

1. local derivative: replace the read by a symbol and let sympy differentiate the scalar body;
   for ``max``, multiply by the indicator that the reduction variables sit at the recorded
   winner (the lecture's P);
2. transposition: the contribution ``dT[f(I,R)] += dOut[g(I)]·local`` is a scatter; solving
   ``u = f(I, R)`` for variables with coefficient ±1 (or through a lattice when there is none)
   turns it into a gather over ``u`` whose eliminated variables' ranges become constraints;
3. accumulation: contributions of several reads of one tensor add into one gradient.

Networks repeat formulas under other names (ResNet's blocks), so each step is done once per
canonical form (`ir.canonical`): a transposition per stage and read up to tensor names, its body
up to names and sizes, a local derivative per body with its reads as placeholders. The result is
the one a derivation of its own gives, argument for argument. ``CNNCOMPILE_DERIVE_MEMO=0`` (`MEMO`)
turns every such reuse off: each op is lowered afresh (`ir.ops.base.lower_op`), each read derived
afresh and each stage printed afresh (`cnncompile.explain`); the tests compare the two ways.
"""
from __future__ import annotations

import os
from fractions import Fraction
from math import gcd

import sympy

from .affine import Affine, Box, Divides, extended_gcd
from .errors import CompileError
from .canonical import fingerprint, index_fingerprint, out_read as indexed_out, read_text, relabel, tensor_names
from .expr import Program, Stage, TensorSpec, grad_name, read, tensor_of, var  # noqa: F401 (grad_name re-exported)

FRESH = ("u", "v", "w", "p", "q", "r", "s")


def requires_grad(stages: list[Stage], sources: set[str]) -> set[str]:
    need = set(sources)
    for s in stages:
        if s.differentiable and not need.isdisjoint(tensor_names(s.body)):
            need.add(s.out)
    return need


def derive(prog: Program, wrt: list[str], mode: str = "train", read_rule=None) -> list[Stage]:
    """The backward stages of ``prog.forward + prog.loss`` (as run in ``mode``) for the gradients
    of ``wrt``; each carries the mode it was derived for. ``read_rule`` (default `derive_read`):
    what a read's transposition gives (`explain` of one layer transposes only that layer's)."""
    read_rule = read_rule or derive_read
    stages = [s for s in prog.forward + prog.loss if s.mode in ("any", mode)]
    need = requires_grad(stages, set(wrt))
    seed = Stage(out=grad_name(prog.loss_name), out_index=(Affine.constant(0),), domain=(),
                 body=sympy.Integer(1), role="backward", note="seed: ∂L/∂L = 1", layer="loss")
    seed = seed.with_(mode=mode) if prog.has_modes else seed
    out, have = [seed], {prog.loss_name}
    for t in sorted(need | {prog.loss_name}):
        prog.add_tensor(TensorSpec(grad_name(t), prog.tensors[t].shape, "grad"))
    for stage in reversed(stages):
        if stage.out not in have or not stage.differentiable:
            continue
        for r in reads_of(stage.body):
            tensor = tensor_of(r)
            if tensor not in need:
                continue
            for g in read_rule(stage, r, tensor in have, prog.tensors[tensor].shape):
                out.append(g.with_(mode=mode) if prog.has_modes else g)
                have.add(tensor)
    return out


MEMO = os.environ.get("CNNCOMPILE_DERIVE_MEMO", "1") != "0"  # off: every op lowered, read derived, stage printed afresh
MEMO_LIMIT = 20000  # entries per table before it is emptied (a long session of many networks)
_transposed: dict = {}  # canonical (stage, read) → (its names in order, the stages derived for it)
_bodies: dict = {}  # the same without sizes → (its names in order, the gradient's body or None for none)
_derivatives: dict = {}  # a body with its reads as placeholders, the read → (placeholders, ∂body/∂read)


def derive_read(stage: Stage, r: sympy.Indexed, accumulate: bool, shape: tuple) -> list[Stage]:
    """`transpose`, done once per canonical form: a stage that differs from one already derived
    only in its tensors' names (with their order kept) gets that one's stages with the names
    replaced, as a derivation of its own would give them; one that differs in sizes too gets
    that one's gradient body (sizes enter only the ranges, which are solved again)."""
    if not MEMO:
        return transpose(stage, r, accumulate, shape)
    again = (id(stage), r, accumulate, shape)  # (the stage is kept in the entry: its id stays its own)
    hit = _again.get(again)
    if hit is not None and hit[0] is stage:
        return list(hit[1])
    stages = derive_canonical(stage, r, accumulate, shape)
    remember(_again, again, (stage, stages))
    return list(stages)


_again: dict = {}  # (id(stage), read, accumulate, shape) → the stage, its gradient stages: a stage met again


def derive_canonical(stage: Stage, r: sympy.Indexed, accumulate: bool, shape: tuple) -> list[Stage]:
    """`derive_read` of a stage not met before (a mode's derivation meets the stages both modes run
    again, `explain` the stages it shows)."""
    shared, sizes, names = transpose_key(stage, r)
    key = (shared, sizes, accumulate, shape)
    hit = _transposed.get(key)
    if hit is not None:
        template, stages = hit
        return [relabel_stage(s, renaming(template, names)).with_(layer=stage.layer, wrt=read_text(r)) for s in stages]
    body = _bodies.get(shared)
    if body is None:
        stages = transpose(stage, r, accumulate, shape)
        remember(_bodies, shared, (names, stages[0].body if stages else None))
    else:
        template, body = body
        stages = [] if body is None else \
            transpose(stage, r, accumulate, shape, relabel(body, renaming(template, names)))
    remember(_transposed, key, (names, stages))
    return stages


def read_index_text(s: Stage) -> str:
    """The index part of a gradient stage's ``wrt`` (the read of ``T`` it transposes writes ``dL/dT``)."""
    return s.wrt[len(s.out) - len(grad_name("")):]


def renaming(template: list[str], names: list[str]) -> dict[str, str]:
    return {old: new for old, new in zip(template, names) if old != new}


def transpose_key(stage: Stage, r) -> tuple[tuple, tuple, list[str]]:
    """The stage and read with tensor names replaced by their ranks among every name the
    derivation can write (the stage's tensors and their gradients): what the gradient's body
    depends on, and the rest (sizes, ranges, notes); and those names in order."""
    tensors = tensor_names(stage.body) | {stage.out} | set(stage.argmax)
    names = sorted(tensors | {grad_name(t) for t in tensors})
    rank = {n: k for k, n in enumerate(names)}

    def token(x):
        return rank[x.base.label.name], tuple(index_fingerprint(i, token) for i in x.indices)

    pattern = tuple((rank[t], rank[grad_name(t)]) for t in sorted(tensors))
    shared = (pattern, fingerprint(stage.body, token), token(r), rank[stage.out], stage.out_index,
              tuple(v for v, _ in stage.domain), tuple(v for v, _ in stage.reduce), stage.combine,
              tuple(rank[a] for a in stage.argmax))
    sizes = (stage.domain, stage.reduce, stage.constraints, stage.guards, stage.accumulate, stage.differentiable,
             stage.role, stage.note, stage.mode, stage.lanes, stage.packed)
    return shared, sizes, names


def remember(table: dict, key, value) -> None:
    if len(table) >= MEMO_LIMIT:
        table.clear()
    table[key] = value


def relabel_stage(s: Stage, names: dict) -> Stage:
    """``s`` with tensors renamed (``names``: old → new)."""
    return s.with_(out=names.get(s.out, s.out), body=relabel(s.body, names),
                   argmax=tuple(names.get(a, a) for a in s.argmax))


def local_derivative(stage: Stage, r: sympy.Indexed):
    reads = reads_of(stage.body)
    d = body_derivative(stage.body, reads, reads.index(r))
    if stage.combine == "max":
        out_read = indexed_out(stage.out, stage.out_index)
        if len(stage.argmax) != len(stage.reduce):  # zip would drop the routing: a sum over the window
            raise CompileError(f"internal: max stage {stage.out} of layer {stage.layer!r} records "
                               f"{len(stage.argmax)} winner tensors for {len(stage.reduce)} window variables; "
                               f"its gradient must route to the recorded argmax (mark it differentiable=False "
                               f"if it is not differentiated)")
        for (v, _), winner in zip(stage.reduce, stage.argmax):
            d = d * sympy.KroneckerDelta(var(v), read(winner, *out_read.indices))
    elif stage.combine is None and stage.body.has(sympy.Function):
        out_read = indexed_out(stage.out, stage.out_index)
        d = d.xreplace({stage.body: out_read})  # f'(z) in terms of f(z): σ(1−σ), 1−tanh², e^z
    return d


_reads: dict = {}  # body → its reads in `Stage.reads` order


def reads_of(body) -> list:
    """`Stage.reads` of a body, sorted once per body (the derivation asks for each read)."""
    found = _reads.get(body)
    if found is None:
        found = sorted(body.atoms(sympy.Indexed), key=sympy.default_sort_key)
        remember(_reads, body, found)
    return found


def body_derivative(body, reads: list, k: int):
    """∂body/∂reads[k], reads taken as real numbers (tensors hold reals). sympy differentiates
    with the reads as placeholders; the placeholder form is shared by every body that differs
    only in what it reads, so it is differentiated once."""
    if not MEMO:
        return placeholder_derivative(body, reads, k)
    position = {x: j for j, x in enumerate(reads)}
    key = (fingerprint(body, position.__getitem__), k)
    hit = _derivatives.get(key)
    if hit is None:
        hit = placeholder_derivative(body, reads, k, keep=True)
        remember(_derivatives, key, hit)
    placeholders, d = hit
    return d.xreplace(dict(zip(placeholders, reads)))


_placeholders: list = []


def placeholders(n: int) -> list:
    """The memoized derivatives' placeholders r0, r1, ...: the same objects every time, so that
    sympy's caches (of sums, products, assumptions) serve every body (fresh ones, made in the same
    order, would sort alike: by name, then by creation)."""
    while len(_placeholders) < n:
        _placeholders.append(sympy.Dummy(f"r{len(_placeholders)}", real=True))
    return _placeholders[:n]


def placeholder_derivative(body, reads: list, k: int, keep: bool = False):
    """The derivative with the reads put back, or (``keep``) the placeholders and the derivative
    in them."""
    reals = placeholders(len(reads)) if keep else [sympy.Dummy(f"r{j}", real=True) for j in range(len(reads))]
    d = sympy.diff(body.xreplace(dict(zip(reads, reals))), reals[k])
    return (tuple(reals), d) if keep else d.xreplace(dict(zip(reals, reads)))


def transpose(stage: Stage, r: sympy.Indexed, accumulate: bool, shape: tuple, body=None) -> list[Stage]:
    """Turn ``dT[f(I,R)] += dOut[g(I)]·local`` into a gather stage over ``dT``'s index. ``body``:
    the gather's body where it is known already (`derive_read`), else derived here."""
    if body is None:
        local = local_derivative(stage, r)
        if local == 0:
            return []
        d_out = indexed_out(grad_name(stage.out), stage.out_index)
        contribution = d_out * local
    extents = dict(stage.domain) | dict(stage.reduce)
    index = stage.read_index(r)
    taken = set(extents)
    outer: list[str] = []  # the gradient's own index variables
    subst: dict[str, Affine] = {}  # eliminated forward variable → its solution
    guards: list[Divides] = list(stage.guards)
    constraints: list[Box] = list(stage.constraints)
    lattice: list[str] = []
    fresh = (n for n in FRESH + tuple(f"u{k}" for k in range(20)) if n not in taken)

    def eliminate(v: str, solution: Affine) -> None:
        for k in subst:
            subst[k] = subst[k].subs({v: solution})
        subst[v] = solution

    for f in index:
        e = f.subs(subst)
        free = [v for v in e.vars if v in extents and v not in subst and v not in outer]
        if len(e.vars) == 1 and e.const == 0 and e.coeff(e.vars[0]) == 1 and free == list(e.vars):
            outer.append(free[0])  # a plain variable: the gradient keeps its name
            if extents[free[0]] != shape[len(outer) - 1]:  # the forward reads only part of T
                constraints.append(Box(e, 0, extents[free[0]] - 1))
            continue
        u = next(fresh)
        outer.append(u)
        eq = e - Affine.var(u)  # eq = 0
        eq = eq.scale(eq.denominator_lcm())
        if not free:
            constraints.append(Box(eq, 0, 0))
            continue
        g = 0
        for v in free:
            g = gcd(g, int(eq.coeff(v)))
        rest = eq - Affine.make({v: eq.coeff(v) for v in free})
        if g > 1:
            guards.append(Divides(rest, g))
            eq, rest = eq.scale(Fraction(1, g)), rest.scale(Fraction(1, g))
        units = [v for v in free if abs(eq.coeff(v)) == 1]
        if units:
            # prefer a reduction variable (the kernel index), then the outermost other one
            reduce_names = [n for n, _ in stage.reduce]
            v = next((n for n in reversed(reduce_names) if n in units), units[0])
            a = eq.coeff(v)
            eliminate(v, (eq - Affine.make({v: a})).scale(-1 / a))
        elif len(free) == 2:
            (v1, v2), (a1, a2) = free, (int(eq.coeff(free[0])), int(eq.coeff(free[1])))
            _, e1, e2 = extended_gcd(a1, a2)
            assert a1 * e1 + a2 * e2 == 1
            t = next(fresh)
            lattice.append(t)
            rhs = rest.scale(-1)  # a1·v1 + a2·v2 = rhs
            eliminate(v1, rhs.scale(e1) + Affine.make({t: a2}))
            eliminate(v2, rhs.scale(e2) + Affine.make({t: -a1}))
        else:
            raise CompileError(f"layer '{stage.layer}': the index {f} of a read cannot be inverted "
                               f"(no variable with a unit coefficient); gradient not derivable")
    for v, solution in subst.items():
        if not isinstance(extents[v], int):
            raise CompileError(f"layer '{stage.layer}': cannot transpose over the batch variable {v}")
        constraints.append(Box(solution, 0, extents[v] - 1))
    constraints = [Box(c.expr.subs(subst), c.lo, c.hi) for c in constraints]
    guards = [Divides(gd.expr.subs(subst), gd.modulus) for gd in guards]
    if body is None:
        symbols = {v: var(v) for v in list(extents) + outer + lattice}
        body = contribution.xreplace({var(v): s.to_sympy(symbols) for v, s in subst.items()})
    remaining = tuple((v, ext) for v, ext in list(stage.domain) + list(stage.reduce)
                      if v not in subst and v not in outer) + tuple((t, None) for t in lattice)
    return [Stage(out=grad_name(tensor_of(r)), out_index=tuple(Affine.var(u) for u in outer),
                  domain=tuple(zip(outer, shape)), reduce=remaining,
                  combine="sum" if remaining else None, constraints=tuple(constraints),
                  guards=tuple(guards), body=body, accumulate=accumulate, layer=stage.layer,
                  role="backward", note=f"through {stage.note}", wrt=read_text(r))]
