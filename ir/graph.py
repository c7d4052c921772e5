"""The graph IR: tensors and ops with every shape inferred and checked (a networkx DiGraph on demand).

Tracing a network adds ops here one at a time; each is shape-checked on arrival, so an error
names the first layer that does not fit. Lowering walks the ops in order and collects their
forward stages. The networkx view (``graph.nx``, what pictures and passes walk) is built from the
ops when first asked for, so tracing a network for a warm start never imports networkx.
"""
from __future__ import annotations

from .errors import CompileError
from .expr import Program, Stage, TensorSpec
from .ops import OPS, OpNode
from .ops.base import lower_op


class Graph:
    def __init__(self):
        self._nx = None  # the networkx view, built on first use (`nx`)
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: list[OpNode] = []
        self.op_names: set[str] = set()
        self.inputs: list[str] = []
        self.params: list[str] = []  # trained parameters, in state_dict order
        self.buffers: list[str] = []  # saved, not trained (running statistics)
        self.state_order: list[str] = []  # params and buffers interleaved as PyTorch's state_dict
        self.noise: dict[str, float] = {}  # per-batch random masks → dropout probability

    def add_tensor(self, name: str, shape: tuple, role: str, dtype: str = "float") -> str:
        if name in self.tensors:
            raise CompileError(f"tensor name {name!r} is used twice")
        self.tensors[name] = TensorSpec(name, tuple(shape), role, dtype)
        self._nx = None
        return name

    def add_input(self, name: str, shape: tuple, role: str = "input", dtype: str = "float") -> str:
        self.inputs.append(name)
        return self.add_tensor(name, shape, role, dtype)

    def shape(self, tensor: str) -> tuple:
        return self.tensors[tensor].shape

    def add_op(self, node: OpNode, role: str = "activation", param_tensors: dict | None = None) -> str:
        """Check shapes, create the op's parameters and output; return the output tensor's name.

        ``param_tensors`` reuses existing parameters (a layer called twice shares its weights).
        """
        if node.kind not in OPS:
            raise CompileError(f"layer '{node.name}' ({node.type}) has no definition in the compiler")
        op = OPS[node.kind]
        if self.taken(node.name):
            k = 2
            while self.taken(f"{node.name}#{k}"):
                k += 1
            node.name = f"{node.name}#{k}"
        shapes = [self.shape(t) for t in node.inputs]
        out_shape = op.infer(node, shapes)
        for kind, declared in (("param", op.param_shapes(node, shapes)), ("buffer", op.buffer_shapes(node, shapes))):
            for local, shape in declared.items():
                full = f"{node.name.split('#')[0]}.{local}"
                if param_tensors and local in param_tensors:
                    node.params[local] = param_tensors[local]
                    continue
                node.params[local] = self.add_tensor(full, shape, kind)
                (self.params if kind == "param" else self.buffers).append(full)
                self.state_order.append(full)
        for local, shape in op.noise_shapes(node, shapes).items():
            node.params[local] = self.add_tensor(f"{node.name}.{local}", shape, "noise")
            self.noise[node.params[local]] = float(node.attrs.get("p", 0.5))
        node.output = self.add_tensor(f"{node.name}.out", out_shape, role)
        self.ops.append(node)
        self.op_names.add(node.name)
        self._nx = None
        return node.output

    def taken(self, name: str) -> bool:
        """Whether ``name`` already names an op or a tensor (the graph's nodes share one namespace)."""
        return name in self.tensors or name in self.op_names

    @property
    def nx(self):
        """The graph as a networkx DiGraph: tensor and op nodes, edges from inputs and parameters to
        each op (``position``: the input's place, or "param") and from each op to its output."""
        if self._nx is None:
            import networkx

            g = networkx.DiGraph()
            for spec in self.tensors.values():
                g.add_node(spec.name, kind="tensor", shape=tuple(spec.shape), role=spec.role)
            for node in self.ops:
                g.add_node(node.name, kind="op", op=node)
                for pos, t in enumerate(node.inputs):
                    g.add_edge(t, node.name, position=pos)
                for t in node.params.values():
                    g.add_edge(t, node.name, position="param")
                g.add_edge(node.name, node.output)
            self._nx = g
        return self._nx

    def lower(self, outputs: list[str], loss: str = "") -> Program:
        """Forward stages of every op, split into the network's part and the loss's part (each op's
        stages built once per kind, attributes and shapes: `ops.base.lower_op`)."""
        prog = Program(inputs=[t for t in self.inputs if self.tensors[t].role == "input"],
                       labels=[t for t in self.inputs if self.tensors[t].role == "label"],
                       outputs=list(outputs), params=list(self.params), buffers=list(self.buffers),
                       state_names=list(self.state_order), noise=dict(self.noise), loss_name=loss)
        for spec in self.tensors.values():
            prog.add_tensor(spec)
        for node in self.ops:
            op = OPS[node.kind]
            shapes = [self.shape(t) for t in node.inputs]
            for stage in lower_op(op, node, shapes, self.shape(node.output)):
                self._declare(prog, stage)
                part = {"loss": prog.loss, "stats": prog.update}.get(stage.role, prog.forward)
                part.append(stage)
        return prog

    def _declare(self, prog: Program, stage: Stage) -> None:
        """Intermediate buffers a stage writes (``Zc``, argmax records) get their specs here."""
        if stage.out not in prog.tensors:
            prog.add_tensor(TensorSpec(stage.out, written_shape(stage),
                                       "loss" if stage.role == "loss" else "activation"))
        for name in stage.argmax:
            prog.add_tensor(TensorSpec(name, prog.tensors[stage.out].shape, "argmax", "index"))


def written_shape(stage: Stage) -> tuple:
    """The extent of each output axis: a variable's own extent, or the interval its map covers."""
    extents = dict(stage.domain)
    shape = []
    for e in stage.out_index:
        if len(e.coeffs) == 1 and e.coeffs[0][1] == 1 and e.const == 0:
            shape.append(extents[e.coeffs[0][0]])
        else:
            shape.append(e.interval(extents)[1] + 1)
    return tuple(shape)
