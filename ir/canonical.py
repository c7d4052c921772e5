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


_names: dict = {}  # expression → the names of the tensors it reads
_texts: dict = {}  # read → str(read)
CACHE_LIMIT = 20000


def tensor_names(e) -> frozenset[str]:
    """The names of the tensors ``e`` reads (once per expression: every pass asks for them)."""
    found = _names.get(e)
    if found is None:
        found = frozenset(collect_names(e, set()))
        cache(_names, e, found)
    return found


def collect_names(e, found: set) -> set:
    if type(e) is sympy.Indexed:
        found.add(e.base.label.name)
    for a in e.args:
        collect_names(a, found)
    return found


def read_text(r) -> str:
    """``str(r)`` of a read, printed once (a stage's ``wrt``; `explain` looks reads up by it)."""
    text = _texts.get(r)
    if text is None:
        text = str(r)
        cache(_texts, r, text)
    return text


def cache(table: dict, key, value) -> None:
    if len(table) >= CACHE_LIMIT:
        table.clear()
    table[key] = value


def relabel(e, names: dict):
    """``e`` with each read's tensor renamed (``names``: old name → new name), its
    structure kept as it is: for an order-keeping renaming of an evaluated expression, the
    expression that evaluating the renamed one gives."""
    if type(e) is sympy.Indexed:
        new = names.get(e.base.label.name)
        if new is None:
            return e
        if any(tensor_names(i) for i in e.indices):  # (a read inside an index: renamed too)
            return sympy.Indexed(indexed_base(new), *(relabel(i, names) for i in e.indices))
        return renamed_read(e, new)
    if not e.args:
        return e
    args = tuple(relabel(a, names) for a in e.args)
    if all(a is b for a, b in zip(args, e.args)):
        return e
    return rebuild(e, args)


_renamed: dict = {}  # (read, new name) → the read of the new tensor at the same indices


def renamed_read(r, new: str):
    """``r`` reading tensor ``new``, built once: the same reads recur in every repeated block."""
    key = (r, new)
    hit = _renamed.get(key)
    if hit is None:
        hit = sympy.Indexed(indexed_base(new), *r.indices)
        cache(_renamed, key, hit)
    return hit


def index_fingerprint(i, token) -> tuple:
    """`fingerprint` of an index expression, once per expression where it reads no tensor (an affine
    map of loop variables with integer coefficients, the same in every stage of a network)."""
    if tensor_names(i):
        return fingerprint(i, token)
    hit = _indices.get(i)
    if hit is None:
        hit = fingerprint(i, token)
        cache(_indices, i, hit)
    return hit


_indices: dict = {}


_affine: dict = {}  # Affine → its sympy form


def affine_sympy(e):
    """``e.to_sympy()`` of an `Affine`, built once (every stage's output index is one of a few)."""
    hit = _affine.get(e)
    if hit is None:
        hit = e.to_sympy()
        cache(_affine, e, hit)
    return hit


def out_read(tensor: str, out_index):
    """``tensor`` read at a stage's output index (``read`` with the sympy forms built once)."""
    return indexed_base(tensor)[tuple(affine_sympy(e) for e in out_index)]


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
