"""torch.nn modules that torch.fx cannot trace, through ``torch.export``.

``torch.fx.symbolic_trace`` refuses Python control flow on tensor values and shapes (``if
x.shape[-1] > 32:``, ``for i in range(x.size(1)):``). ``torch.export`` runs such a forward on an
example input of the traced size, so shape conditions and loops are settled there, and records the
ATen operators it reaches. Those operators are mapped here to the same layers and traced-tensor
operations as the fx frontend's: a convolution, dense layer or batch norm becomes the cnncompile
layer named after the torch module that owns its parameters (``layer1.0.conv1``), so state_dict
names are PyTorch's and the initial values are the module's own; an operator without a mapping
is a `CompileError` naming the node, its target and the supported list.

The export happens when the network is traced (the input size is known only then), once per input
size, in training mode (dropout recorded; the compiled model has its own train/eval modes), with
the batch axis dynamic so that ``x.view(x.size(0), -1)`` stays a flatten.
"""
from __future__ import annotations

import operator

from cnncompile.ir.errors import CompileError
from cnncompile.nn import functional as ccf
from cnncompile.nn.module import Module, TracedTensor

from . import torch_fx as fx


class Param:
    """A parameter or buffer read by a node, by its qualified name; ``transposed`` after ``aten.t``."""

    def __init__(self, fqn: str, transposed: bool = False):
        self.fqn, self.transposed = fqn, transposed

    def __repr__(self):
        return f"{self.fqn}{'.T' if self.transposed else ''}"


class Unused:
    """An output of a node that only feeds buffer updates (batch norm's saved statistics, pool indices)."""

    def __init__(self, what: str):
        self.what = what


def export_program(module, example):
    """``torch.export.export`` of ``module`` on ``example`` in training mode, batch axis dynamic;
    the module's modes are restored."""
    import torch
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        batch = torch.export.Dim("batch")
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    finally:
        for m, mode in modes.items():
            m.training = mode


def bind(node, args, kwargs) -> dict:
    """The node's arguments by the ATen schema's names, defaults filled in."""
    out = {}
    for k, arg in enumerate(node.target._schema.arguments):
        if k < len(args):
            out[arg.name] = args[k]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out


def pair(v):
    """An ATen int list as a cnncompile size (one value for both axes where given once; None where
    empty: a pool's default stride)."""
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) > 1 else v[0] if v else None
    return v


def traced(x, what: str) -> TracedTensor:
    if isinstance(x, Unused):
        raise CompileError(f"{what} reads {x.what}, which cnncompile does not hand out")
    if not isinstance(x, TracedTensor):
        raise CompileError(f"{what} needs a tensor computed from the input, got {x!r}")
    return x


class ExportGraph(Module):
    """A torch module's torch.export graph replayed on traced tensors; its layers are children named
    by the qualified names of the torch modules owning their parameters."""

    def __init__(self, module, where: str, fx_error: Exception | None = None):
        super().__init__()
        object.__setattr__(self, "torch_module", module)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "fx_error", fx_error)
        object.__setattr__(self, "programs", {})  # input shape (no batch axis) → ExportedProgram

    # ----- the export, once per input size -----------------------------------------------------
    def program(self, shape: tuple):
        if shape not in self.programs:
            import torch
            dtype = next((p.dtype for p in self.torch_module.parameters()), torch.float32)
            example = torch.randn(2, *shape, dtype=dtype)
            try:
                program = export_program(self.torch_module, example)
            except Exception as exc:
                because = f"torch.fx could not trace it ({self.fx_error}); " if self.fx_error else ""
                first = (str(exc).splitlines() or [""])[0]
                raise CompileError(f"{self.where} ({type(self.torch_module).__name__}): {because}torch.export "
                                   f"failed too ({type(exc).__name__}: {first}); describe the network in "
                                   f"cnncompile.nn") from exc
            self.check(program)
            self.programs[shape] = program
        return self.programs[shape]

    def check(self, program):
        """Every operator mapped, before anything is traced."""
        for node in program.graph.nodes:
            if node.op == "call_function" and target_name(node.target) not in ATEN:
                raise self.unsupported(node, f"call_function {target_name(node.target)}")
            if node.op not in ("placeholder", "output", "call_function", "get_attr"):
                raise self.unsupported(node, node.op)

    def unsupported(self, node, what: str) -> CompileError:
        return CompileError(f"{self.where} ({type(self.torch_module).__name__}, through torch.export): node "
                            f"'{node.name}' ({what}) has no cnncompile mapping; supported ATen operators: "
                            f"{supported()}")

    # ----- layers owned by torch modules --------------------------------------------------------
    def owner(self, param, local: str, node) -> str:
        """The qualified name of the module holding ``param`` as its ``local`` (``layer1.0.conv1``)."""
        if isinstance(param, TracedTensor):
            raise CompileError(f"it takes a computed tensor as its {local}; only a module's own parameter can "
                               f"be one")
        if not isinstance(param, Param) or not (param.fqn == local or param.fqn.endswith("." + local)):
            raise CompileError(f"it reads {param!r} as its {local}: a parameter used directly in forward; keep it "
                               f"inside a layer (a torch.nn module whose '{local}' it is)")
        return param.fqn[: -len(local) - 1] if param.fqn != local else ""

    def layer(self, prefix: str, make, node):
        """The layer of the torch module at ``prefix`` (one per module: a module called twice shares
        its parameters), created by ``make(submodule)`` with the module's values."""
        if not prefix:
            raise CompileError("it reads the top-level module's own parameters directly; keep them inside a layer "
                               "(a torch.nn.Conv2d, Linear, BatchNorm2d …)")
        if prefix not in self._modules:
            sub = self.torch_module.get_submodule(prefix)
            layer = fx.adopt(make(sub), sub, f"{self.where}.{prefix}")
            object.__setattr__(layer, "training", self.training)
            self._modules[prefix] = layer
            from cnncompile.nn import tracing
            tracer = tracing.current()
            own = tracer.names.get(id(self), "")
            tracer.names[id(layer)] = f"{own}.{prefix}" if own else prefix
        return self._modules[prefix]

    # ----- replay -------------------------------------------------------------------------------
    def forward(self, x):
        from torch.fx.node import map_arg
        program = self.program(tuple(traced(x, f"{self.where}'s input").shape[1:]))
        specs = {s.arg.name: s for s in program.graph_signature.input_specs}
        env = {}
        for node in program.graph.nodes:
            if node.op == "placeholder":
                spec = specs[node.name]
                kind = spec.kind.name
                env[node] = x if kind == "USER_INPUT" else Param(spec.target) if kind in ("PARAMETER", "BUFFER") \
                    else Unused(f"the constant {spec.target}")
                continue
            if node.op == "get_attr":
                env[node] = Unused(f"the constant {node.target}")
                continue
            args, kwargs = map_arg(node.args, env.__getitem__), map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return self.user_outputs(program, args[0])
            name = target_name(node.target)
            a = {"obj": args[0], "index": args[1]} if node.target is operator.getitem else bind(node, args, kwargs)
            try:
                env[node] = ATEN[name](self, node, a)
            except CompileError as exc:
                raise type(exc)(f"{self.where}: node '{node.name}' ({name}): {exc}") from None
        raise CompileError(f"{self.where}: its exported graph has no output")

    def user_outputs(self, program, values):
        outs = [v for v, spec in zip(values, program.graph_signature.output_specs) if spec.kind.name == "USER_OUTPUT"]
        for v in outs:
            traced(v, f"{self.where}'s output")
        return outs[0] if len(outs) == 1 else tuple(outs)


def target_name(target) -> str:
    return "operator.getitem" if target is operator.getitem else str(target)


# ----- the operators ---------------------------------------------------------------------------------
def conv(g, node, a):
    """aten.conv2d / aten.convolution: a Conv2d of the module owning the weight."""
    if a.get("transposed"):
        raise CompileError("transposed convolution has no cnncompile layer")
    if any(a.get("output_padding") or []):
        raise CompileError("output_padding has no cnncompile equivalent")
    w_owner = g.owner(a["weight"], "weight", node)
    if a["bias"] is not None and g.owner(a["bias"], "bias", node) != w_owner:
        raise CompileError(f"its bias {a['bias']!r} belongs to another module than its weight {a['weight']!r}")
    padding = a["padding"] if isinstance(a["padding"], str) else pair(a["padding"])

    def make(sub):
        import cnncompile.nn as cnn
        w = sub.weight
        groups = int(a["groups"])
        return cnn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), pair(a["stride"]), padding,
                          pair(a["dilation"]), groups, a["bias"] is not None)
    return g.layer(w_owner, make, node)(traced(a["input"], "conv2d"))


def dense(g, node, x, weight, bias):
    """A Linear of the module owning ``weight`` (stored (out, in), as torch.nn.Linear's)."""
    w_owner = g.owner(weight, "weight", node)
    if bias is not None and g.owner(bias, "bias", node) != w_owner:
        raise CompileError(f"its bias {bias!r} belongs to another module than its weight {weight!r}")

    def make(sub):
        import cnncompile.nn as cnn
        return cnn.Linear(sub.weight.shape[1], sub.weight.shape[0], bias is not None)
    return g.layer(w_owner, make, node)(traced(x, "linear"))


def linear(g, node, a):
    return dense(g, node, a["input"], a["weight"], a["bias"])


def transposed_weight(w, node):
    if not (isinstance(w, Param) and w.transposed):
        raise CompileError(f"a matrix product with {w!r}: only input @ weight.t() (a dense layer) is supported")
    return Param(w.fqn)


def addmm(g, node, a):
    if a["beta"] != 1 or a["alpha"] != 1:
        raise CompileError(f"beta={a['beta']}, alpha={a['alpha']}: only 1 (a dense layer) is supported")
    return dense(g, node, a["mat1"], transposed_weight(a["mat2"], node), a["self"])


def mm(g, node, a):
    return dense(g, node, a["self"], transposed_weight(a["mat2"], node), None)


def transpose(g, node, a):
    """``weight.t()`` (or ``permute(weight, [1, 0])``) of a dense layer's weight."""
    if "dims" in a and list(a["dims"]) != [1, 0]:
        raise CompileError(f"permute(dims={a['dims']}) is not supported; only a dense weight's transpose")
    w = a["self"]
    if not isinstance(w, Param) or w.transposed:
        raise CompileError(f"transposing {w!r}: only a dense layer's weight (input @ weight.t()) is supported")
    return Param(w.fqn, transposed=True)


def batch_norm(g, node, a):
    """Every ATen form of batch norm: the BatchNorm2d of the module owning the statistics or weights
    (which follows the compiled model's train/eval mode, as torch's module does)."""
    import cnncompile.nn as cnn
    owned = [(a[k], k) for k in ("weight", "running_mean") if a.get(k) is not None]
    if not owned:
        raise CompileError("a batch norm with neither weights nor running statistics has no owner module; use "
                           "torch.nn.BatchNorm2d")
    prefix = g.owner(*owned[0], node)
    for value, local in [(a[k], k) for k in ("bias", "running_var") if a.get(k) is not None] + owned[1:]:
        if g.owner(value, local, node) != prefix:
            raise CompileError(f"its {local} {value!r} belongs to another module than {owned[0][0]!r}")

    def make(sub):
        if type(sub).__name__ == "BatchNorm2d":
            return fx.batchnorm2d(sub)
        channels = getattr(sub, owned[0][1]).shape[0]
        momentum = a.get("momentum", 0.1)
        return cnn.BatchNorm2d(channels, float(a["eps"]), momentum, a.get("weight") is not None,
                               a.get("running_mean") is not None)
    out = g.layer(prefix, make, node)(traced(a["input"], "batch_norm"))
    return out if "cudnn_enabled" in a else (out, Unused("batch norm's saved statistics"),
                                             Unused("batch norm's saved statistics"),
                                             Unused("batch norm's running statistics"),
                                             Unused("batch norm's running statistics"))


def counter(a):
    """``num_batches_tracked + 1`` (in place, or functional with the result written back): the
    compiled batch norm counts its own batches. Other arithmetic on a buffer is refused."""
    buffer = next((v for v in (a["self"], a["other"]) if isinstance(v, Param)), None)
    if buffer is None:
        return None
    if buffer.fqn.endswith("num_batches_tracked"):
        return Unused(f"the counter {buffer.fqn}")
    raise CompileError(f"arithmetic on the parameter or buffer {buffer.fqn} in forward is not supported; keep it "
                       f"inside a layer")


def arith(op):
    def run(g, node, a):
        counted = counter(a)
        if counted is not None:
            return counted
        x, y = a["self"], a["other"]
        if a.get("alpha", 1) != 1:
            y = y * a["alpha"]
        if not isinstance(x, TracedTensor):
            x, y = y, x
            if op is operator.sub:
                return (x * -1.0) + y
        return op(traced(x, "arithmetic"), y if isinstance(y, TracedTensor) else float(y))
    return run


def getitem(g, node, a):
    obj, index = a["obj"], a["index"]
    if not isinstance(obj, tuple):
        raise CompileError(f"indexing {obj!r} ([{index!r}]) is not supported; only whole tensors flow through a "
                           f"network")
    return obj[index]


def max_pool(g, node, a):
    out = ccf.max_pool2d(traced(a["self"], "max_pool2d"), pair(a["kernel_size"]), pair(a["stride"]),
                         pair(a["padding"]), pair(a["dilation"]), bool(a["ceil_mode"]))
    return (out, Unused("max pooling's indices")) if "with_indices" in target_name(node.target) else out


def avg_pool(g, node, a):
    return ccf.avg_pool2d(traced(a["self"], "avg_pool2d"), pair(a["kernel_size"]), pair(a["stride"]),
                          pair(a["padding"]), bool(a["ceil_mode"]), bool(a["count_include_pad"]),
                          a["divisor_override"])


def dropout(kind):
    def run(g, node, a):
        x = traced(a["input"], kind.__name__)
        out = kind(x, float(a["p"]), training=bool(a["train"]))
        return (out, Unused("dropout's mask")) if "native" in target_name(node.target) else out
    return run


def unary(handler, *names):
    """An fx-frontend handler called with the listed schema arguments."""
    return lambda g, node, a: fx.call(handler, target_name(node.target), [a[n] for n in names], {})


def identity(g, node, a):
    return traced(a["self"], "clone")


def elu(g, node, a):
    if a["scale"] != 1 or a["input_scale"] != 1:
        raise CompileError("ELU with scale or input_scale other than 1 (SELU, CELU) is not supported")
    return fx.elu(traced(a["self"], "elu"), a["alpha"])


ATEN = {  # str(OpOverload) → handler(graph, node, bound arguments)
    "aten.conv2d.default": conv, "aten.conv2d.padding": conv, "aten.convolution.default": conv,
    "aten.linear.default": linear, "aten.addmm.default": addmm, "aten.mm.default": mm, "aten.t.default": transpose,
    "aten.batch_norm.default": batch_norm, "aten._native_batch_norm_legit_no_training.default": batch_norm,
    "aten._native_batch_norm_legit_functional.default": batch_norm,
    "aten._native_batch_norm_legit.default": batch_norm,
    "aten.permute.default": transpose,
    "aten.add_.Tensor": arith(operator.add), "aten.add.Tensor": arith(operator.add),
    "aten.add.Scalar": arith(operator.add),
    "aten.sub.Tensor": arith(operator.sub), "aten.mul.Tensor": arith(operator.mul),
    "aten.mul.Scalar": arith(operator.mul), "aten.div.Tensor": arith(operator.truediv),
    "operator.getitem": getitem,
    "aten.relu.default": unary(fx.relu, "self"), "aten.relu_.default": unary(fx.relu, "self"),
    "aten.relu6.default": unary(fx.relu6, "self"),
    "aten.hardtanh.default": unary(fx.hardtanh, "self", "min_val", "max_val"),
    "aten.hardtanh_.default": unary(fx.hardtanh, "self", "min_val", "max_val"),
    "aten.sigmoid.default": unary(fx.sigmoid, "self"), "aten.tanh.default": unary(fx.tanh, "self"),
    "aten.leaky_relu.default": unary(ccf.leaky_relu, "self", "negative_slope"),
    "aten.leaky_relu_.default": unary(ccf.leaky_relu, "self", "negative_slope"),
    "aten.silu.default": unary(fx.silu, "self"), "aten.gelu.default": unary(fx.gelu, "self", "approximate"),
    "aten.elu.default": elu, "aten.softplus.default": unary(fx.softplus, "self", "beta", "threshold"),
    "aten.softmax.int": unary(fx.softmax, "self", "dim"), "aten._softmax.default": unary(fx.softmax, "self", "dim"),
    "aten.log_softmax.int": unary(fx.log_softmax, "self", "dim"),
    "aten._log_softmax.default": unary(fx.log_softmax, "self", "dim"),
    "aten.max_pool2d.default": max_pool, "aten.max_pool2d_with_indices.default": max_pool,
    "aten.avg_pool2d.default": avg_pool,
    "aten.adaptive_avg_pool2d.default": unary(ccf.adaptive_avg_pool2d, "self", "output_size"),
    "aten._adaptive_avg_pool2d.default": unary(ccf.adaptive_avg_pool2d, "self", "output_size"),
    "aten.mean.dim": unary(fx.mean, "self", "dim", "keepdim"),
    "aten.cat.default": unary(fx.cat, "tensors", "dim"),
    "aten.view.default": unary(fx.view, "self", "size"), "aten._unsafe_view.default": unary(fx.view, "self", "size"),
    "aten.reshape.default": unary(fx.reshape, "self", "shape"),
    "aten.flatten.using_ints": unary(fx.flatten, "self", "start_dim", "end_dim"),
    "aten.sym_size.int": unary(fx.size, "self", "dim"),
    "aten.clone.default": identity, "aten.alias.default": identity,
    "aten.dropout.default": dropout(ccf.dropout), "aten.dropout_.default": dropout(ccf.dropout),
    "aten.native_dropout.default": dropout(ccf.dropout), "aten.feature_dropout.default": dropout(ccf.dropout2d),
    "aten.feature_dropout_.default": dropout(ccf.dropout2d),
}


def supported() -> str:
    return ", ".join(sorted(ATEN))
