"""Turn a stage's scalar body (a sympy expression) into a NumPy closure, once.

Reads and loop variables are looked up by name at call time; everything else is NumPy
arithmetic on whole arrays, so the body runs over every point of a stage at once.
"""
from __future__ import annotations

import numpy as np
import sympy

from cnncompile.ir.functions import function_of, unknown


def compile_expr(expr, lookup_read, lookup_symbol):
    """``lookup_read(indexed)`` and ``lookup_symbol(symbol)`` return closures ``env → value``."""
    if isinstance(expr, sympy.Indexed):
        return lookup_read(expr)
    if isinstance(expr, sympy.Symbol):
        return lookup_symbol(expr)
    if expr.is_number:  # (constants too: π, √2 from a derivative)
        value = float(expr)
        return lambda env: value
    if expr in (sympy.true, sympy.false):
        value = bool(expr)
        return lambda env: value
    if isinstance(expr, sympy.Piecewise):
        pairs = [(compile_expr(e, lookup_read, lookup_symbol), compile_expr(c, lookup_read, lookup_symbol))
                 for e, c in expr.args]
        return lambda env: _piecewise(pairs, env)
    args = [compile_expr(a, lookup_read, lookup_symbol) for a in expr.args]
    head = type(expr)
    if head is sympy.Add:
        return _fold(args, np.add)
    if head is sympy.Mul:
        return _fold(args, np.multiply)
    if head is sympy.Pow:
        base, exponent = args
        if expr.exp == -1:
            return lambda env: 1.0 / base(env)
        if expr.exp == 2:
            return lambda env: np.square(base(env))
        if expr.exp == sympy.Rational(1, 2):
            return lambda env: np.sqrt(base(env))
        return lambda env: np.power(base(env), exponent(env))
    if head is sympy.KroneckerDelta:
        a, b = args
        return lambda env: np.equal(a(env), b(env))
    row = function_of(expr)
    if row is not None:
        f, (a,) = row.numpy, args
        return lambda env: f(a(env))
    if head in BINARY:
        f, (a, b) = BINARY[head], args
        return lambda env: f(a(env), b(env))
    if head in LOGIC:
        return _fold(args, LOGIC[head]) if head is not sympy.Not else (lambda env: np.logical_not(args[0](env)))
    if head in (sympy.Max, sympy.Min):
        return _fold(args, np.maximum if head is sympy.Max else np.minimum)
    raise unknown(expr, "NumPy")


def _fold(args, op):
    first, rest = args[0], args[1:]

    def run(env):
        acc = first(env)
        for a in rest:
            acc = op(acc, a(env))
        return acc

    return run


def _piecewise(pairs, env):
    """The first true condition wins, as in sympy's Piecewise."""
    result = pairs[-1][0](env)
    for value, cond in reversed(pairs[:-1]):
        result = np.where(cond(env), value(env), result)
    return result


LOGIC = {sympy.And: np.logical_and, sympy.Or: np.logical_or, sympy.Not: None}
BINARY = {sympy.StrictGreaterThan: np.greater, sympy.StrictLessThan: np.less,
          sympy.GreaterThan: np.greater_equal, sympy.LessThan: np.less_equal}
