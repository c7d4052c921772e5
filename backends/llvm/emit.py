"""A small textual-LLVM-IR writer: integer index arithmetic, loops, and scalar bodies from sympy.

Float arithmetic carries ``contract reassoc nsz arcp afn`` (never nnan/ninf: NaN propagates);
float constants are written as exact hex doubles.
"""
from __future__ import annotations

import struct

import numpy as np
import sympy

from cnncompile.ir.functions import function_of, unknown

FAST = "contract reassoc nsz arcp afn"


def hex_const(value: float, ftype: str) -> str:
    if ftype == "float":
        value = float(np.float32(value))
    if value != value:
        return "0x7FF8000000000000"
    if value in (float("inf"), float("-inf")):
        return "0x7FF0000000000000" if value > 0 else "0xFFF0000000000000"
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", value))[0]


class FunctionWriter:
    """Lines of one function body, with fresh names and alloca-based loop counters (SROA promotes them)."""

    fast = FAST

    def __init__(self, ftype: str):
        self.ft = ftype
        self.lines: list[str] = []
        self.allocas: list[str] = []
        self.count = 0
        self.declares: set[str] = set()

    def fresh(self, stem: str = "t") -> str:
        self.count += 1
        return f"%{stem}{self.count}"

    def label(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def op(self, text: str, stem: str = "t") -> str:
        name = self.fresh(stem)
        self.lines.append(f"  {name} = {text}")
        return name

    def raw(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def block(self, name: str) -> None:
        self.lines.append(f"{name}:")

    # ----- integers -----------------------------------------------------------------------------
    def iadd(self, a, b):
        """``a + b``, folded where either is a constant 0 or both are constants (index arithmetic
        at literal loop positions, lane by lane, would otherwise fill kernels with it)."""
        x, y = literal(a), literal(b)
        if x is not None and y is not None:
            return str(x + y)
        if x == 0 or y == 0:
            return str(b if x == 0 else a)
        return self.op(f"add nsw i64 {a}, {b}")

    def imul(self, a, b):
        """``a · b``, folded like `iadd` (by 0, by 1, or two constants)."""
        x, y = literal(a), literal(b)
        if x is not None and y is not None:
            return str(x * y)
        if x == 0 or y == 0:
            return "0"
        if x == 1 or y == 1:
            return str(b if x == 1 else a)
        return self.op(f"mul nsw i64 {a}, {b}")

    def smax(self, a, b):
        self.declares.add("declare i64 @llvm.smax.i64(i64, i64)")
        return self.op(f"call i64 @llvm.smax.i64(i64 {a}, i64 {b})")

    def smin(self, a, b):
        self.declares.add("declare i64 @llvm.smin.i64(i64, i64)")
        return self.op(f"call i64 @llvm.smin.i64(i64 {a}, i64 {b})")

    def floordiv(self, n, d: int):
        if d == 1:
            return n
        q = self.op(f"sdiv i64 {n}, {d}")
        r = self.op(f"srem i64 {n}, {d}")
        return self.iadd(q, self.op(f"ashr i64 {r}, 63"))  # −1 exactly when the remainder is negative

    def ceildiv(self, n, d: int):
        if d == 1:
            return n
        return self.op(f"sub nsw i64 0, {self.floordiv(self.op(f'sub nsw i64 0, {n}'), d)}")

    def affine(self, expr, values: dict):
        """An integral `Affine` evaluated from the loop variables' SSA values."""
        total = str(int(expr.const))
        for v, c in expr.coeffs:
            term = values[v] if c == 1 else self.imul(values[v], int(c))
            total = term if total == "0" else self.iadd(total, term)
        return total

    def loop(self, lo: str, hi: str, body) -> None:
        """``for v in [lo, hi]: body(v)`` (inclusive bounds)."""
        slot = f"%slot{self.count + 1}"
        self.count += 1
        self.allocas.append(f"  {slot} = alloca i64")
        head, inner, done = self.label("head"), self.label("body"), self.label("done")
        self.raw(f"store i64 {lo}, ptr {slot}")
        self.raw(f"br label %{head}")
        self.block(head)
        v = self.op(f"load i64, ptr {slot}", "v")
        cond = self.op(f"icmp sle i64 {v}, {hi}")
        self.raw(f"br i1 {cond}, label %{inner}, label %{done}")
        self.block(inner)
        body(v)
        self.raw(f"store i64 {self.op(f'add nsw i64 {v}, 1')}, ptr {slot}")
        self.raw(f"br label %{head}")
        self.block(done)

    def when(self, cond: str, body) -> None:
        yes, done = self.label("then"), self.label("endif")
        self.raw(f"br i1 {cond}, label %{yes}, label %{done}")
        self.block(yes)
        body()
        self.raw(f"br label %{done}")
        self.block(done)

    # ----- floats -------------------------------------------------------------------------------
    def fconst(self, value) -> str:
        return hex_const(float(value), self.ft)

    def fbin(self, opname: str, a, b):
        return self.op(f"{opname} {FAST} {self.ft} {a}, {b}")

    def intrinsic(self, name: str, *args):
        suffix = "f32" if self.ft == "float" else "f64"
        sig = ", ".join([self.ft] * len(args))
        self.declares.add(f"declare {self.ft} @llvm.{name}.{suffix}({sig})")
        call_args = ", ".join(f"{self.ft} {a}" for a in args)
        return self.op(f"call {FAST} {self.ft} @llvm.{name}.{suffix}({call_args})")

    def libm(self, name: str, x):
        """A C math library function with no LLVM intrinsic (erf, log1p): ``name`` for doubles,
        ``name`` + f for floats; the JIT resolves it in the process."""
        symbol = name if self.ft == "double" else f"{name}f"
        self.declares.add(f"declare {self.ft} @{symbol}({self.ft})")
        return self.op(f"call {FAST} {self.ft} @{symbol}({self.ft} {x})")


class BodyWriter:
    """Emit a stage body: reads become loads at computed offsets, sympy ops become IR."""

    def __init__(self, fw: FunctionWriter, load_read, symbol):
        self.fw, self.load_read, self.symbol = fw, load_read, symbol

    def as_float(self, value):
        v, kind = value
        if kind == "f":
            return v
        if kind == "n":
            return self.fw.fconst(v)
        if kind == "b":
            return self.fw.op(f"uitofp i1 {v} to {self.fw.ft}")
        return self.fw.op(f"sitofp i64 {v} to {self.fw.ft}")

    def as_int(self, value):
        v, kind = value
        if kind == "n":
            return str(int(v))
        if kind == "i":
            return v
        return None

    def emit(self, e):
        fw = self.fw
        if isinstance(e, sympy.Indexed):
            return self.load_read(e)
        if isinstance(e, sympy.Symbol):
            return self.symbol(e)
        if e.is_number:  # (constants too: π, √2 from a derivative)
            return (int(e) if e.is_Integer else float(e)), "n"
        if e is sympy.true or e is sympy.false:
            return ("true" if e is sympy.true else "false"), "b"
        if isinstance(e, sympy.Piecewise):
            result = self.as_float(self.emit(e.args[-1].expr))
            for pair in reversed(e.args[:-1]):
                cond, _ = self.emit(pair.cond)
                result = fw.op(f"select i1 {cond}, {fw.ft} {self.as_float(self.emit(pair.expr))}, {fw.ft} {result}")
            return result, "f"
        args = [self.emit(a) for a in e.args]
        head = type(e)
        if head in (sympy.Add, sympy.Mul):
            if all(k in "in" for _, k in args):
                total = self.as_int(args[0])
                for a in args[1:]:
                    total = (fw.iadd if head is sympy.Add else fw.imul)(total, self.as_int(a))
                return total, "i"
            total = self.as_float(args[0])
            for a in args[1:]:
                total = fw.fbin("fadd" if head is sympy.Add else "fmul", total, self.as_float(a))
            return total, "f"
        if head is sympy.Pow:
            base, exponent = self.as_float(args[0]), e.exp
            if exponent == -1:
                return fw.fbin("fdiv", fw.fconst(1.0), base), "f"
            if exponent == sympy.Rational(1, 2):
                return fw.intrinsic("sqrt", base), "f"
            if exponent in (sympy.Rational(-1, 2), sympy.Rational(-3, 2)):  # batch norm's 1/σ and 1/σ³
                root = fw.intrinsic("sqrt", base)
                denom = root if exponent == sympy.Rational(-1, 2) else fw.fbin("fmul", base, root)
                return fw.fbin("fdiv", fw.fconst(1.0), denom), "f"
            if exponent.is_Integer and 0 < exponent <= 4:
                total = base
                for _ in range(int(exponent) - 1):
                    total = fw.fbin("fmul", total, base)
                return total, "f"
            return fw.intrinsic("pow", base, self.as_float(args[1])), "f"
        row = function_of(e)
        if row is not None:
            return row.llvm(fw, self.as_float(args[0])), "f"
        if head in COMPARE:
            icmp, fcmp = COMPARE[head]
            if all(k in "in" for _, k in args):
                return fw.op(f"icmp {icmp} i64 {self.as_int(args[0])}, {self.as_int(args[1])}"), "b"
            return fw.op(f"fcmp {fcmp} {fw.ft} {self.as_float(args[0])}, {self.as_float(args[1])}"), "b"
        if head in (sympy.And, sympy.Or):
            total = args[0][0]
            for a in args[1:]:
                total = fw.op(f"{'and' if head is sympy.And else 'or'} i1 {total}, {a[0]}")
            return total, "b"
        if head is sympy.Not:
            return fw.op(f"xor i1 {args[0][0]}, true"), "b"
        if head is sympy.KroneckerDelta:
            eq = self.emit(sympy.Eq(*e.args, evaluate=False))
            return eq
        if head in (sympy.Max, sympy.Min):
            if all(k in "in" for _, k in args):
                total = self.as_int(args[0])
                for a in args[1:]:
                    total = (fw.smax if head is sympy.Max else fw.smin)(total, self.as_int(a))
                return total, "i"
            total = self.as_float(args[0])
            for a in args[1:]:
                total = fw.intrinsic("maxnum" if head is sympy.Max else "minnum", total, self.as_float(a))
            return total, "f"
        raise unknown(e, "LLVM")


COMPARE = {sympy.StrictGreaterThan: ("sgt", "ogt"), sympy.StrictLessThan: ("slt", "olt"),
           sympy.GreaterThan: ("sge", "oge"), sympy.LessThan: ("sle", "ole"), sympy.Equality: ("eq", "oeq")}


def literal(value) -> int | None:
    """An integer operand's value where it is a constant, else None (an SSA name)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
