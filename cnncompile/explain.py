"""Print stages in the lecture's notation: Σ with ranges, guards, the argmax indicator.

The text is made from the same `Stage` objects the backends run, with tensor names shortened
per layer (W, bias, X, Z, P for max pooling's recorded winner, ∂L/∂ for gradients).
"""
from __future__ import annotations

import sympy

from cnncompile.ir.autodiff import derive_read, grad_name
from cnncompile.ir.expr import Stage, tensor_of, var_bounds


def display_names(layer: str, node, prog) -> dict[str, str]:
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


def bound_text(bounds, lower: bool, names) -> str:
    parts = []
    for num, div in bounds:
        e = text(num.to_sympy() if hasattr(num, "to_sympy") else num, names)
        parts.append(e if div == 1 else ("⌈(%s)/%d⌉" if lower else "⌊(%s)/%d⌋") % (e, div))
    unique = list(dict.fromkeys(parts))
    if len(unique) == 1:
        return unique[0]
    return ("max" if lower else "min") + "(" + ", ".join(unique) + ")"


def text(expr, names: dict, latex: bool = False) -> str:
    """An expression with tensors renamed and products written as ·."""
    bases = {b: sympy.IndexedBase(sympy.Symbol(names.get(str(b.label), str(b.label))))
             for b in expr.atoms(sympy.IndexedBase)}
    expr = expr.xreplace(bases) if bases else expr
    if latex:
        return sympy.latex(expr)
    return sympy.sstr(expr).replace("**", "^").replace("*", "·").replace("KroneckerDelta", "δ")


def format_stage(stage: Stage, names: dict, latex: bool = False) -> str:
    out = names.get(stage.out, stage.out)
    lhs = f"{out}[{', '.join(text(e.to_sympy(), names) for e in stage.out_index)}]"
    bounds = var_bounds(stage)
    sums = []
    for v, _ in stage.reduce:
        lo, hi = bounds[v]
        sym = "max" if stage.combine == "max" else "Σ"
        if latex:
            sums.append(f"\\{'max' if stage.combine == 'max' else 'sum'}_{{{v}={bound_text(lo, True, names)}}}"
                        f"^{{{bound_text(hi, False, names)}}}")
        else:
            sums.append(f"{sym}_{{{v}={bound_text(lo, True, names)}..{bound_text(hi, False, names)}}}")
    guards = [f"{g.modulus} | {text(g.expr.to_sympy(), names)}" for g in stage.guards]
    op = " += " if stage.accumulate else " = "
    body = text(stage.body, names, latex)
    line = lhs + op + " ".join(sums) + (" " if sums else "") + body
    if stage.mode != "any":  # batch norm and dropout: which mode runs this stage
        line = f"[{'training' if stage.mode == 'train' else 'eval'}] " + line
    if guards:
        line += "    [only where " + ", ".join(guards) + "; 0 elsewhere]"
    if stage.argmax:
        line += f"    (records {', '.join(names.get(a, a) for a in stage.argmax)}: the winning i, j)"
    return line


def explain_layer(model, layer: str, latex: bool = False) -> str:
    node = next((n for n in model.tracer.graph.ops if n.name == layer), None)
    prog = model.prog
    if node is None:
        known = [n.name for n in model.tracer.graph.ops]
        raise KeyError(f"no layer named {layer!r}; the layers are {known}")
    names = display_names(layer, node, prog)
    fwd = [s for s in prog.forward + prog.loss if s.layer == layer]
    bwd = [s for s in prog.backward if s.layer == layer]
    lines = [f"layer '{layer}' ({node.type}), forward:"]
    lines += ["  " + format_stage(s, names, latex) for s in fwd]
    stats = [s for s in prog.update if s.layer == layer and s.role == "stats"]
    if stats:
        lines.append("running statistics (updated after each training step):")
        lines += ["  " + format_stage(s, names, latex) for s in stats]
    if bwd:
        lines.append("backward (derived, run in train_step):")
        lines += [f"  {through(s.wrt, names)}\n    {format_stage(s, names, latex)}" for s in bwd]
    shown = {s.out for s in bwd}
    extra = [g for s in fwd for g in display_only(prog, s, shown)]
    if extra:
        lines.append("backward (derived for display only: nothing upstream needs these gradients):")
        lines += [f"  {through(s.wrt, names)}\n    {format_stage(s, names, latex)}" for s in extra]
    return "\n".join(lines)


def through(wrt: str, names: dict) -> str:
    if not wrt:
        return "seed:"
    tensor = wrt.split("[")[0]
    return f"∂ through the read {names.get(tensor, tensor)}{wrt[len(tensor):].replace('*', '·')}:"


def display_only(prog, stage: Stage, shown: set) -> list[Stage]:
    """Gradients training skips (the network input's), derived by the same engine to show them."""
    out = []
    for r in stage.reads():
        spec = prog.tensors[tensor_of(r)]
        if spec.dtype == "float" and spec.role in ("input", "activation") and grad_name(spec.name) not in shown:
            out += derive_read(stage, r, False, spec.shape)
    return out


def explain(model, layer=None, latex: bool = False) -> str:
    layers = [layer] if layer is not None else [n.name for n in model.tracer.graph.ops]
    return "\n\n".join(explain_layer(model, name, latex) for name in layers)


def stage_for(prog, wrt_tensor: str, layer: str) -> Stage:
    """The backward stage of ``layer`` that differentiates a read of ``wrt_tensor``."""
    for s in prog.backward:
        if s.layer == layer and s.out == grad_name(wrt_tensor):
            return s
    raise KeyError(f"no gradient stage for {wrt_tensor} in layer {layer}")

