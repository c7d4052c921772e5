"""Tracing: run the user's ``forward`` once on symbolic tensors and record the graph IR."""
from __future__ import annotations

from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import BATCH
from cnncompile.ir.graph import Graph

_stack: list["Tracer"] = []


def current() -> "Tracer":
    if not _stack:
        raise CompileError("layers run only inside cc.compile(), on traced tensors; "
                           "call cc.compile(net, input_shape=...) instead of net(x)")
    return _stack[-1]


class Tracer:
    def __init__(self, net):
        self.graph = Graph()
        self.names = {id(m): n for n, m in net.named_modules() if n}
        self.shared: dict[int, dict] = {}  # a layer called twice reuses its parameters
        self.param_owner: dict[str, tuple] = {}  # param tensor → (layer, local name)
        self.counts: dict[str, int] = {}

    def __enter__(self):
        _stack.append(self)
        return self

    def __exit__(self, *exc):
        _stack.pop()

    def input(self, name, shape, role="input", dtype="float"):
        from .module import TracedTensor
        return TracedTensor(self.graph.add_input(name, (BATCH, *shape), role, dtype), (BATCH, *shape))

    def add_loss(self, kind, inputs, type_name, name, **attrs):
        from .module import TracedTensor, make_node
        out = self.graph.add_op(make_node(name, type_name, kind, attrs, inputs), role="loss")
        return TracedTensor(out, self.graph.shape(out))

    def _add(self, node, inputs, owner=None):
        from .module import TracedTensor
        for k, t in enumerate(inputs):
            if not isinstance(t, TracedTensor):
                raise CompileError(f"layer '{node.name}' ({node.type}) got {type(t).__name__} as input {k}; "
                                   f"layers take the traced tensors that forward() receives")
        out = self.graph.add_op(node, param_tensors=self.shared.get(id(owner)) if owner else None)
        if owner is not None:
            self.shared.setdefault(id(owner), dict(node.params))
            for local, tensor in node.params.items():
                self.param_owner.setdefault(tensor, (owner, local))
        return TracedTensor(out, self.graph.shape(out))

    def add_layer(self, layer, inputs):
        from .module import make_node
        name = self.names.get(id(layer)) or self._fresh(type(layer).__name__.lower())
        attrs = dict(layer.attrs(), training=layer.training)
        return self._add(make_node(name, type(layer).__name__, layer.kind, attrs, inputs), inputs, layer)

    def add_functional(self, kind, inputs, **attrs):
        from .module import make_node
        return self._add(make_node(self._fresh(kind), kind, kind, attrs, inputs), inputs)

    def _fresh(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}_{self.counts[kind]}"
