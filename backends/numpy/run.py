"""Execute planned stages with whole-array NumPy: strided views for reads, einsum or
broadcast arithmetic for bodies. No Python loop runs over elements, only over residue classes.
"""
from __future__ import annotations

import numpy as np
import sympy
from numpy.lib.stride_tricks import as_strided

from cnncompile.ir.expr import Stage
from .plan import ClassPlan, ReadView, plan_stage
from .scalar import compile_expr


def strided(array: np.ndarray, index, grid, fill, keep_all: bool):
    """A view of ``array[index(grid)]``, zero- (or ``fill``-) padded where the index leaves it."""
    extents = dict(grid)
    pads = []
    for e, size in zip(index, array.shape):
        lo, hi = e.interval(extents) if all(n > 0 for _, n in grid) else (0, 0)
        pads.append((max(0, -lo), max(0, hi - size + 1)))
    if any(p != (0, 0) for p in pads):
        array = np.pad(array, pads, constant_values=fill if array.dtype.kind == "f" else 0)
    elem = array.itemsize
    steps = [s // elem for s in array.strides]
    offset = sum(int(e.const + pad[0]) * st for e, pad, st in zip(index, pads, steps))
    shape, strides = [], []
    for v, n in grid:
        used = any(e.coeff(v) for e in index)  # as grid_of: a step may cancel over size-1 axes
        if used or keep_all:
            shape.append(n if used else 1)
            strides.append(sum(int(e.coeff(v)) * st for e, st in zip(index, steps)) * elem)
    flat = array.reshape(-1)
    return as_strided(flat[offset:], shape=tuple(shape), strides=tuple(strides), writeable=False)


def grid_of(view_index, grid):
    return [v for v, _ in grid if any(e.coeff(v) for e in view_index)]


class ClassRunner:
    """Runs one residue class of a stage."""

    def __init__(self, stage: Stage, cp: ClassPlan):
        self.stage, self.cp = stage, cp
        self.grid_syms = {sympy.Symbol(v, integer=True) for v, _ in cp.grid}
        self.lookup_symbol = self._symbol()
        self.einsum_terms = None if cp.masks or stage.combine != "sum" else self._einsum_terms()
        if self.einsum_terms is None:
            self.body = compile_expr(cp.body, self._broadcast_read, self.lookup_symbol)
        self.paths = {}

    def _symbol(self):
        shape = [1] * len(self.cp.grid)

        def lookup(sym):
            names = [v for v, _ in self.cp.grid]
            if sym.name in names:
                k = names.index(sym.name)
                s = list(shape)
                s[k] = self.cp.grid[k][1]
                arr = np.arange(self.cp.grid[k][1]).reshape(s)
                return lambda env: arr
            return lambda env: env.scalars[sym.name]

        return lookup

    def _broadcast_read(self, r):
        v: ReadView = self.cp.reads[r]
        return lambda env: strided(env[v.tensor], v.index, self.cp.grid, v.fill, keep_all=True)

    def _einsum_terms(self):
        terms = []
        for term in sympy.Add.make_args(self.cp.body):
            factors = sympy.Mul.make_args(term)
            reads = [f for f in factors if isinstance(f, sympy.Indexed)]
            const = sympy.Mul(*[f for f in factors if not isinstance(f, sympy.Indexed)])
            if not reads or const.atoms(sympy.Indexed) or const.free_symbols & self.grid_syms:
                return None
            terms.append((reads, compile_expr(const, None, self.lookup_symbol)))
        return terms

    def evaluate(self, env):
        cp = self.cp
        outer = cp.grid[: cp.n_outer]
        if self.einsum_terms is not None:
            total = None
            for k, (reads, const) in enumerate(self.einsum_terms):
                value = self._einsum(k, reads, env) * const(env)
                total = value if total is None else total + value
            return total, None
        value = self.body(env)
        value = np.broadcast_to(value, tuple(n for _, n in cp.grid))
        for m in cp.masks:
            inside = self._affine(m.expr)
            value = np.where((inside >= m.lo) & (inside <= m.hi), value, -np.inf if self.stage.combine == "max" else 0)
        axes = tuple(range(cp.n_outer, len(cp.grid)))
        if self.stage.combine == "sum":
            return value.sum(axis=axes), None
        if self.stage.combine == "max":
            flat = value.reshape(value.shape[: cp.n_outer] + (-1,))
            winner = flat.argmax(axis=-1)
            best = np.take_along_axis(flat, winner[..., None], axis=-1)[..., 0]
            ts = np.unravel_index(winner, tuple(n for _, n in cp.grid[cp.n_outer:]))
            return best, self._winners(ts, outer)
        return value, None

    def _winners(self, ts, outer):
        """The reduction variables' values at the maximum: what max's gradient routes to."""
        t_names = [v for v, _ in self.cp.grid[self.cp.n_outer:]]
        qs = np.meshgrid(*(np.arange(n) for _, n in outer), indexing="ij") if outer else []
        env = dict(zip(t_names, ts)) | {v: q for (v, _), q in zip(outer, qs)}
        return [sum((int(c) * env[v] for v, c in a.coeffs), start=np.zeros_like(ts[0])) + int(a.const)
                for a in self.cp.argmax_of]

    def _affine(self, expr):
        shape = [1] * len(self.cp.grid)
        total = np.full(shape, int(expr.const))
        for k, (v, n) in enumerate(self.cp.grid):
            c = int(expr.coeff(v))
            if c:
                s = list(shape)
                s[k] = n
                total = total + c * np.arange(n).reshape(s)
        return total

    def _einsum(self, k, reads, env):
        cp = self.cp
        letters = {v: chr(97 + i) for i, (v, _) in enumerate(cp.grid)}
        ops, subs = [], []
        for r in reads:
            v = cp.reads[r]
            ops.append(strided(env[v.tensor], v.index, cp.grid, v.fill, keep_all=False))
            subs.append("".join(letters[g] for g in grid_of(v.index, cp.grid)))
        outer = [v for v, _ in cp.grid[: cp.n_outer]]
        present = [v for v in outer if any(letters[v] in s for s in subs)]
        spec = ",".join(subs) + "->" + "".join(letters[v] for v in present)
        if k not in self.paths:
            self.paths[k] = np.einsum_path(spec, *ops, optimize="greedy")[0]
        result = np.einsum(spec, *ops, optimize=self.paths[k])
        shape = [n if v in present else 1 for v, n in cp.grid[: cp.n_outer]]
        return result.reshape(shape)


class StageRunner:
    """A stage planned for one batch size: its residue classes, run in turn."""

    def __init__(self, stage: Stage, sizes: dict, shapes: dict):
        self.stage = stage
        self.classes = [(cp, None if cp.empty else ClassRunner(stage, cp))
                        for cp in plan_stage(stage, sizes, shapes)]

    def __call__(self, env):
        st = self.stage
        out = env[st.out]
        for cp, runner in self.classes:
            target = out_view(out, cp)
            if runner is None:
                if not st.accumulate:
                    target[...] = 0
                continue
            value, winners = runner.evaluate(env)
            if st.accumulate:
                target += value
            else:
                target[...] = value
            for name, w in zip(st.argmax, winners or ()):
                out_view(env[name], cp)[...] = w


def out_view(array: np.ndarray, cp: ClassPlan):
    outer = cp.grid[: cp.n_outer]
    elem = array.itemsize
    steps = [s // elem for s in array.strides]
    offset = sum(int(e.const) * st for e, st in zip(cp.out_index, steps))
    strides = [sum(int(e.coeff(v)) * st for e, st in zip(cp.out_index, steps)) * elem for v, _ in outer]
    return as_strided(array.reshape(-1)[offset:], shape=tuple(n for _, n in outer), strides=tuple(strides),
                      writeable=True)
