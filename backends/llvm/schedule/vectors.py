"""Which nests run as vector rows: the shapes each register template needs.

What a row's body may hold is the vector emitter's own table (`backends/llvm/vector_ops.py`,
`vector_safe`); this module checks the rest: unit-stride (or stride-2) reads along the row,
float tensors, row lengths within the target's register budget.
"""
from __future__ import annotations

import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import Program, tensor_of
from cnncompile.ir.loops import ClassNest, TermNest, covers_outputs

from ..vector_ops import vector_safe

MIN_ROW = 4  # shorter rows are left to plain loops


def vectorizable(stage, term, out_index, outer, reduce_, order, prog, max_row: int) -> bool:
    """Can the innermost output variable run as a row of vector accumulators kept in registers
    across the reduction loops? Needs: a sum with reductions, the innermost loop an output
    variable that is the output's last index (unit stride, or 2: stored every other element) and at
    most ``max_row`` long, every read either free of it or unit-stride in it on its last index, float
    reads only, and a body of +, ×, constants and runtime scalars."""
    if stage.combine != "sum" or not reduce_ or len(outer) < 2 or stage.argmax:
        return False
    v, extent = order[-1], dict(outer).get(order[-1])
    if extent is None or not isinstance(extent, int) or extent > max_row or extent < MIN_ROW:
        return False
    if out_index[-1].coeff(v) not in (1, 2) or any(e.coeff(v) for e in out_index[:-1]):
        return False  # (stride 2: a stride-2 input gradient's residue class, stored every other element)
    return unit_stride_reads(term, v, prog) and vector_safe(term, {name for name, _ in outer + reduce_})


def map_row_vectorizable(nest: ClassNest, term: TermNest, prog: Program, max_row: int) -> bool:
    """An elementwise stage (no reduction: batch norm's output, ReLU, its derivative, a gradient's
    accumulation) as vector rows along the output's last variable, each chunk computed and stored
    once. Needs that variable unit-stride in the output and in every read (or absent), MIN_ROW to
    ``max_row`` long, no constraint, float tensors and a body the vector templates emit. (Left to
    LLVM, such loops got their 16-wide rows fully unrolled first and the loop around them
    vectorized instead: gathers and scatters at a stride of a row, 1.4 cycles an element.)"""
    stage, outer = nest.stage, nest.outer
    if stage.reduce or nest.reduce or stage.argmax or len(nest.terms) != 1 or term.constraints or len(outer) < 2:
        return False  # (one variable: the row would be every thread's, unsplit)
    if prog.tensors[stage.out].dtype != "float" or nest.empty or not covers_outputs(nest, term):
        return False
    v, extent = outer[-1]
    if not isinstance(extent, int) or not MIN_ROW <= extent <= max_row:
        return False
    try:
        if nest.out_index[-1] != Affine.var(v) or any(e.coeff(v) for e in nest.out_index[:-1]):
            return False
        if not unit_stride_reads(term.term, v, prog):
            return False
    except (TypeError, ValueError, NotImplementedError):  # a read at a non-affine index (a reshape)
        return False
    return vector_safe(term.term, {name for name, _ in outer}, piecewise=True)


def max_row_vectorizable(nest: ClassNest, term: TermNest, order, lanes: int) -> bool:
    """A max pool as vector rows: the running maximum and each reduction variable's argmax
    held per lane across the window loops (in the window's order, so ties go to the first, as
    in plain loops), then stored once. Needs one read, unit or stride 2 along the row (the
    output's last index), no constraint (no padding), and a row at least a vector long (LeNet-5's
    5-wide pooled rows: 0.19 ms as vectors, 0.15 as plain loops; its 14-wide: 0.27 against 0.36)."""
    stage, outer = nest.stage, nest.outer
    if stage.combine != "max" or len(nest.terms) != 1 or len(outer) < 2 or term.constraints:
        return False
    v, extent = order[-1], dict(outer).get(order[-1])
    if not isinstance(extent, int) or extent < lanes or not isinstance(term.term, sympy.Indexed):
        return False
    if nest.out_index[-1] != Affine.var(v) or any(e.coeff(v) for e in nest.out_index[:-1]):
        return False
    index = [Affine.from_sympy(i) for i in term.term.indices]
    return index[-1].coeff(v) in (1, 2) and not any(e.coeff(v) for e in index[:-1])


def reduction_vectorizable(stage, term, out_index, outer, reduce_, order, prog, max_row: int) -> bool:
    """The other way round: the innermost loop is a reduction variable ``r`` (MIN_ROW to ``max_row`` long)
    that the output does not depend on, every read free of ``r`` or unit-stride in it."""
    if stage.combine != "sum" or not reduce_ or not outer or stage.argmax:
        return False
    r, extent = order[-1], dict(reduce_).get(order[-1])
    if extent is None or not isinstance(extent, int) or extent > max_row or extent < MIN_ROW:
        return False
    if any(e.coeff(r) for e in out_index):
        return False
    return unit_stride_reads(term, r, prog) and vector_safe(term, {name for name, _ in outer + reduce_})


def unit_stride_reads(term, v, prog) -> bool:
    for r in term.atoms(sympy.Indexed):
        if prog.tensors[tensor_of(r)].dtype != "float":
            return False
        index = [Affine.from_sympy(i) for i in r.indices]
        if any(e.coeff(v) for e in index[:-1]) or index[-1].coeff(v) not in (0, 1, 2):
            return False
    return True


def vector_epilogue(body, row: str, loop_vars, prog) -> bool:
    """Can an epilogue body run on a register row along ``row`` (its operations ones the vector
    templates emit, its reads free of the row or unit-stride along it)?"""
    return vector_safe(body, loop_vars, piecewise=True) and unit_stride_reads(body, row, prog)


def interleaved_pairs(nests, tpl, lanes: int) -> tuple | None:
    """Vector rows for merged classes (a max-pool gradient with stride 2): the innermost loop
    variable ``v`` writes ``out[..., 2v]`` in one class and ``out[..., 2v + 1]`` in another with
    everything else alike, so a vector of each, interleaved, is one contiguous store of 2W.
    Returns (v, extent, ((even class, odd class), ...)) in class positions, or None where the
    classes do not pair up, a loop is constrained, the row is shorter than a vector (LeNet-5's
    5-wide pooled rows ran faster as plain loops: 0.13 against 0.18 ms), or a term is more than
    products of reads, numbers and index comparisons (`index_vector_safe`)."""
    v = tpl.order[-1]
    extent = dict(nests[0].grid)[v]
    if len(nests) % 2 or not isinstance(extent, int) or extent < lanes or nests[0].terms[0].constraints:
        return None
    if v not in {o for o, _ in nests[0].outer}:
        return None
    rows: dict = {}
    for k, nest in enumerate(nests):
        last = nest.out_index[-1]
        if last.coeffs != ((v, 2),) or last.const not in (0, 1) or \
                any(e.coeff(v) for e in nest.out_index[:-1]) or not index_vector_safe(nest.terms[0].term, v):
            return None
        rows.setdefault(nest.out_index[:-1], [None, None])[int(last.const)] = k
    if any(None in pair for pair in rows.values()):
        return None
    return v, extent, tuple(tuple(pair) for pair in rows.values())


def index_vector_safe(e, v: str) -> bool:
    """Products of reads (float or index tensors, read contiguously along ``v`` or free of it),
    numbers and KroneckerDelta comparisons of index reads with loop-variable expressions free of ``v``."""
    if e.is_Number:
        return True
    if isinstance(e, sympy.Indexed):
        index = [Affine.from_sympy(i) for i in e.indices]
        return index[-1].coeff(v) in (0, 1) and not any(i.coeff(v) for i in index[:-1])
    if isinstance(e, sympy.Mul):
        return all(index_vector_safe(a, v) for a in e.args)
    if isinstance(e, sympy.KroneckerDelta):
        return all(index_vector_safe(a, v) if isinstance(a, sympy.Indexed) else loop_affine_free_of(a, v)
                   for a in e.args)
    return False


def loop_affine_free_of(e, v: str) -> bool:
    """An integral affine expression of loop variables, ``v`` not among them."""
    try:
        affine = Affine.from_sympy(e)
    except (TypeError, ValueError, NotImplementedError):
        return False
    return affine.is_integral() and not affine.coeff(v) and all(s.is_integer for s in e.free_symbols)
