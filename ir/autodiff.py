"""Reverse mode over stages: every backward formula derived, none written by hand.

For a stage ``out[g(I)] = combine_R body`` and each read ``T[f(I, R)]`` in ``body``:

1. local derivative: replace the read by a symbol and let sympy differentiate the scalar body;
   for ``max``, multiply by the indicator that the reduction variables sit at the recorded
   winner (the lecture's P);
2. transposition: the contribution ``dT[f(I,R)] += dOut[g(I)]·local`` is a scatter; solving
   ``u = f(I, R)`` for variables with coefficient ±1 (or through a lattice when there is none)
   turns it into a gather over ``u`` whose eliminated variables' ranges become constraints;
3. accumulation: contributions of several reads of one tensor add into one gradient.
"""
from __future__ import annotations

from fractions import Fraction
from math import gcd

import sympy

from .affine import Affine, Box, Divides, extended_gcd
from .errors import CompileError
from .expr import Program, Stage, TensorSpec, read, tensor_of, var

FRESH = ("u", "v", "w", "p", "q", "r", "s")


def grad_name(tensor: str) -> str:
    return f"dL/d{tensor}"


def requires_grad(stages: list[Stage], sources: set[str]) -> set[str]:
    need = set(sources)
    for s in stages:
        if s.differentiable and any(tensor_of(r) in need for r in s.reads()):
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
        for r in stage.reads():
            tensor = tensor_of(r)
            if tensor not in need:
                continue
            for g in read_rule(stage, r, tensor in have, prog.tensors[tensor].shape):
                out.append(g.with_(mode=mode) if prog.has_modes else g)
                have.add(tensor)
    return out


_memo: dict = {}


def derive_read(stage: Stage, r: sympy.Indexed, accumulate: bool, shape: tuple) -> list[Stage]:
    """Memoized by the stage's shape with tensor names abstracted: one conv geometry derives once."""
    names = sorted({tensor_of(x) for x in stage.body.atoms(sympy.Indexed)} | {stage.out} | set(stage.argmax))
    canon = {n: f"T{k}" for k, n in enumerate(names)}
    back = {v: k for k, v in canon.items()} | {grad_name(v): grad_name(k) for k, v in canon.items()}
    key = (rename_stage(stage, canon).with_(layer=""), rename(r, canon), accumulate, shape)
    if key not in _memo:
        _memo[key] = transpose(*key)
    return [rename_stage(s, back).with_(layer=stage.layer, wrt=str(r)) for s in _memo[key]]


def rename(expr, mapping: dict):
    bases = {b: sympy.IndexedBase(mapping[str(b.label)]) for b in expr.atoms(sympy.IndexedBase)
             if str(b.label) in mapping}
    return expr.xreplace(bases)


def rename_stage(s: Stage, mapping: dict) -> Stage:
    return s.with_(out=mapping.get(s.out, s.out), body=rename(s.body, mapping),
                   argmax=tuple(mapping.get(a, a) for a in s.argmax))


def local_derivative(stage: Stage, r: sympy.Indexed):
    reals = {x: sympy.Dummy(f"r{k}", real=True) for k, x in enumerate(stage.reads())}  # tensors hold reals
    d = sympy.diff(stage.body.xreplace(reals), reals[r]).xreplace({v: k for k, v in reals.items()})
    out_read = read(stage.out, *(e.to_sympy() for e in stage.out_index))
    if stage.combine == "max":
        if len(stage.argmax) != len(stage.reduce):  # zip would drop the routing: a sum over the window
            raise CompileError(f"internal: max stage {stage.out} of layer {stage.layer!r} records "
                               f"{len(stage.argmax)} winner tensors for {len(stage.reduce)} window variables; "
                               f"its gradient must route to the recorded argmax (mark it differentiable=False "
                               f"if it is not differentiated)")
        for (v, _), winner in zip(stage.reduce, stage.argmax):
            d = d * sympy.KroneckerDelta(var(v), read(winner, *out_read.indices))
    elif stage.combine is None and stage.body.has(sympy.Function):
        d = d.xreplace({stage.body: out_read})  # f'(z) in terms of f(z): σ(1−σ), 1−tanh², e^z
    return d


def transpose(stage: Stage, r: sympy.Indexed, accumulate: bool, shape: tuple) -> list[Stage]:
    """Turn ``dT[f(I,R)] += dOut[g(I)]·local`` into a gather stage over ``dT``'s index."""
    local = local_derivative(stage, r)
    if local == 0:
        return []
    d_out = read(grad_name(stage.out), *(e.to_sympy() for e in stage.out_index))
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
    symbols = {v: var(v) for v in list(extents) + outer + lattice}
    body = contribution.xreplace({var(v): s.to_sympy(symbols) for v, s in subst.items()})
    remaining = tuple((v, ext) for v, ext in list(stage.domain) + list(stage.reduce)
                      if v not in subst and v not in outer) + tuple((t, None) for t in lattice)
    return [Stage(out=grad_name(tensor_of(r)), out_index=tuple(Affine.var(u) for u in outer),
                  domain=tuple(zip(outer, shape)), reduce=remaining,
                  combine="sum" if remaining else None, constraints=tuple(constraints),
                  guards=tuple(guards), body=body, accumulate=accumulate, layer=stage.layer,
                  role="backward", note=f"through {stage.note}", wrt=str(r))]
