"""``cc.from_onnx(path)``: an ONNX CNN as a trainable `cnncompile.nn` network.

Every node becomes a layer (or a traced tensor operation) of an `OnnxNet`; initializers that feed
Conv, Gemm/MatMul and BatchNormalization become its parameters and buffers, under their own names
where they read as PyTorch's (``layer1.0.conv1.weight``), else under a sanitized node name. The
file's values are the layers' initial values: ``cc.compile`` (and ``reset_parameters``) load them.

ONNX's conventions are resolved when the network is traced, where the input size is known:
``auto_pad`` and asymmetric pads become cnncompile's symmetric padding, ``padding='same'``, or a
ceil-mode window count where that computes the same windows; otherwise the node is refused with
a `CompileError` that says why. Shape arithmetic (``Shape → Gather → Concat → Reshape``, as
``x.view(x.size(0), -1)`` exports) is evaluated on the traced shapes.
"""
from __future__ import annotations

import math
import operator
import re
from pathlib import Path

import numpy as np

from cnncompile.ir.errors import CompileError
from cnncompile.ir.expr import BATCH

from . import nn
from .nn.module import Module, TracedTensor


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise CompileError("importing ONNX needs the onnx package: pip install 'cnncompile[onnx]'") from None
    return onnx, numpy_helper


class OnnxNet(Module):
    """The imported network: layers named after the ONNX initializers, a forward that runs the
    ONNX graph's steps on traced tensors. ``input_shape``: the file's input without the batch axis
    (None where the file leaves a size open)."""

    def __init__(self, steps, constants, input_name, output_names, input_shape):
        super().__init__()
        object.__setattr__(self, "_steps", steps)
        object.__setattr__(self, "_constants", constants)
        object.__setattr__(self, "_io", (input_name, list(output_names)))
        object.__setattr__(self, "input_shape", input_shape)

    def forward(self, x):
        input_name, outputs = self._io
        env = dict(self._constants)
        env[input_name] = x
        for step in self._steps:
            step.run(env)
        values = [env[name] for name in outputs]
        for name, v in zip(outputs, values):
            if not isinstance(v, TracedTensor):
                raise CompileError(f"ONNX output '{name}' is a constant, not computed from the input")
        return values[0] if len(values) == 1 else {name: v for name, v in zip(outputs, values)}


class Step:
    """One ONNX node as run at trace time: ``fn(env, node)`` reads its inputs from ``env`` and binds its outputs."""

    def __init__(self, node, fn, attrs=None):
        self.node, self.fn, self.attrs = node, fn, attrs or {}

    def run(self, env):
        node = self.node
        try:
            if node.op_type in FOLDABLE and not any(isinstance(env.get(n), TracedTensor) for n in node.input):
                values = [env.get(n) if n else None for n in node.input]
                env[node.output[0]] = FOLDABLE[node.op_type](values, self.attrs)
                return
            self.fn(env, node)
        except CompileError as exc:
            if str(exc).startswith("ONNX node"):
                raise
            raise CompileError(f"{describe(self.node)}: {exc}") from None


def describe(node) -> str:
    return f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"


def sanitize(name: str) -> str:
    """A layer name from an ONNX name: letters, digits, '_' and '.' between non-empty parts."""
    parts = [re.sub(r"[^0-9A-Za-z_]+", "_", p).strip("_") for p in re.split(r"[.]", name)]
    return ".".join(p for p in parts if p) or "node"


# ----- reading the file ------------------------------------------------------------------------

def attributes(onnx, node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def load_proto(source):
    onnx, _ = _onnx()
    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise CompileError(f"from_onnx: no such file: {source}")
        return onnx.load(str(source))
    if isinstance(source, (bytes, bytearray)):
        return onnx.load_from_string(bytes(source))
    if hasattr(source, "graph"):
        return source
    raise CompileError(f"from_onnx expects a path, bytes or an onnx.ModelProto, got {type(source).__name__}")


class Importer:
    """Builds the layers (at import) and the steps (run at trace time) node by node."""

    def __init__(self, proto):
        self.onnx, self.numpy_helper = _onnx()
        self.proto, self.graph = proto, proto.graph
        self.constants = {t.name: self.numpy_helper.to_array(t) for t in self.graph.initializer}
        self.layers: dict[str, Module] = {}
        self.by_params: dict[tuple, Module] = {}
        self.steps: list[Step] = []
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.fused_adds: dict[str, str] = {}  # Add node output → the MatMul's output it completes
        self.param_inputs: set[str] = set()  # initializers held by layers (not needed when tracing)

    # ----- names and layers ---------------------------------------------------------------------
    def layer_name(self, node, params: dict[str, str]) -> str:
        """The prefix the initializers share (``conv1`` of ``conv1.weight``, ``conv1.bias``), else
        the node's sanitized name; unique among the layers."""
        prefixes = {name[: -len(local) - 1] for local, name in params.items() if name.endswith("." + local)}
        base = None
        if len(prefixes) == 1 and all(name.endswith("." + local) for local, name in params.items()):
            base = sanitize(prefixes.pop())
        base = base or sanitize(node.name or f"{node.op_type}_{len(self.layers)}")
        name, k = base, 1
        while name in self.layers:
            k += 1
            name = f"{base}_{k}"
        return name

    def add_layer(self, node, layer, params: dict[str, str] | None = None, values: dict | None = None):
        """Register ``layer`` under its name; ``values``: its parameters' initial values (the file's)."""
        key = (type(layer).__name__, tuple(sorted((params or {}).items())))
        if params and key in self.by_params:  # the same initializers again: one layer called twice
            return self.by_params[key]
        name = self.layer_name(node, params or {})
        if values:
            self.param_inputs.update((params or {}).values())
            arrays = {k: np.asarray(v, np.float32) for k, v in values.items()}
            object.__setattr__(layer, "init_params", lambda rng, shapes, arrays=arrays: stored(arrays, shapes, name))
        self.layers[name] = layer
        if params:
            self.by_params[key] = layer
        return layer

    def constant(self, node, k: int, what: str) -> np.ndarray:
        name = node.input[k] if k < len(node.input) else ""
        if name not in self.constants:
            raise CompileError(f"{describe(node)}: its {what} ('{name}') must be an initializer or constant")
        return self.constants[name]

    # ----- the walk -----------------------------------------------------------------------------
    def run(self):
        inputs = [i for i in self.graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise CompileError(f"from_onnx: the graph must have exactly one input (the images), it has "
                               f"{[i.name for i in inputs]}")
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise CompileError(f"{describe(node)}: operators of domain '{node.domain}' are not supported")
            if self.fold(node):
                continue
            handler = HANDLERS.get(node.op_type)
            if handler is None:
                raise CompileError(f"{describe(node)}: ONNX operator {node.op_type} has no cnncompile equivalent; "
                                   f"supported: {', '.join(sorted(set(HANDLERS) | set(FOLDABLE)))}")
            attrs = attributes(self.onnx, node)
            fn = handler(self, node, attrs)
            if fn is not None:
                self.steps.append(Step(node, fn, attrs))
        dims = inputs[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
        constants = {k: v for k, v in self.constants.items() if k not in self.param_inputs}
        net = OnnxNet(self.steps, constants, inputs[0].name, [o.name for o in self.graph.output],
                      None if None in shape else shape)
        for name, layer in self.layers.items():
            net._modules[name] = layer  # names may hold dots: they are the state_dict prefixes
        return net

    def fold(self, node) -> bool:
        """Constant nodes, and shape arithmetic whose inputs are all known now, are evaluated at
        import; shape operators on a traced tensor's shape (``Shape``) run at trace time."""
        if node.op_type == "Constant":
            self.constants[node.output[0]] = constant_value(self.onnx, self.numpy_helper, node)
            return True
        if node.op_type in FOLDABLE and node.op_type != "Shape" and all(n in self.constants for n in node.input if n):
            values = [self.constants[n] if n else None for n in node.input]
            self.constants[node.output[0]] = FOLDABLE[node.op_type](values, attributes(self.onnx, node))
            return True
        if node.op_type in SHAPE_OPS:
            self.steps.append(Step(node, fold_step(FOLDABLE[node.op_type], attributes(self.onnx, node))))
            return True
        return False


def stored(arrays: dict, shapes: dict, layer: str) -> dict:
    """The file's values as a layer's initial parameters (checked against the traced shapes)."""
    for local, shape in shapes.items():
        if arrays[local].shape != tuple(shape):
            raise CompileError(f"layer '{layer}': the ONNX file's {local} has shape {arrays[local].shape}, "
                               f"the traced layer needs {tuple(shape)}")
    return {local: arrays[local] for local in shapes}


def constant_value(onnx, numpy_helper, node) -> np.ndarray:
    a = attributes(onnx, node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key in ("value_float", "value_int"):
        if key in a:
            return np.array(a[key])
    for key in ("value_floats", "value_ints"):
        if key in a:
            return np.array(list(a[key]))
    raise CompileError(f"{describe(node)}: only tensor, float and int constants are supported")


# ----- shape arithmetic (the batch axis is BATCH, an object in int arrays) ------------------------

def fold_step(fn, attrs):
    def run(env, node):
        values = []
        for n in node.input:
            v = env.get(n) if n else None
            if isinstance(v, TracedTensor) and node.op_type != "Shape":
                raise CompileError(f"{node.op_type} on a computed tensor is not supported; only on shapes "
                                   f"and constants")
            values.append(v)
        env[node.output[0]] = fn(values, attrs)
    return run


def _shape(values, a):
    shape = np.array(list(values[0].shape), dtype=object)
    start, end = a.get("start", 0), a.get("end", len(shape))
    return shape[start:end]


def _axes(values, a, k=1):
    return [int(v) for v in (values[k] if len(values) > k and values[k] is not None else a.get("axes", []))]


def _unsqueeze(values, a):
    out = np.asarray(values[0])
    for ax in sorted(_axes(values, a)):
        out = np.expand_dims(out, ax if ax >= 0 else ax + out.ndim + 1)
    return out


def _squeeze(values, a):
    axes = _axes(values, a)
    return np.squeeze(np.asarray(values[0]), axis=tuple(axes) if axes else None)


def _slice(values, a):
    data = np.asarray(values[0])
    starts, ends = (values[1], values[2]) if len(values) > 2 else (a["starts"], a["ends"])
    axes = values[3] if len(values) > 3 and values[3] is not None else a.get("axes", range(len(starts)))
    steps = values[4] if len(values) > 4 and values[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(max(min(e, 2 ** 62), -2 ** 62)), int(st))
    return data[tuple(index)]


def _arith(op):
    def fn(values, a):
        x, y = np.asarray(values[0]), np.asarray(values[1])
        if x.dtype == object or y.dtype == object:
            raise CompileError("arithmetic on the batch size is not supported")
        return op(x, y)
    return fn


FOLDABLE = {
    "Shape": _shape,
    "Gather": lambda v, a: np.take(np.asarray(v[0]), np.asarray(v[1]).astype(np.int64), axis=a.get("axis", 0)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda v, a: np.concatenate([np.atleast_1d(np.asarray(x)) for x in v], axis=a.get("axis", 0)),
    "Cast": lambda v, a: np.asarray(v[0]),
    "Slice": _slice,
    "Mul": _arith(np.multiply), "Div": _arith(np.floor_divide), "Add": _arith(np.add), "Sub": _arith(np.subtract),
}
SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Cast", "Slice")  # always shape arithmetic


# ----- geometry ----------------------------------------------------------------------------------

def onnx_pads(a: dict, size: tuple, kernel, stride, dilation, what: str) -> list[tuple[int, int]]:
    """(before, after) per spatial axis from ``pads`` or ``auto_pad`` at input size ``size``."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for n, k, s, d in zip(size, kernel, stride, dilation):
            total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0), (0, 0)]
    if auto != "NOTSET":
        raise CompileError(f"{what}: auto_pad={auto!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    return [(pads[0], pads[2]), (pads[1], pads[3])]


def window_count(n, k, s, d, before, after, ceil_mode) -> int:
    """Output length of ONNX's window, PyTorch's ceil rule included (the last window starts inside
    the input or the left padding)."""
    span = d * (k - 1) + 1
    out = (n + before + after - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + before:
        out -= 1
    return out


def static_padding(a: dict):
    """The padding as known before the input size (symmetric explicit pads), for the layer's repr;
    the trace sets the padding that applies."""
    pads = list(a.get("pads", [0, 0, 0, 0]))
    auto = a.get("auto_pad", b"NOTSET")
    if auto in (b"NOTSET", "NOTSET") and pads[:2] == pads[2:]:
        return tuple(pads[:2])
    return 0


def conv_padding(pads, size, kernel, stride, dilation):
    """cnncompile's Conv2d padding computing the same windows as ONNX's (before, after) pads, or None."""
    if all(b == a for b, a in pads):
        return tuple(b for b, _ in pads)
    if stride == (1, 1) and all((b, a) == (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                                for (b, a), k, d in zip(pads, kernel, dilation)):
        return "same"
    # the windows start at s·x − before either way: symmetric `before` works where the count agrees
    if all(window_count(n, k, s, d, b, a, False) == window_count(n, k, s, d, b, b, False)
           for n, k, s, d, (b, a) in zip(size, kernel, stride, dilation, pads)):
        return tuple(b for b, _ in pads)
    return None


def spatial(x, node) -> tuple[int, int]:
    if not isinstance(x, TracedTensor) or len(x.shape) != 4:
        raise CompileError(f"{describe(node)} expects a 4-D (N, C, H, W) tensor, got "
                           f"{getattr(x, 'shape', type(x).__name__)}")
    return x.shape[2], x.shape[3]


def ints2(a, key, default):
    v = tuple(a.get(key, default))
    if len(v) != 2:
        raise CompileError(f"{key}={list(v)}: only 2-D (images) is supported")
    return v


# ----- handlers: (importer, node, attrs) → the step that runs at trace time ------------------------

def traced(env, node, k=0):
    v = env.get(node.input[k])
    if not isinstance(v, TracedTensor):
        raise CompileError(f"{describe(node)}: input {k} ('{node.input[k]}') is not computed from the network's "
                           f"input")
    return v


def layer_step(layer, before=None):
    def run(env, node):
        x = traced(env, node)
        if before is not None:
            before(x, node)
        env[node.output[0]] = layer(x)
    return run


def conv(imp: Importer, node, a):
    w = imp.constant(node, 1, "weight")
    if w.ndim != 4:
        raise CompileError(f"{describe(node)}: only 2-D convolutions are supported (weight of shape {w.shape})")
    kernel = tuple(a.get("kernel_shape", w.shape[2:]))
    stride, dilation = ints2(a, "strides", (1, 1)), ints2(a, "dilations", (1, 1))
    group = int(a.get("group", 1))
    params = {"weight": node.input[1]}
    values = {"weight": w}
    if len(node.input) > 2 and node.input[2]:
        params["bias"], values["bias"] = node.input[2], imp.constant(node, 2, "bias")
    layer = imp.add_layer(node, nn.Conv2d(w.shape[1] * group, w.shape[0], kernel, stride=stride, dilation=dilation,
                                          groups=group, bias="bias" in params, padding=static_padding(a)), params,
                          values)

    def resolve(x, node):
        size = spatial(x, node)
        pads = onnx_pads(a, size, kernel, stride, dilation, describe(node))
        padding = conv_padding(pads, size, kernel, stride, dilation)
        if padding is None:
            raise CompileError(f"{describe(node)}: pads (before, after) = {pads} at input {size} read other windows "
                               f"than any symmetric padding or padding='same' (cnncompile's Conv2d pads both sides "
                               f"alike); export with symmetric pads")
        layer.padding = padding
    return layer_step(layer, resolve)


def gemm(imp: Importer, node, a):
    if a.get("transA", 0):
        raise CompileError(f"{describe(node)}: transA=1 is not supported (the batch must be the rows of A)")
    if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        raise CompileError(f"{describe(node)}: alpha={a.get('alpha', 1.0)}, beta={a.get('beta', 1.0)}: only 1 "
                           f"(a plain dense layer) is supported")
    b = imp.constant(node, 1, "weight B")
    weight = b if a.get("transB", 0) else b.T
    bias = imp.constant(node, 2, "bias C") if len(node.input) > 2 and node.input[2] else None
    return dense(imp, node, weight, node.input[1] if a.get("transB", 0) else None, bias,
                 node.input[2] if bias is not None else None)


def dense(imp: Importer, node, weight, weight_name, bias, bias_name):
    """A Linear layer; named after ``weight_name`` only where it holds the layer's weight as stored."""
    if weight.ndim != 2:
        raise CompileError(f"{describe(node)}: the weight must be a matrix, got shape {weight.shape}")
    values = {"weight": weight}
    params = {"weight": weight_name or f"{node.input[1]}.T"}
    if bias is not None:
        bias = np.asarray(bias).reshape(-1)
        if bias.shape != (weight.shape[0],):
            raise CompileError(f"{describe(node)}: bias of {bias.size} values for {weight.shape[0]} outputs; only a "
                               f"per-output bias is supported")
        values["bias"], params["bias"] = bias, bias_name
    if weight_name is None:  # a transposed copy: its name is not a state_dict name
        params = {k: f"{sanitize(node.name or node.output[0])}/{k}" for k in params}
    layer = imp.add_layer(node, nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), params, values)

    def run(env, node):
        x = traced(env, node)
        if len(x.shape) != 2:
            raise CompileError(f"{describe(node)}: a dense layer needs a (N, features) input, got {x.shape}; "
                               f"flatten before it")
        env[node.output[0]] = layer(x)
    return run


def matmul(imp: Importer, node, a):
    weight = imp.constant(node, 1, "weight (second input)").T
    users = imp.consumers.get(node.output[0], [])
    bias = bias_name = None
    if len(users) == 1 and users[0].op_type == "Add":
        other = [n for n in users[0].input if n != node.output[0]]
        if len(other) == 1 and np.asarray(imp.constants.get(other[0], ())).size == weight.shape[0]:
            bias, bias_name = imp.constants[other[0]], other[0]
            imp.fused_adds[users[0].output[0]] = node.output[0]
    return dense(imp, node, weight, None, bias, bias_name)


def batchnorm(imp: Importer, node, a):
    if a.get("training_mode", 0) or len(node.output) > 1:
        raise CompileError(f"{describe(node)}: a training-mode BatchNormalization (several outputs) is not "
                           f"supported; export the network in eval mode")
    locals_ = ("weight", "bias", "running_mean", "running_var")
    params = {local: node.input[k + 1] for k, local in enumerate(locals_)}
    values = {local: imp.constant(node, k + 1, local) for k, local in enumerate(locals_)}
    momentum = 1.0 - float(a.get("momentum", 0.9))  # ONNX weighs the running value, PyTorch the batch's
    eps = float(str(np.float32(a.get("epsilon", 1e-5))))  # 1e-05, not float32's 9.99999974738e-06
    layer = imp.add_layer(node, nn.BatchNorm2d(values["weight"].shape[0], eps=eps,
                                               momentum=round(momentum, 6)), params, values)
    return layer_step(layer)


def pool(imp: Importer, node, a):
    kernel = ints2(a, "kernel_shape", ())
    stride, dilation = ints2(a, "strides", (1, 1)), ints2(a, "dilations", (1, 1))
    ceil_mode = bool(a.get("ceil_mode", 0))
    is_max = node.op_type == "MaxPool"
    if is_max and (len(node.output) > 1 and node.output[1]):
        raise CompileError(f"{describe(node)}: the Indices output is not supported")
    if not is_max and dilation != (1, 1):
        raise CompileError(f"{describe(node)}: dilated average pooling is not supported")
    include_pad = bool(a.get("count_include_pad", 0))
    if is_max:
        layer = nn.MaxPool2d(kernel, stride=stride, dilation=dilation)
    else:
        layer = nn.AvgPool2d(kernel, stride=stride, count_include_pad=include_pad)
    layer.padding = static_padding(a)
    imp.add_layer(node, layer)

    def resolve(x, node):
        size = spatial(x, node)
        pads = onnx_pads(a, size, kernel, stride, dilation, describe(node))
        padding, mode = pool_geometry(pads, size, kernel, stride, dilation, ceil_mode, include_pad and not is_max)
        if padding is None:
            raise CompileError(f"{describe(node)}: pads (before, after) = {pads} with ceil_mode={int(ceil_mode)} at "
                               f"input {size}: cnncompile's pools pad both sides alike, at most half the kernel, and "
                               f"no such padding computes the same windows"
                               + (" and divisors (count_include_pad=1)" if include_pad and not is_max else ""))
        layer.padding, layer.ceil_mode = padding, mode
    return layer_step(layer, resolve)


def pool_geometry(pads, size, kernel, stride, dilation, ceil_mode, include_pad):
    """(symmetric padding, ceil_mode) for cnncompile's pool computing ONNX's windows (and, for a
    mean counting padding, its divisors), or (None, None)."""
    before = tuple(b for b, _ in pads)
    if any(b > k // 2 for b, k in zip(before, kernel)):
        return None, None
    want = [window_count(n, k, s, d, b, e, ceil_mode) for n, k, s, d, (b, e) in zip(size, kernel, stride, dilation,
                                                                                      pads)]
    for mode in (ceil_mode, not ceil_mode):
        got = [window_count(n, k, s, d, b, b, mode) for n, k, s, d, b in zip(size, kernel, stride, dilation, before)]
        if got != want:
            continue
        if include_pad and not same_divisors(pads, size, kernel, stride, want):
            continue
        return before, mode
    return None, None


def same_divisors(pads, size, kernel, stride, counts) -> bool:
    """A mean counting padding divides by the window clipped to input + padding: ONNX's padding
    after, against cnncompile's (the padding before, on both sides)."""
    for (b, e), n, k, s, out in zip(pads, size, kernel, stride, counts):
        for x in range(out):
            start = s * x - b
            if min(start + k, n + e) != min(start + k, n + b):
                return False
    return True


def activation(make):
    def handler(imp: Importer, node, a):
        return layer_step(imp.add_layer(node, make(a)))
    return handler


def clip(imp: Importer, node, a):
    lo = a.get("min") if "min" in a else (float(imp.constant(node, 1, "min")) if len(node.input) > 1 and node.input[1]
                                          else None)
    hi = a.get("max") if "max" in a else (float(imp.constant(node, 2, "max")) if len(node.input) > 2 and node.input[2]
                                          else None)
    if lo is not None and hi is not None and hasattr(nn, "Hardtanh"):
        return layer_step(imp.add_layer(node, nn.Hardtanh(float(lo), float(hi))))
    if lo == 0 and hi is None:
        return layer_step(imp.add_layer(node, nn.ReLU()))
    relu = imp.add_layer(node, nn.ReLU())

    def run(env, node):  # lo + relu(x − lo) − relu(x − hi), each bound only where given
        x = traced(env, node)
        y = x if lo is None else relu(x - float(lo)) + float(lo)
        env[node.output[0]] = y if hi is None else y - relu(y - float(hi))
    return run


OPERATORS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


def binary(op):
    def handler(imp: Importer, node, a):
        def run(env, node):
            if node.output[0] in imp.fused_adds:  # the bias of a MatMul's dense layer: already added
                env[node.output[0]] = env[imp.fused_adds[node.output[0]]]
                return
            x, y = (scalar_or_traced(env.get(n), op) for n in node.input)
            try:
                env[node.output[0]] = OPERATORS[op](x, y)
            except TypeError:
                raise CompileError(f"{op} of a constant by a computed tensor is not supported") from None
        return run
    return handler


def scalar_or_traced(v, op):
    if isinstance(v, TracedTensor):
        return v
    v = np.asarray(v)
    if v.size != 1:
        raise CompileError(f"{op} with a constant of shape {v.shape} is not supported (only scalars)")
    return float(v.reshape(()))


def concat(imp: Importer, node, a):
    def run(env, node):
        from . import cat
        xs = [traced(env, node, k) for k in range(len(node.input))]
        axis = a.get("axis")
        if axis % len(xs[0].shape) != 1:
            raise CompileError(f"only concatenation along the channels (axis 1) is supported, got axis={axis}")
        env[node.output[0]] = cat(xs, 1)
    return run


def flatten(imp: Importer, node, a):
    def run(env, node):
        x = traced(env, node)
        if a.get("axis", 1) % max(len(x.shape), 1) != 1:
            raise CompileError(f"only axis=1 (keep the batch axis, merge the rest) is supported, got "
                               f"axis={a.get('axis')} for a tensor of shape {x.shape}")
        env[node.output[0]] = x.flatten(1)
    return run


def reshape(imp: Importer, node, a):
    def run(env, node):
        x = traced(env, node)
        target = list(np.asarray(env.get(node.input[1])).reshape(-1))
        features = int(np.prod(x.shape[1:]))
        batch_first = target[:1] and (target[0] is BATCH or is_int(target[0], (0, -1)))
        if len(target) == 2 and batch_first and is_int(target[1], (-1, features)):
            env[node.output[0]] = x.flatten(1) if len(x.shape) > 2 else x
            return
        raise CompileError(f"only a reshape to (batch, features) is supported, got target {target} for input "
                           f"{x.shape}")
    return run


def is_int(v, allowed) -> bool:
    return v is not BATCH and isinstance(v, (int, np.integer)) and int(v) in allowed


def reduce_mean(imp: Importer, node, a):
    gap = imp.add_layer(node, nn.AdaptiveAvgPool2d(1))

    def run(env, node):
        x = traced(env, node)
        axes = a.get("axes") or (list(np.asarray(env[node.input[1]]).reshape(-1)) if len(node.input) > 1 else None)
        if len(x.shape) != 4 or sorted(int(v) % 4 for v in axes or []) != [2, 3]:
            raise CompileError(f"only a mean over the spatial axes (2, 3) of an (N, C, H, W) tensor is supported, got "
                               f"axes={axes} for {x.shape}")
        y = gap(x)
        env[node.output[0]] = y if a.get("keepdims", 1) else y.flatten(1)
    return run


def softmax(kind):
    def handler(imp: Importer, node, a):
        layer = imp.add_layer(node, getattr(nn, kind)(dim=1))

        def run(env, node):
            x = traced(env, node)
            axis = a.get("axis", 1 if imp_opset(imp) < 13 else -1)
            if axis % len(x.shape) != 1:
                raise CompileError(f"only {kind} over axis 1 (the classes) is supported, got axis={axis} for "
                                   f"{x.shape}")
            env[node.output[0]] = layer(x)
        return run
    return handler


def imp_opset(imp: Importer) -> int:
    return next((o.version for o in imp.proto.opset_import if o.domain in ("", "ai.onnx")), 17)


def dropout(imp: Importer, node, a):
    ratio = a.get("ratio", 0.5)
    if len(node.input) > 1 and node.input[1]:
        ratio = float(imp.constant(node, 1, "ratio"))
    layer = imp.add_layer(node, nn.Dropout(float(ratio)))
    return layer_step(layer)


def identity(imp: Importer, node, a):
    def run(env, node):
        env[node.output[0]] = env[node.input[0]]
    if node.input[0] in imp.constants:  # an initializer under a second name (PyTorch's deduplication)
        imp.constants[node.output[0]] = imp.constants[node.input[0]]
        return None
    return run


HANDLERS = {
    "Conv": conv, "Gemm": gemm, "MatMul": matmul, "BatchNormalization": batchnorm,
    "MaxPool": pool, "AveragePool": pool,
    "GlobalAveragePool": activation(lambda a: nn.AdaptiveAvgPool2d(1)),
    "GlobalMaxPool": activation(lambda a: nn.AdaptiveMaxPool2d(1)),
    "Relu": activation(lambda a: nn.ReLU()), "Sigmoid": activation(lambda a: nn.Sigmoid()),
    "Tanh": activation(lambda a: nn.Tanh()),
    "LeakyRelu": activation(lambda a: nn.LeakyReLU(float(a.get("alpha", 0.01)))),
    "Clip": clip, "Add": binary("Add"), "Sub": binary("Sub"), "Mul": binary("Mul"), "Div": binary("Div"),
    "Concat": concat, "Flatten": flatten, "Reshape": reshape, "ReduceMean": reduce_mean,
    "Softmax": softmax("Softmax"), "LogSoftmax": softmax("LogSoftmax"), "Dropout": dropout, "Identity": identity,
}


def from_onnx(source) -> OnnxNet:
    """A trainable network from an ONNX CNN (a path, bytes or an ``onnx.ModelProto``); its
    parameters start at the file's values. ``net.input_shape`` is the file's input size."""
    return Importer(load_proto(source)).run()
