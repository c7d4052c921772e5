"""Stages up to tensor names: what lets the derivation and `explain` do each distinct formula once.

A network repeats formulas: every 3×3 convolution of a ResNet stage, every batch norm, reads and
writes differently named tensors through the same expression. `fingerprint` writes an expression
as nested tuples with each read replaced by a token the caller chooses (a rank among the stage's
tensor names, a read's position, a printed name), so two stages that differ only in names have
equal fingerprints. `relabel` renames tensors in an expression without re-evaluating it: sympy
orders the arguments of a sum or product by comparing names, so a renaming that keeps the names'
order (`name_ranks`) gives, argument for argument, the expression sympy would have built.
"""
from __future__ import annotations

from functools import lru_cache

import sympy
from sympy.core.relational import Relational

INDEXED = "\0read"


def fingerprint(e, token) -> tuple:
    """``e`` as nested (class, args) tuples, each read ``T[...]`` replaced by ``(INDEXED, token(read))``.
    Atoms stand for themselves (a float with its precision, which its printed form depends on)."""
    if type(e) is sympy.Indexed:
        return (INDEXED, token(e))
    args = e.args
    if not args:
        return (type(e), e, e._prec) if type(e) is sympy.Float else (type(e), e)
    return (type(e),) + tuple(fingerprint(a, token) for a in args)


def name_ranks(names) -> dict[str, int]:
    """Each name → its rank in sorted order: equal rank patterns mean renamings that keep order."""
    return {n: k for k, n in enumerate(sorted(names))}


def tensor_names(e, found: set | None = None) -> set[str]:
    """The names of the tensors ``e`` reads."""
    found = set() if found is None else found
    if type(e) is sympy.Indexed:
        found.add(e.base.label.name)
    for a in e.args:
        tensor_names(a, found)
    return found


def relabel(e, names: dict):
    """``e`` with each read's tensor renamed (``names``: old name → new name), its
    structure kept as it is: for an order-keeping renaming of an evaluated expression, the
    expression that evaluating the renamed one gives."""
    if type(e) is sympy.Indexed:
        new = names.get(e.base.label.name)
        return e if new is None else sympy.Indexed(indexed_base(new), *(relabel(i, names) for i in e.indices))
    if not e.args:
        return e
    args = tuple(relabel(a, names) for a in e.args)
    if all(a is b for a, b in zip(args, e.args)):
        return e
    return rebuild(e, args)


@lru_cache(maxsize=4096)
def indexed_base(name: str) -> sympy.IndexedBase:
    return sympy.IndexedBase(name)


def rebuild(e, args):
    """``e``'s head over new arguments, unevaluated where sympy allows it (sums, products, powers,
    functions, relations); other heads (Boolean connectives, condition pairs) are built as usual."""
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return e._new_rawargs(*args)
    if isinstance(e, (sympy.Pow, sympy.Function, Relational)):
        return e.func(*args, evaluate=False)
    return e.func(*args)
