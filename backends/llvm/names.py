"""How generated functions and kernels are named: after the stage they run first, in words."""
from __future__ import annotations

import re


def kernel_label(kernel) -> str:
    """What a kernel runs, in words: its main stage's layer, role and output, then what it fuses."""
    stages = kernel.stages
    text = stage_label(stages[0])
    return text + (f" + {len(stages) - 1} fused: " + ", ".join(s.out for s in stages[1:]) if len(stages) > 1 else "")


def stage_label(stage) -> str:
    """``layer '0' forward 0.out.conv``: how `explain` and `model.schedule()` name a stage."""
    return f"layer '{stage.layer}' {stage.role} {stage.out}"


def symbol_part(stage, limit: int = 48) -> str:
    """A stage as part of an LLVM function name, in letters, digits and _: its layer, its role and
    its output (named from the layer on where it is the layer's own: ``conv1_forward_out_conv``,
    ``conv1_backward_d_weight``)."""
    grad, out = (True, stage.out[4:]) if stage.out.startswith("dL/d") else (False, stage.out)
    if stage.layer and out.startswith(stage.layer + "."):
        out = out[len(stage.layer) + 1:]
    text = f"{stage.layer}_{stage.role}_{'d_' if grad else ''}{out}"
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9]", "_", text)).strip("_")[:limit]


def function_name(text: str) -> str:
    """The ``@name`` a function's text defines (after its comment lines)."""
    return re.search(r"define (?:internal )?void (@[\w.$-]+)", text)[1]
