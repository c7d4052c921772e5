"""Exact affine index expressions: the index algebra of the derivation, kept out of sympy.

An index like ``s·x + d·i − p`` is an `Affine`: integer (or, after dividing out a lattice
gcd, rational) coefficients on loop variables plus a constant. Solving, substituting and
bounding these is all the transposition step needs, and doing it with small exact
arithmetic keeps derivations fast and free of sympy's general solvers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from fractions import Fraction
from math import ceil, floor, gcd

from cnncompile.ir.lazy import sympy


@dataclass(frozen=True)
class Affine:
    """``Σ coeffs[v]·v + const`` over loop-variable names."""

    coeffs: tuple[tuple[str, Fraction], ...] = ()
    const: Fraction = Fraction(0)

    @staticmethod
    def make(coeffs: dict, const=0) -> "Affine":
        items = tuple(sorted((v, Fraction(c)) for v, c in coeffs.items() if c != 0))
        return Affine(items, Fraction(const))

    @staticmethod
    def var(name: str) -> "Affine":
        return Affine.make({name: 1})

    @staticmethod
    def constant(c) -> "Affine":
        return Affine.make({}, c)

    @staticmethod
    def from_sympy(expr) -> "Affine":
        """Read an affine sympy expression; anything else is a compile error upstream."""
        return _affine_of(expr)

    @property
    def cmap(self) -> dict:
        return dict(self.coeffs)

    @property
    def vars(self) -> tuple[str, ...]:
        return tuple(v for v, _ in self.coeffs)

    def coeff(self, name: str) -> Fraction:
        return self.cmap.get(name, Fraction(0))

    def __add__(self, other) -> "Affine":
        other = other if isinstance(other, Affine) else Affine.constant(other)
        m = self.cmap
        for v, c in other.coeffs:
            m[v] = m.get(v, 0) + c
        return Affine.make(m, self.const + other.const)

    def __neg__(self) -> "Affine":
        return self.scale(-1)

    def __sub__(self, other) -> "Affine":
        other = other if isinstance(other, Affine) else Affine.constant(other)
        return self + (-other)

    def scale(self, k) -> "Affine":
        k = Fraction(k)
        return Affine.make({v: c * k for v, c in self.coeffs}, self.const * k)

    def subs(self, mapping: dict) -> "Affine":
        """Replace variables by affine expressions."""
        out = Affine.constant(self.const)
        for v, c in self.coeffs:
            out = out + (mapping[v].scale(c) if v in mapping else Affine.make({v: c}))
        return out

    def is_integral(self) -> bool:
        return self.const.denominator == 1 and all(c.denominator == 1 for _, c in self.coeffs)

    def denominator_lcm(self) -> int:
        d = self.const.denominator
        for _, c in self.coeffs:
            d = d * c.denominator // gcd(d, c.denominator)
        return d

    def interval(self, extents: dict) -> tuple[int, int]:
        """Min and max over the box ``0 ≤ v < extents[v]`` (integral expressions only)."""
        lo = hi = self.const
        for v, c in self.coeffs:
            span = c * (extents[v] - 1)
            lo += min(0, span)
            hi += max(0, span)
        return int(lo), int(hi)

    def to_sympy(self, symbols: dict | None = None):
        symbols = symbols or {}
        expr = sympy.Rational(self.const.numerator, self.const.denominator)
        for v, c in self.coeffs:
            expr += sympy.Rational(c.numerator, c.denominator) * symbols.get(v, sympy.Symbol(v, integer=True))
        return expr

    def __str__(self) -> str:
        return str(self.to_sympy())


@dataclass(frozen=True)
class Box:
    """A constraint ``lo ≤ expr ≤ hi`` (inclusive): the range of a variable that was eliminated."""

    expr: Affine
    lo: int
    hi: int

    def bounds_on(self, v: str) -> tuple[Affine, Affine, int]:
        """The constraint solved for ``v`` (Fourier–Motzkin): ``(lo_num, hi_num, div)`` with
        ``⌈lo_num/div⌉ ≤ v ≤ ⌊hi_num/div⌋``, integer coefficients and ``div > 0``."""
        a = self.expr.coeff(v)
        rest = self.expr - Affine.make({v: a})
        # lo ≤ a·v + rest ≤ hi  ⇒  v between (lo − rest)/a and (hi − rest)/a
        lo_num, hi_num = rest.scale(-1) + self.lo, rest.scale(-1) + self.hi
        scale = lo_num.denominator_lcm() * hi_num.denominator_lcm() * a.denominator
        lo_num, hi_num, div = lo_num.scale(scale), hi_num.scale(scale), int(a * scale)
        if div < 0:
            lo_num, hi_num, div = hi_num.scale(-1), lo_num.scale(-1), -div
        return lo_num, hi_num, div


@dataclass(frozen=True)
class Divides:
    """A guard ``modulus | expr``: the lattice condition of a strided index map."""

    expr: Affine
    modulus: int


def ceil_div(a: Fraction, b: Fraction) -> int:
    return ceil(Fraction(a) / Fraction(b))


def floor_div(a: Fraction, b: Fraction) -> int:
    return floor(Fraction(a) / Fraction(b))


def extended_gcd(a: int, b: int) -> tuple[int, int, int]:
    """(g, x, y) with a·x + b·y = g."""
    if b == 0:
        return (abs(a), (1 if a >= 0 else -1), 0)
    g, x, y = extended_gcd(b, a % b)
    return g, y, x - (a // b) * y


@lru_cache(maxsize=1 << 16)
def _affine_of(expr) -> Affine:
    """`Affine.from_sympy`, memoized: the code generator reads the same few index expressions tens of
    thousands of times, and sympy expressions and `Affine` values are both immutable."""
    expr = sympy.expand(sympy.sympify(expr))
    coeffs, const = {}, Fraction(0)
    for term in sympy.Add.make_args(expr):
        c, rest = term.as_coeff_Mul()
        if rest == 1:
            const += Fraction(int(c.p), int(c.q))
        elif isinstance(rest, sympy.Symbol) and c.is_Rational:
            coeffs[rest.name] = coeffs.get(rest.name, 0) + Fraction(int(c.p), int(c.q))
        else:
            raise ValueError(f"index {expr} is not affine in the loop variables")
    return Affine.make(coeffs, const)
