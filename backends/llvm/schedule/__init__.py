"""The LLVM backend's schedule: how each stage's loops run on a `Target`, and which stages run
together (docs/architecture.md, §5). Decided apart from code generation, as in Halide:

- `templates`: a register template and loop order per residue class's nest;
- `blocks`: the blocks beside a row or around plain loops (output channels, example pairs,
  kernel columns, unroll-and-jam), each within the target's register budget;
- `vectors`: which nests vectorize (the vector emitter's table decides what a row may hold);
- `fusion`: kernels, their epilogues and sibling sums, per phase;
- `choices`: the tuner's per-kernel overrides of the blocks (empty: the target's rules);
- `lanes`, `parity`: program rewrites the schedule runs on (channel lanes, even/odd copies).

What every backend needs (stages, residue classes, loop boxes, the buffer plan) stays in `ir/`.
"""
from .choices import candidates, fingerprint
from .fusion import Kernel, Scheduler, reductions_closed
from .lanes import pack_lanes
from .parity import pack_parity, parity_name
from .templates import REGISTER_ROWS, Template, template
from .vectors import vector_epilogue

__all__ = ["Kernel", "REGISTER_ROWS", "Scheduler", "Template", "candidates", "fingerprint", "pack_lanes", "pack_parity",
           "parity_name", "reductions_closed", "template", "vector_epilogue"]
