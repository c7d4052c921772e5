"""Print stages in the lecture's notation: Σ with ranges, guards, the argmax indicator.

The text is made from the same `Stage` objects the backends run; only the printing differs:

- ``notation="code"``: tensor names shortened per layer (W, bias, X, Z, P for max pooling's
  recorded winner, ∂L/∂ for gradients), indexed like arrays: ``W[n, m, i, j]``;
- ``notation="lecture"``: the lecture's own names, per example (the batch index and the sum over
  the batch are left out, and said so): ``z(l, n, x, y) = Σ w_l(m, n, i, j)·y(l-1, m, x+i, y+j)``,
  gradients ``dDiv/dz(l, n, x, y)``;
- ``latex=True``: the same as a LaTeX document that compiles on its own.

ReLU prints as ``max(0, X)`` and its derivative as the indicator ``[X > 0]`` (the lecture's f′(z));
elementwise stages, whose loop variables are e0, e1, ..., print with the layer's names b, c, x, y.
"""
from __future__ import annotations

import re
from functools import lru_cache

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from cnncompile.ir import autodiff
from cnncompile.ir.affine import Affine
from cnncompile.ir.autodiff import derive_read, grad_name
from cnncompile.ir.canonical import affine_sympy, fingerprint, index_fingerprint, name_ranks, read_text, tensor_names
from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import BATCH, Stage, tensor_of, var_bounds

NOTATIONS = ("code", "lecture")
SEP = "\x1f"  # between a read's printed name (what products are ordered by) and its tensor
ELEMENT_NAMES = {1: "b", 2: "bn", 3: "bcx", 4: "bcxy", 5: "bcdxy"}  # e0, e1, ... by the tensor's rank
SPECIAL_LATEX = {"μ": r"\mu", "σ²": r"\sigma^{2}", "Pᵢ": "P_{i}", "Pⱼ": "P_{j}", "Pi": "P_{i}", "Pj": "P_{j}",
                 "γ": r"\gamma", "β": r"\beta", "Div": r"\mathrm{Div}"}


# ----- names ------------------------------------------------------------------------------------------

def display_names(layer: str, node, prog) -> dict[str, str]:
    """Code notation: each tensor of the layer → its short name (gradients: ∂L/∂ + the name)."""
    names = {}
    if node is not None:
        for local, tensor in node.params.items():
            names[tensor] = "W" if local == "weight" else local
        inputs = list(node.inputs)
        for k, t in enumerate(inputs):
            names.setdefault(t, "X" if len(inputs) == 1 else f"X{k + 1}")
        names[node.output] = "Z"
    for t in prog.tensors:
        if t.startswith(f"{layer}.out.") and t not in names:
            suffix = t[len(f"{layer}.out."):]
            names[t] = {"conv": "Zc", "mm": "Zc", "argmax_i": "Pᵢ", "argmax_j": "Pⱼ", "mean": "μ",
                        "var": "σ²"}.get(suffix, f"Z.{suffix}")
    for t, short in list(names.items()):
        names[grad_name(t)] = f"∂L/∂{short}"
    return names


def latex_name(short: str) -> str:
    """A short name as LaTeX: X1 → X_{1}, Zc → Z_{c}, Z.max → Z_{\\mathrm{max}}, running_mean →
    \\mathrm{running\\_mean}."""
    if short in SPECIAL_LATEX:
        return SPECIAL_LATEX[short]
    if m := re.fullmatch(r"([A-Za-z])(\d+|c)", short):
        return f"{m[1]}_{{{m[2]}}}"
    if m := re.fullmatch(r"(.+)_([a-z])", short):  # w_l, γ_l, running_mean_l
        return f"{latex_name(m[1])}_{{{m[2]}}}"
    if "." in short:
        head, rest = short.split(".", 1)
        return f"{latex_name(head)}_{{\\mathrm{{{escape(rest)}}}}}"
    if len(short) == 1 and short.isascii():
        return short
    return f"\\mathrm{{{escape(short)}}}" if short.isascii() else short


def escape(text: str) -> str:
    """Plain text for LaTeX: its special characters escaped."""
    out = []
    for ch in text:
        out.append({"_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                    "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}.get(ch, ch))
    return "".join(out)


def is_activation(node, prog) -> bool:
    """One input, no parameters, one elementwise stage that computes f(x) (not just moves x)."""
    if node is None or len(node.inputs) != 1 or node.params:
        return False
    stages = [s for s in prog.forward if s.layer == node.name]
    return len(stages) == 1 and stages[0].combine is None and not isinstance(stages[0].body, sympy.Indexed)


class Names:
    """How one layer's tensors print: ``read(tensor, indices)`` in the chosen notation and format."""

    def __init__(self, layer: str, node, prog, latex: bool = False, notation: str = "code"):
        if notation not in NOTATIONS:
            raise CompileError(f"explain: notation must be one of {NOTATIONS}, got {notation!r}")
        self.prog, self.latex, self.notation = prog, latex, notation
        self.short = display_names(layer, node, prog)
        self.lecture = lecture_names(layer, node, prog) if notation == "lecture" else {}
        self.keeps_batch = any(s.layer == layer for s in prog.loss) or batch_statistics(layer, prog)

    @property
    def per_example(self) -> bool:
        """Lecture notation leaves the batch out, except in layers whose forward sums over it (the
        loss's mean, batch norm's statistics)."""
        return self.notation == "lecture" and not self.keeps_batch

    def batched(self, tensor: str) -> bool:
        spec = self.prog.tensors.get(tensor)
        return spec is not None and bool(spec.shape) and spec.shape[0] is BATCH

    def split_grad(self, tensor: str) -> tuple[str, bool]:
        """``dL/dT`` → (T, True) for a tensor T this printer knows; anything else → (tensor, False)."""
        if tensor.startswith("dL/d") and (tensor[4:] in self.prog.tensors or tensor[4:] in self.short):
            return tensor[4:], True
        return tensor, False

    def read(self, tensor: str, index: list[str]) -> str:
        base, grad = self.split_grad(tensor)
        if self.per_example and self.batched(base) and index:
            index = index[1:]
        if self.notation == "lecture" and base in self.lecture:
            return self.lecture_read(base, index, grad)
        short = self.short.get(base, base)
        if self.latex:
            sub = f"_{{{', '.join(index)}}}" if index else ""
            inner = f"{{{latex_name(short)}}}{sub}"
            return f"\\frac{{\\partial L}}{{\\partial {inner}}}" if grad else inner
        text = f"{short}[{', '.join(index)}]"
        return f"∂L/∂{text}" if grad else text

    def lecture_read(self, tensor: str, index: list[str], grad: bool) -> str:
        name, level, swap = self.lecture[tensor]
        if swap and len(index) >= 2:
            index = [index[1], index[0], *index[2:]]
        spec = self.prog.tensors.get(tensor)
        if spec is not None and tuple(spec.shape) == (1,) and index == ["0"]:  # one number: the loss, a count
            index = []
        args = ([level] if level else []) + index
        head = latex_name(name) if self.latex else name
        text = f"{head}({', '.join(args)})" if args else head
        if not grad:
            return text
        return f"\\frac{{\\partial \\mathrm{{Div}}}}{{\\partial {text}}}" if self.latex else f"dDiv/d{text}"

    def signature(self, tensor: str) -> tuple:
        """Everything `read` and `tensor` print of ``tensor`` depends on (two tensors with equal
        signatures print alike)."""
        base, grad = self.split_grad(tensor)
        spec = self.prog.tensors.get(base)
        one = spec is not None and tuple(spec.shape) == (1,)
        return (grad, self.batched(base), one, self.lecture.get(base), self.short.get(base, base), self.tensor(tensor))

    def config(self) -> tuple:
        return type(self), self.latex, self.notation, self.per_example

    def tensor(self, tensor: str) -> str:
        """A tensor's name alone (for notes: "records Pᵢ, Pⱼ")."""
        if self.notation == "lecture" and tensor in self.lecture:
            name = self.lecture[tensor][0]
        else:
            name = self.short.get(tensor, tensor)
        return latex_name(name) if self.latex else name


def batch_statistics(layer: str, prog) -> bool:
    """Does the layer's forward sum over the batch (batch norm's mean and variance, a loss's mean)?"""
    return any(ext is BATCH for s in prog.forward + prog.loss if s.layer == layer for _, ext in s.reduce)


def lecture_names(layer: str, node, prog) -> dict[str, tuple[str, str, bool]]:
    """Lecture notation: tensor → (name, layer argument, whether the first two indices swap).

    A convolution or dense layer computes z(l, ...) from y(l-1, ...) and w_l(m, n, i, j) (input
    channel first, as the lecture writes it; PyTorch stores W[n, m, i, j]); an activation makes
    y(l, ...) = f(z(l, ...)); other layers map y(l-1, ...) to y(l, ...); the loss is Div of y and
    the desired output d."""
    if node is None:
        return {}
    names: dict = {}
    activation, loss = is_activation(node, prog), any(s.layer == layer for s in prog.loss)
    norm = node.kind.startswith("batchnorm")
    for local, tensor in node.params.items():
        if local == "weight":
            names[tensor] = ("γ_l", "", False) if norm else ("w_l", "", len(prog.tensors[tensor].shape) >= 2)
        elif local == "bias":
            names[tensor] = ("β_l" if norm else "b_l", "", False)
        else:
            names[tensor] = (f"{local}_l", "", False)
    inputs = list(node.inputs)
    for k, t in enumerate(inputs):
        spec = prog.tensors.get(t)
        if loss and spec is not None and spec.role == "label":
            names.setdefault(t, ("d", "", False))
        else:
            stem = "z" if activation else ("y" if len(inputs) == 1 or loss else f"y{k + 1}")
            names.setdefault(t, (stem, "l" if activation else "l-1", False))
    affine = node.kind in ("conv2d", "linear")
    names[node.output] = ("Div", "", False) if loss else ("z" if affine else "y", "l", False)
    for t in prog.tensors:
        if t.startswith(f"{layer}.out.") and t not in names:
            suffix = t[len(f"{layer}.out."):]
            stem = {"conv": "zc", "mm": "zc", "argmax_i": "Pi", "argmax_j": "Pj", "mean": "μ",
                    "var": "σ²"}.get(suffix, f"{'Div' if loss else 'y'}.{suffix}")
            names[t] = (stem, "" if loss else "l", False)
    return names


# ----- expressions -----------------------------------------------------------------------------------

def index_text(e, order: list[str], rename: dict, compact: bool, latex: bool, fallback) -> str:
    """An affine index with its terms in the stage's loop order (x + i, u - x), constant last."""
    try:
        a = e if isinstance(e, Affine) else affine_of(e)
    except (ValueError, TypeError, AttributeError):
        return fallback(e)
    if any(c.denominator != 1 for _, c in a.coeffs) or a.const.denominator != 1:
        return fallback(e)
    rank = {v: k for k, v in enumerate(order)}
    terms = sorted(a.coeffs, key=lambda vc: (rank.get(vc[0], len(rank)), vc[0]))
    parts = [(int(c), rename.get(v, v)) for v, c in terms] + ([(int(a.const), "")] if a.const else [])
    if not parts:
        return "0"
    plus, minus, times = ("+", "-", " " if latex else "·") if compact else (" + ", " - ", " " if latex else "·")
    out = ""
    for k, (c, v) in enumerate(parts):
        mag = abs(c)
        term = str(mag) if not v else (v if mag == 1 else f"{mag}{times}{v}")
        out += (("-" if c < 0 else "") + term) if k == 0 else ((minus if c < 0 else plus) + term)
    return out


@lru_cache(maxsize=4096)
def affine_of(e) -> Affine:
    """`Affine.from_sympy`, once per index expression (a network prints the same few thousand)."""
    return Affine.from_sympy(e)


class _Common:
    """What the Unicode and LaTeX printers share: reads through `Names`, ReLU as max(0, x), its
    derivative as the indicator [x > 0], elementwise variables renamed."""

    def setup(self, names: Names, order: list[str], rename: dict, compact: bool):
        self.names, self.var_order, self.rename, self.compact = names, order, rename, compact

    def index(self, e) -> str:
        return index_text(e, self.var_order, self.rename, self.compact, self.latex_mode, self._print)

    def doprint(self, expr):
        """Reads relabelled first so that sympy orders a product's factors by their printed names."""
        bases = {b: sympy.IndexedBase(self.names.read(b.label.name, []) + SEP + b.label.name)
                 for b in expr.atoms(sympy.IndexedBase)} if isinstance(expr, sympy.Basic) else {}
        return super().doprint(expr.xreplace(bases) if bases else expr)

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Indexed):  # (before sympy's own Indexed._sympystr)
            tensor = expr.base.label.name.split(SEP)[-1]
            return self.names.read(tensor, [self.index(i) for i in expr.indices])
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, e):
        name = self.rename.get(e.name, e.name)
        return name if name != e.name else super()._print_Symbol(e)

    def _print_Piecewise(self, e):
        pieces = e.args
        if len(pieces) == 2 and pieces[1].cond == sympy.true:
            (a, cond), (other, _) = pieces
            if other == 0 and a == 1:
                return self.bracket(self._print(cond))
            if other == 1 and a == 0:  # (ReLU6′, Hardtanh′: 1 inside the range)
                return self.bracket(self._print(sympy.logic.boolalg.to_nnf(sympy.Not(cond))))
            if other == 0 and is_positive_test(cond, a):
                return self.maximum(self._print(a))
            if other == 0:
                return self.bracket(self._print(cond)) + self.product() + self.parenthesize(a, 50)
        clamp = clamped(pieces)
        if clamp is not None:
            return self.clamp(*(self._print(v) for v in clamp))
        return self.cases(pieces)


def clamped(pieces):
    """``(lo, x < lo), (hi, x > hi), (x, True)`` (ReLU6, Hardtanh) → (lo, x, hi), else None."""
    if len(pieces) != 3 or pieces[2].cond != sympy.true:
        return None
    x, bounds = pieces[2].expr, {}
    for value, cond in pieces[:2]:
        same = cond.is_Relational and cond.lhs == x and (cond.rhs - value).is_zero
        if same and isinstance(cond, sympy.StrictLessThan):
            bounds["lo"] = cond.rhs
        elif same and isinstance(cond, sympy.StrictGreaterThan):
            bounds["hi"] = cond.rhs
    return (bounds["lo"], x, bounds["hi"]) if len(bounds) == 2 else None


def is_positive_test(cond, a) -> bool:
    """``cond`` says ``a > 0`` (so Piecewise((a, cond), (0, True)) is max(0, a))."""
    return (isinstance(cond, sympy.StrictGreaterThan) and cond.lhs == a and cond.rhs == 0) or \
        (isinstance(cond, sympy.StrictLessThan) and cond.rhs == a and cond.lhs == 0)


class UnicodePrinter(_Common, StrPrinter):
    latex_mode = False

    def bracket(self, text: str) -> str:
        return f"[{text}]"

    def maximum(self, text: str) -> str:
        return f"max(0, {text})"

    def product(self) -> str:
        return "·"

    def clamp(self, lo: str, x: str, hi: str) -> str:
        return f"min(max({lo}, {x}), {hi})"

    def _print_And(self, e):
        return " and ".join(self.parenthesize(a, 30) for a in e.args)

    def _print_Or(self, e):
        return " or ".join(self.parenthesize(a, 30) for a in e.args)

    def _print_Pi(self, e):
        return "π"

    def _print_GreaterThan(self, e):
        return f"{self._print(e.lhs)} ≥ {self._print(e.rhs)}"

    def _print_LessThan(self, e):
        return f"{self._print(e.lhs)} ≤ {self._print(e.rhs)}"

    def cases(self, pieces) -> str:
        parts = [f"{self._print(p.expr)} if {self._print(p.cond)}" for p in pieces if p.cond != sympy.true]
        rest = [self._print(p.expr) for p in pieces if p.cond == sympy.true]
        return "{" + "; ".join(parts + [f"{r} otherwise" for r in rest]) + "}"

    def _print_Max(self, e):
        return "max(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Min(self, e):
        return "min(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_KroneckerDelta(self, e):
        return "δ(" + ", ".join(self._print(a) for a in e.args) + ")"


class LatexFormulaPrinter(_Common, LatexPrinter):
    latex_mode = True

    def bracket(self, text: str) -> str:
        return f"\\left[{text}\\right]"

    def maximum(self, text: str) -> str:
        return f"\\max\\left(0, {text}\\right)"

    def product(self) -> str:
        return " "

    def clamp(self, lo: str, x: str, hi: str) -> str:
        return f"\\min\\left(\\max\\left({lo}, {x}\\right), {hi}\\right)"

    def cases(self, pieces) -> str:
        rows = [f"{self._print(p.expr)} & " + ("\\text{otherwise}" if p.cond == sympy.true else
                                                f"\\text{{if }} {self._print(p.cond)}") for p in pieces]
        return "\\begin{cases} " + " \\\\ ".join(rows) + " \\end{cases}"

    def _needs_mul_brackets(self, expr, first=False, last=False) -> bool:
        """An indicator [x > 0] or max(0, x) is a bracket already."""
        if isinstance(expr, sympy.Piecewise) and (clamped(expr.args) is not None or (
                len(expr.args) == 2 and expr.args[1].cond == sympy.true and
                (expr.args[1].expr == 0 or (expr.args[0].expr == 0 and expr.args[1].expr == 1)))):
            return False
        return super()._needs_mul_brackets(expr, first, last)

    def _print_Symbol(self, e, style="plain"):
        name = self.rename.get(e.name, e.name)
        return name if name != e.name else LatexPrinter._print_Symbol(self, e, style)


def printer(names: Names, stage: Stage | None):
    order, rename = (list(stage.variables), element_names(stage)) if stage is not None else ([], {})
    p = LatexFormulaPrinter() if names.latex else UnicodePrinter()
    p.setup(names, order, rename, names.notation == "lecture")
    return p


def element_names(stage: Stage) -> dict[str, str]:
    """e0, e1, ... → b, c, x, y (by rank) where no other variable of the stage has those names."""
    elems = sorted((v for v in stage.variables if re.fullmatch(r"e\d+", v)), key=lambda v: int(v[1:]))
    if not elems:
        return {}
    wanted = ELEMENT_NAMES.get(len(elems))
    others = set(stage.variables) - set(elems)
    if wanted is None or others & set(wanted):
        return {}
    return dict(zip(elems, wanted))


def text(expr, names, latex: bool = False, stage: Stage | None = None) -> str:
    """An expression with tensors renamed and products written as ·."""
    if not isinstance(names, Names):
        names = PlainNames(names, latex)
    out = printer(names, stage).doprint(expr)
    return out if names.latex else out.replace("**", "^").replace("*", "·")


class PlainNames(Names):
    """Code notation from a ready dict of short names (tensors not in it print as they are)."""

    def __init__(self, short: dict, latex: bool = False):
        self.prog, self.latex, self.notation, self.lecture, self.keeps_batch = _NoTensors(), latex, "code", {}, False
        self.short = dict(short)


class _NoTensors:
    tensors: dict = {}


# ----- stages ----------------------------------------------------------------------------------------

def bound_text(bounds, lower: bool, names, p=None) -> str:
    parts = []
    for num, div in bounds:
        e = p.index(num) if p is not None else text(num.to_sympy() if hasattr(num, "to_sympy") else num, names)
        if div == 1:
            parts.append(e)
        elif names.latex:
            parts.append(("\\left\\lceil \\frac{%s}{%d} \\right\\rceil" if lower else
                          "\\left\\lfloor \\frac{%s}{%d} \\right\\rfloor") % (e, div))
        else:
            e = e if re.fullmatch(r"-?\w+", e) else f"({e})"
            parts.append(("⌈%s/%d⌉" if lower else "⌊%s/%d⌋") % (e, div))
    unique = list(dict.fromkeys(parts))
    if len(unique) == 1:
        return unique[0]
    if names.latex:
        return ("\\max" if lower else "\\min") + "\\left(" + ", ".join(unique) + "\\right)"
    return ("max" if lower else "min") + "(" + ", ".join(unique) + ")"


def as_index(e):
    if isinstance(e, Affine):
        return affine_sympy(e)
    return e.to_sympy() if hasattr(e, "to_sympy") else e


_printed: dict = {}  # a stage's print key → its line (see `print_key`)


def format_stage(stage: Stage, names, latex: bool = False) -> str:
    """One stage as a line: ``out[index] = Σ_{v=lo..hi} ... body`` with its mode, guards and notes.
    Printed once per print key: ResNet's blocks repeat the same lines under other tensor names."""
    if not isinstance(names, Names):
        names = PlainNames(names, latex)
    if not autodiff.MEMO:
        return render_stage(stage, names)
    return printed(("stage",) + stage_key(stage, names), lambda: render_stage(stage, names))


def print_key(stage: Stage, names: Names, expr) -> tuple:
    """What printing ``expr`` in ``stage`` depends on: the notation, the stage's loop variables
    (their order and names), and ``expr`` with each tensor replaced by its signature
    (`Names.signature`) and the rank of the name sympy orders products by (`_Common.doprint`)."""
    sign = signatures(names, tensor_names(expr))

    def token(x):
        return sign[x.base.label.name], tuple(index_fingerprint(i, token) for i in x.indices)

    return names.config(), stage.variables, fingerprint(expr, token)


def signatures(names: Names, tensors) -> dict:
    """Per tensor: the rank of its sort name among ``tensors`` and its `Names.signature` (once per
    set of tensors and printer: a layer's stages read the same few)."""
    memo = names.__dict__.setdefault("_signatures", {})
    key = frozenset(tensors)
    hit = memo.get(key)
    if hit is None:
        order = name_ranks(names.read(t, []) + SEP + t for t in key)
        hit = memo[key] = {t: (order[names.read(t, []) + SEP + t], names.signature(t)) for t in key}
    return hit


def stage_key(stage: Stage, names: Names) -> tuple:
    """`print_key` of the body and every other field a stage's line shows (not its layer)."""
    sign = signatures(names, {stage.out, *stage.argmax})
    fields = (stage.out_index, stage.domain, stage.reduce, stage.combine, stage.constraints, stage.guards,
              stage.accumulate, stage.mode, sign[stage.out], tuple(sign[a] for a in stage.argmax))
    return print_key(stage, names, stage.body), fields


def printed(key, make) -> str:
    """``make()``, once per key."""
    text = _printed.get(key)
    if text is None:
        text = make()
        autodiff.remember(_printed, key, text)
    return text


def render_stage(stage: Stage, names: Names) -> str:
    p = printer(names, stage)
    lhs = names.read(stage.out, [p.index(as_index(e)) for e in stage.out_index])
    bounds = var_bounds(stage)
    sums, dropped = [], []
    for v, ext in stage.reduce:
        if names.per_example and ext is BATCH:
            dropped.append(v)
            continue
        lo, hi = (bound_text(b, k == 0, names, p) for k, b in enumerate(bounds[v]))
        v = p.rename.get(v, v)
        if names.latex:
            sums.append(f"\\{'max' if stage.combine == 'max' else 'sum'}_{{{v}={lo}}}^{{{hi}}}")
        else:
            sums.append(f"{'max' if stage.combine == 'max' else 'Σ'}_{{{v}={lo}..{hi}}}")
    body = print_expr(stage, stage.body, names, p)
    body = body if names.latex else body.replace("**", "^").replace("*", "·")
    op = (" \\mathrel{+}= " if names.latex else " += ") if stage.accumulate else " = "
    line = lhs + op + " ".join(sums) + (" " if sums else "") + body
    return decorate(line, stage, names, p, dropped)


def print_expr(stage: Stage, expr, names: Names, p=None) -> str:
    """``expr`` (the body or a read of ``stage``) as the printer shows it, once per print key:
    sizes do not enter it, so DenseNet's layers of growing width share their bodies."""
    p = p or printer(names, stage)
    if not autodiff.MEMO:
        return p.doprint(expr)
    return printed(("expr",) + print_key(stage, names, expr), lambda: p.doprint(expr))


def decorate(line: str, stage: Stage, names: Names, p, dropped: list) -> str:
    """The stage's mode in front; guards, recorded winners and a dropped batch sum after it."""
    notes = []
    if stage.guards:
        divides = r"\mid" if names.latex else "|"
        where = ", ".join(f"{g.modulus} {divides} {p.index(g.expr)}" for g in stage.guards)
        notes.append(("only where ", where, "; 0 elsewhere"))
    if stage.argmax:
        notes.append(("(records ", ", ".join(names.tensor(a) for a in stage.argmax), ": the winning "
                      + ", ".join(p.rename.get(v, v) for v, _ in stage.reduce) + ")"))
    if dropped:
        notes.append(("(per example; the code also sums over the batch ", ", ".join(dropped), ")"))
    mode = "" if stage.mode == "any" else f"[{'training' if stage.mode == 'train' else 'eval'}] "
    if names.latex:
        tail = "".join(f"\\quad\\text{{{escape(a)}}}{b}\\text{{{escape(c)}}}" for a, b, c in notes)
        return (f"\\text{{{mode}}}" if mode else "") + line + tail
    tail = "".join(f"    {a}{b}{c}" if a.startswith("(") else f"    [{a}{b}{c}]" for a, b, c in notes)
    return mode + line + tail


# ----- layers ----------------------------------------------------------------------------------------

def explain_layer(model, layer: str, latex: bool = False, notation: str = "code", prog=None) -> list[tuple[str, list]]:
    """The layer's sections: (heading, items), each item a formula or a (text, formula) pair."""
    node = find_node(model, layer)
    prog = prog if prog is not None else model.prog
    names = Names(layer, node, prog, latex, notation)
    fwd = [s for s in prog.forward + prog.loss if s.layer == layer]
    bwd = [s for s in prog.backward if s.layer == layer]
    reads = {read_text(r): (s, r) for s in fwd for r in autodiff.reads_of(s.body)}
    sections = [("forward", [format_stage(s, names) for s in fwd])]
    stats = [s for s in prog.update if s.layer == layer and s.role == "stats"]
    if stats:
        sections.append(("running statistics (updated after each training step)",
                         [format_stage(s, names) for s in stats]))
    if bwd:
        sections.append(("backward (derived, run in train_step)",
                         [(through(s.wrt, names, reads), format_stage(s, names)) for s in bwd]))
    shown = {s.out for s in bwd}
    extra = [g for s in fwd for g in display_only(prog, s, shown)]
    if extra:
        sections.append(("backward (derived for display only: nothing upstream needs these gradients)",
                         [(through(s.wrt, names, reads), format_stage(s, names)) for s in extra]))
    return sections


def find_node(model, layer: str):
    node = next((n for n in model.tracer.graph.ops if n.name == layer), None)
    if node is None:
        known = [n.name for n in model.tracer.graph.ops]
        raise KeyError(f"no layer named {layer!r}; the layers are {known}")
    return node


def through(wrt: str, names: Names, reads: dict) -> str:
    """"∂ through the read X[b, m, x + i, y + j]:" (the read of the forward stage differentiated)."""
    if not wrt:
        return "seed:"
    if wrt in reads:
        stage, r = reads[wrt]
        shown = print_expr(stage, r, names)
    else:
        tensor = wrt.split("[")[0]
        shown = names.tensor(tensor) + wrt[len(tensor):].replace("*", "·")
    if names.latex:
        return f"through the read ${shown}$:"
    return f"∂ through the read {shown}:"


def display_only(prog, stage: Stage, shown: set) -> list[Stage]:
    """Gradients training skips (the network input's), derived by the same engine to show them."""
    out = []
    for r in stage.reads():
        spec = prog.tensors[tensor_of(r)]
        if spec.dtype == "float" and spec.role in ("input", "activation") and grad_name(spec.name) not in shown:
            out += derive_read(stage, r, False, spec.shape)
    return out


def layer_text(model, layer: str, notation: str, prog=None) -> str:
    node = find_node(model, layer)
    lines = []
    for k, (heading, items) in enumerate(explain_layer(model, layer, False, notation, prog)):
        lines.append(f"layer '{layer}' ({node.type}), {heading}:" if k == 0 else f"{heading}:")
        for item in items:
            lines.append(f"  {item[0]}\n    {item[1]}" if isinstance(item, tuple) else f"  {item}")
    return "\n".join(lines)


def layer_latex(model, layer: str, notation: str, prog=None) -> str:
    node = find_node(model, layer)
    lines = [f"\\subsection*{{Layer \\texttt{{{escape(layer)}}} ({escape(node.type)})}}"]
    for heading, items in explain_layer(model, layer, True, notation, prog):
        lines.append(f"\\paragraph{{{escape(heading[0].upper() + heading[1:])}.}}")
        for item in items:
            if isinstance(item, tuple):
                lines.append(f"\\noindent {escape(item[0]) if '$' not in item[0] else item[0]}")
                item = item[1]
            lines.append(f"\\[ {item} \\]")
    return "\n".join(lines)


LATEX_HEAD = r"""\documentclass[10pt]{article}
\usepackage[a4paper,landscape,margin=1.5cm]{geometry}
\usepackage{amsmath,amssymb}
\allowdisplaybreaks
\setlength{\parindent}{0pt}
\begin{document}
\section*{%s}
%s
"""


def latex_document(model, layers: list[str], notation: str, prog=None) -> str:
    title = "Forward and derived backward formulas" + (" (lecture notation)" if notation == "lecture" else "")
    intro = ("Per example: the batch index and the sums over the batch are left out."
             if notation == "lecture" else "As the compiled code runs them, on a batch of $B$ examples.")
    body = "\n\n".join(layer_latex(model, name, notation, prog) for name in layers)
    return LATEX_HEAD % (title, intro) + body + "\n\\end{document}\n"


def explain(model, layer=None, latex: bool = False, notation: str = "code") -> str:
    if notation not in NOTATIONS:
        raise CompileError(f"explain: notation must be one of {NOTATIONS}, got {notation!r}")
    layers = [layer] if layer is not None else [n.name for n in model.tracer.graph.ops]
    prog = None
    if layer is not None and hasattr(model, "layer_program"):  # (a derivation: only this layer's gradients)
        find_node(model, layer)
        prog = model.layer_program(layer)
    elif hasattr(model, "formulas"):  # (a derivation: no optimizer stages, which explain never prints)
        prog = model.formulas
    if latex:
        return latex_document(model, layers, notation, prog)
    return "\n\n".join(layer_text(model, name, notation, prog) for name in layers)


def stage_for(prog, wrt_tensor: str, layer: str) -> Stage:
    """The backward stage of ``layer`` that differentiates a read of ``wrt_tensor``."""
    for s in prog.backward:
        if s.layer == layer and s.out == grad_name(wrt_tensor):
            return s
    raise KeyError(f"no gradient stage for {wrt_tensor} in layer {layer}")
