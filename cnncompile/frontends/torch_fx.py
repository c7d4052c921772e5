"""torch.nn modules as cnncompile networks.

A torch module is traced with ``torch.fx``. Each leaf layer it calls (Conv2d, BatchNorm2d, ReLU6, …)
becomes the cnncompile layer with the same arguments, registered under the torch module's own
qualified name, so parameters keep PyTorch's ``state_dict`` names; the graph's functions and methods
(``F.relu``, ``torch.cat``, ``x.view(x.size(0), -1)``, ``+``, ``x.mean((2, 3))``, …) are replayed on
traced tensors. A converted layer's initial values are the torch module's own parameters and
buffers. A node without a mapping is a `CompileError` naming it, raised when the module is
converted: nothing is ever left out. A network compiled itself whose forward torch.fx cannot
trace (Python control flow on shapes) goes through torch.export instead (`torch_export.py`).

torch is not imported here: a torch module can only reach this file if torch is loaded already.
"""
from __future__ import annotations

import inspect
import operator
import sys
from collections import OrderedDict

import numpy as np

import cnncompile.nn as cnn
from cnncompile.ir.errors import CompileError
from cnncompile.nn import functional as ccf
from cnncompile.nn.module import Module, ModuleList, TracedTensor, is_torch_module


def as_network(net):
    """``net`` itself if it is a cnncompile module; a torch.nn.Module converted; anything else unchanged."""
    return convert(net, export=True) if is_torch_module(net) else net


# ----- leaf layers ---------------------------------------------------------------------------------
def layer_class(name: str):
    """cnncompile's layer of that name (looked up when needed: some arrive with newer versions)."""
    cls = getattr(cnn, name, None)
    if cls is None:
        raise CompileError(f"torch.nn.{name} has no cnncompile layer in this version; replace it with a "
                           f"supported layer ({', '.join(sorted(LEAVES))})")
    return cls


def batchnorm2d(m):
    extra = {"bias": False} if m.affine and m.bias is None else {}
    return cnn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, **extra)


LEAVES = {  # torch.nn class name → the cnncompile layer with the same arguments
    "Conv2d": lambda m: cnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                   m.groups, m.bias is not None, m.padding_mode),
    "Linear": lambda m: cnn.Linear(m.in_features, m.out_features, m.bias is not None),
    "BatchNorm2d": batchnorm2d,
    "MaxPool2d": lambda m: cnn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, m.return_indices,
                                         m.ceil_mode),
    "AvgPool2d": lambda m: cnn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                         m.divisor_override),
    "AdaptiveAvgPool2d": lambda m: cnn.AdaptiveAvgPool2d(m.output_size),
    "AdaptiveMaxPool2d": lambda m: cnn.AdaptiveMaxPool2d(m.output_size, m.return_indices),
    "ReLU": lambda m: cnn.ReLU(),
    "ReLU6": lambda m: layer_class("ReLU6")(),
    "Hardtanh": lambda m: layer_class("Hardtanh")(m.min_val, m.max_val),
    "LeakyReLU": lambda m: cnn.LeakyReLU(m.negative_slope),
    "Sigmoid": lambda m: cnn.Sigmoid(),
    "Tanh": lambda m: cnn.Tanh(),
    "SiLU": lambda m: layer_class("SiLU")(),
    "GELU": lambda m: layer_class("GELU")(m.approximate),
    "ELU": lambda m: layer_class("ELU")(m.alpha),
    "Softplus": lambda m: layer_class("Softplus")(m.beta, m.threshold),
    "Softmax": lambda m: cnn.Softmax(m.dim),
    "LogSoftmax": lambda m: cnn.LogSoftmax(m.dim),
    "Flatten": lambda m: cnn.Flatten(m.start_dim, m.end_dim),
    "Identity": lambda m: cnn.Identity(),
    "Dropout": lambda m: cnn.Dropout(m.p),
    "Dropout2d": lambda m: cnn.Dropout2d(m.p),
}


def leaf_maker(module):
    """The converter for a torch.nn layer of exactly a type in `LEAVES` (a subclass may change forward)."""
    torch = sys.modules["torch"]
    name = type(module).__name__
    return LEAVES[name] if name in LEAVES and type(module) is getattr(torch.nn, name, None) else None


class TorchValues:
    """A converted layer's initial values: the torch module's own parameters and buffers, read
    whenever the model is (re)initialised (``cc.compile``, ``model.reset_parameters``)."""

    def __init__(self, module, where: str):
        self.module, self.where = module, where

    def __call__(self, rng, shapes: dict) -> dict:
        values = {}
        for local, shape in shapes.items():
            tensor = getattr(self.module, local, None)
            if tensor is None:
                raise CompileError(f"{self.where}: the compiled layer needs '{local}', which the torch "
                                   f"{type(self.module).__name__} does not have")
            value = tensor.detach().cpu().numpy()
            if value.shape != tuple(shape):
                raise CompileError(f"{self.where}.{local}: the torch module holds shape {value.shape}, the "
                                   f"compiled layer needs {tuple(shape)}")
            values[local] = value
        return values


def adopt(layer: Module, module, where: str) -> Module:
    object.__setattr__(layer, "init_params", TorchValues(module, where))
    object.__setattr__(layer, "torch_type", type(module).__name__)
    return layer


def convert(module, where: str = "", export: bool = False) -> Module:
    """``module`` as a cnncompile module: a leaf layer with its values, a ModuleList of converted
    modules, or its fx graph replayed (`TorchGraph`). ``export``: where fx cannot trace it, its
    torch.export graph (`ExportGraph`, exported when traced: the network compiled itself);
    otherwise (a torch module inside a cnncompile network) it is refused at once."""
    if isinstance(module, Module):
        return module
    torch = sys.modules["torch"]
    where = where or type(module).__name__
    make = leaf_maker(module)
    if make is not None:
        return adopt(make(module), module, where)
    if isinstance(module, torch.nn.ModuleList):
        return ModuleList(convert(m, f"{where}.{k}") for k, m in enumerate(module))
    try:
        return TorchGraph(module, where)
    except FxTraceError as exc:  # Python control flow on shapes: torch.export settles it per input size
        if not export:
            raise FxTraceError(f"{exc}; compiled on its own, cc.compile(module, ...), it would be tried with "
                               f"torch.export") from exc.__cause__
        from .torch_export import ExportGraph
        return ExportGraph(module, where, exc.__cause__ or exc)


# ----- functions and methods of an fx graph (and of torch calls on traced tensors) -----------------
def tensor(x, what: str) -> TracedTensor:
    if not isinstance(x, TracedTensor):
        raise CompileError(f"{what} needs a tensor, got {type(x).__name__}")
    return x


def add(input, other, *, alpha=1):
    return input + (other if alpha == 1 else other * alpha)


def sub(input, other, *, alpha=1):
    return input - (other if alpha == 1 else other * alpha)


def mul(input, other):
    return input * other


def truediv(input, other):
    return input / other


def getitem(obj, index):
    if isinstance(obj, TracedTensor):
        raise CompileError(f"indexing or slicing a tensor ([{index!r}]) is not supported; only whole tensors "
                           f"flow through a network")
    return obj[index]


def get_attribute(obj, name):
    if isinstance(obj, TracedTensor) and name not in ("shape",):
        raise CompileError(f"the tensor attribute .{name} is not supported (only .shape)")
    return getattr(obj, name)


def relu(input, inplace=False):
    return ccf.relu(tensor(input, "relu"))


def relu6(input, inplace=False):
    return layer_class("ReLU6")()(tensor(input, "relu6"))


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return layer_class("Hardtanh")(min_val, max_val)(tensor(input, "hardtanh"))


def sigmoid(input):
    return ccf.sigmoid(tensor(input, "sigmoid"))


def tanh(input):
    return ccf.tanh(tensor(input, "tanh"))


def silu(input, inplace=False):
    return layer_class("SiLU")()(tensor(input, "silu"))


def gelu(input, approximate="none"):
    return layer_class("GELU")(approximate)(tensor(input, "gelu"))


def elu(input, alpha=1.0, inplace=False):
    return layer_class("ELU")(alpha)(tensor(input, "elu"))


def softplus(input, beta=1.0, threshold=20.0):
    return layer_class("Softplus")(beta, threshold)(tensor(input, "softplus"))


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    return cnn.Softmax(dim)(tensor(input, "softmax"))


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    return cnn.LogSoftmax(dim)(tensor(input, "log_softmax"))


def flatten(input, start_dim=0, end_dim=-1):
    """torch's flatten (start_dim defaults to 0 there); the batch axis must stay first."""
    x = tensor(input, "flatten")
    if start_dim % x.dim() == 0:
        raise CompileError(f"flatten(start_dim={start_dim}) would merge the batch axis; use torch.flatten(x, 1) "
                           f"(or x.flatten(1))")
    return x.flatten(start_dim, end_dim)


def view(input, *shape):
    return tensor(input, "view").view(*shape)


def reshape(input, shape):
    return tensor(input, "reshape").view(shape)


def size(input, dim=None):
    return tensor(input, "size").size(dim)


def dim(input):
    return tensor(input, "dim").dim()


def contiguous(input, memory_format=None):
    return tensor(input, "contiguous")


def mean(input, dim=None, keepdim=False, *, dtype=None):
    """Only the spatial mean of a feature map, ``x.mean((2, 3))``: global average pooling."""
    x = tensor(input, "mean")
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if x.dim() == 4 and all(isinstance(d, int) for d in dims) and sorted(d % 4 for d in dims) == [2, 3]:
        pooled = ccf.adaptive_avg_pool2d(x, 1)
        return pooled if keepdim else pooled.flatten(1)
    raise CompileError(f"mean(dim={dim!r}) of a tensor of shape {x.shape}: only the spatial mean of a feature "
                       f"map, x.mean((2, 3)) (global average pooling), is supported")


def cat(tensors, dim=0):
    """Channel concatenation only: cc.cat(tensors, dim=1)."""
    import cnncompile
    tensors = list(tensors)
    rank = tensors[0].dim() if tensors and isinstance(tensors[0], TracedTensor) else None
    if rank is None or not isinstance(dim, int) or dim % rank != 1:
        raise CompileError(f"cat over dim={dim!r}: cnncompile concatenates feature maps along their channels "
                           f"only, as cc.cat(tensors, dim=1) does")
    return cnncompile.cat(tensors, 1)


def function_table() -> list[tuple[str, object, object]]:
    """(name shown in messages, the torch callable, its handler), for the torch loaded now."""
    torch = sys.modules["torch"]
    F = torch.nn.functional
    rows = [("+", operator.add, add), ("+=", operator.iadd, add), ("-", operator.sub, sub),
            ("-=", operator.isub, sub), ("*", operator.mul, mul), ("*=", operator.imul, mul),
            ("/", operator.truediv, truediv), ("[]", operator.getitem, getitem), ("getattr", getattr, get_attribute)]
    named = {  # torch name → handler
        "torch.add": add, "torch.sub": sub, "torch.mul": mul, "torch.relu": relu, "torch.relu_": relu,
        "torch.sigmoid": sigmoid, "torch.tanh": tanh, "torch.flatten": flatten, "torch.reshape": reshape,
        "torch.cat": cat, "torch.concat": cat, "torch.concatenate": cat, "torch.mean": mean,
        "F.relu": relu, "F.relu_": relu, "F.relu6": relu6, "F.hardtanh": hardtanh, "F.sigmoid": sigmoid,
        "F.tanh": tanh, "F.leaky_relu": ccf.leaky_relu, "F.silu": silu, "F.gelu": gelu, "F.elu": elu,
        "F.softplus": softplus, "F.softmax": softmax, "F.log_softmax": log_softmax,
        "F.max_pool2d": ccf.max_pool2d, "F.avg_pool2d": ccf.avg_pool2d,
        "F.adaptive_avg_pool2d": ccf.adaptive_avg_pool2d, "F.adaptive_max_pool2d": ccf.adaptive_max_pool2d,
        "F.dropout": ccf.dropout, "F.dropout2d": ccf.dropout2d,
    }
    for name, handler in named.items():
        owner, attr = (F, name[2:]) if name.startswith("F.") else (torch, name[6:])
        fn = getattr(owner, attr, None)
        if fn is not None:
            rows.append((name.replace("F.", "torch.nn.functional."), fn, handler))
    return rows


METHODS = {  # Tensor method → handler (self first)
    "relu": relu, "relu_": relu, "sigmoid": sigmoid, "tanh": tanh, "view": view, "reshape": view,
    "flatten": flatten, "size": size, "dim": dim, "mean": mean, "contiguous": contiguous,
    "add": add, "add_": add, "sub": sub, "sub_": sub, "mul": mul, "mul_": mul,
}


def supported() -> str:
    return (f"modules: {', '.join(sorted(LEAVES))}, torch.nn.Sequential/ModuleList and modules of these; "
            f"functions: {', '.join(name for name, _, _ in function_table())}; "
            f"tensor methods: {', '.join(sorted(METHODS))}")


def find_handler(func):
    for _, fn, handler in function_table():
        if fn is func:
            return handler
    return None


def call(handler, what: str, args, kwargs):
    """``handler(*args, **kwargs)``, a call that does not bind to it a CompileError naming ``what``."""
    try:
        inspect.signature(handler).bind(*args, **kwargs)
    except TypeError as exc:
        raise CompileError(f"{what}: {exc}") from None
    return handler(*args, **kwargs)


def describe(func) -> str:
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module else name


def call_torch_function(func, args, kwargs):
    """A torch function (or Tensor method) called on traced tensors inside a cnncompile forward."""
    handler = find_handler(func)
    torch = sys.modules["torch"]
    name = getattr(func, "__name__", "")
    if handler is None and name in METHODS and getattr(torch.Tensor, name, None) is func:
        handler = METHODS[name]
    if handler is None:
        hint = " (channel concatenation is cc.cat(tensors, dim=1))" if "cat" in name else ""
        raise CompileError(f"{describe(func)} has no cnncompile mapping on traced tensors{hint}; supported: "
                           f"{supported()}")
    return call(handler, describe(func), args, kwargs)


# ----- whole modules: the fx graph replayed ---------------------------------------------------------
class FxTraceError(CompileError):
    """torch.fx could not trace a forward (the caller falls back to torch.export)."""


def fx_trace(module, where: str):
    """The module's fx graph, traced in training mode (so ``F.dropout(x, training=self.training)`` is
    recorded: the compiled model has its own train/eval modes); the module's modes are restored."""
    import torch.fx
    modes = {m: m.training for m in module.modules()}
    module.train()
    try:
        return torch.fx.symbolic_trace(module)
    except Exception as exc:  # fx refuses data-dependent control flow, unsupported Python, …
        raise FxTraceError(f"{where} ({type(module).__name__}): torch.fx cannot trace its forward "
                           f"({type(exc).__name__}: {exc}); write the data-dependent part without Python "
                           f"control flow on tensors, or describe the network in cnncompile.nn") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode


class TorchGraph(Module):
    """A torch module's fx graph, replayed on traced tensors; its leaf layers are children named
    by their qualified names in the torch module (``layer1.0.conv1``), so parameter names match."""

    def __init__(self, module, where: str):
        super().__init__()
        object.__setattr__(self, "torch_module", module)
        object.__setattr__(self, "where", where)
        gm = fx_trace(module, where)
        object.__setattr__(self, "fx_graph", gm.graph)
        handlers = {}
        for node in gm.graph.nodes:
            handlers[node] = self.handler(node, gm)
        object.__setattr__(self, "handlers", handlers)

    def unsupported(self, node, what: str) -> CompileError:
        return CompileError(f"{self.where} ({type(self.torch_module).__name__}): node '{node.name}' "
                            f"({node.op} {what}) has no cnncompile mapping; supported: {supported()}")

    def handler(self, node, gm):
        """What runs the node, decided (and refused) now, before anything is traced."""
        if node.op in ("placeholder", "output"):
            return None
        if node.op == "call_module":
            if node.target not in self._modules:
                sub = gm.get_submodule(node.target)
                make = leaf_maker(sub)
                if make is None:
                    raise self.unsupported(node, f"{node.target}: {type(sub).__module__}.{type(sub).__name__}")
                self._modules[node.target] = adopt(make(sub), sub, f"{self.where}.{node.target}")
            return self._modules[node.target]
        if node.op == "call_function":
            handler = find_handler(node.target)
            if handler is None:
                raise self.unsupported(node, describe(node.target))
            return handler
        if node.op == "call_method" and node.target in METHODS:
            return METHODS[node.target]
        what = f"Tensor.{node.target}" if node.op == "call_method" else f"{node.target} (a parameter or buffer " \
            f"read directly in forward: keep it inside a layer)"
        raise self.unsupported(node, what)

    def forward(self, *inputs):
        from torch.fx.node import map_arg
        env, given = {}, list(inputs)
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                if given:
                    env[node] = given.pop(0)
                elif node.args:  # a default argument
                    env[node] = node.args[0]
                else:
                    raise CompileError(f"{self.where}: forward() needs the argument '{node.target}', which the "
                                       f"compiled network does not pass (it passes one input)")
                continue
            args, kwargs = map_arg(node.args, env.__getitem__), map_arg(node.kwargs, env.__getitem__)
            if node.op == "output":
                return args[0]
            run = self.handlers[node]
            if node.op == "call_module":
                env[node] = run(*args, **kwargs)
                continue
            try:
                env[node] = call(run, node.target if node.op == "call_method" else describe(node.target),
                                 args, kwargs)
            except CompileError as exc:  # (a ShapeError stays one)
                raise type(exc)(f"{self.where}: node '{node.name}' ({node.op}): {exc}") from None
        raise CompileError(f"{self.where}: its fx graph has no output")


# ----- the way back: a compiled model's state for the torch module -----------------------------------
def to_torch_state_dict(model) -> "OrderedDict":
    """The model's parameters and buffers as torch tensors under PyTorch's names. For a model
    compiled from a torch module: in that module's order and dtypes, with the entries its forward
    never reads (modules it does not call) taken from the module as they are, so
    ``torch_module.load_state_dict(model.to_torch_state_dict())`` works with strict=True."""
    import torch
    state = OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in model.state_dict().items())
    source = getattr(model.net, "torch_module", None)
    if source is None:
        return state
    out = OrderedDict()
    for name, value in source.state_dict().items():
        mine = state.pop(name, None)
        out[name] = value.detach().clone() if mine is None else mine.to(value.dtype)
    out.update(state)
    return out
