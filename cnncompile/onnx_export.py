"""``model.export_onnx(path)``: the inference graph as ONNX, with the trained weights.

Walks the graph IR op by op and writes the ONNX node(s) that compute the same thing in eval mode:
batch norm with its running statistics, dropout as the identity. The batch axis is dynamic.
Where ONNX's operator and PyTorch's rule could disagree (a ceil-mode window running past the
padding, a mean pool's divisor there, ``divisor_override``), the node is written with explicit
pads and divisors so that no runtime's reading of ``ceil_mode`` matters.
"""
from __future__ import annotations

import numpy as np

from cnncompile.ir.errors import CompileError, where
from cnncompile.ir.ops.conv import Conv2d
from cnncompile.ir.ops import OPS as _OPS
from cnncompile.ir.ops.pool import window_count, window_lengths

DEFAULT_OPSET = 17


def _onnx():
    try:
        import onnx
    except ImportError:
        raise CompileError("exporting to ONNX needs the onnx package: pip install 'cnncompile[onnx]'") from None
    return onnx


class Writer:
    """Collects nodes and initializers; fresh names for intermediate values."""

    def __init__(self, onnx, model, opset: int):
        self.onnx, self.h, self.model, self.opset = onnx, onnx.helper, model, opset
        self.graph = model.graph_ir
        self.nodes, self.initializers, self.names = [], [], set()
        self.state = {k: np.asarray(v, np.float32) for k, v in model.state_dict().items()
                      if not k.endswith("num_batches_tracked")}

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names or name in self.graph.tensors:
            k += 1
            name = f"{base}#{k}"
        self.names.add(name)
        return name

    def const(self, base: str, value, dtype=np.float32) -> str:
        name = self.fresh(base)
        self.initializers.append((name, np.asarray(value, dtype)))
        return name

    def param(self, tensor: str) -> str:
        """A parameter or buffer of the model, stored once under its state_dict name."""
        if tensor not in self.names:
            self.names.add(tensor)
            self.initializers.append((tensor, self.state[tensor]))
        return tensor

    def node(self, op_type: str, inputs, output: str | None, name: str, **attrs) -> str:
        output = output or self.fresh(f"{name}/{op_type}")
        self.nodes.append(self.h.make_node(op_type, list(inputs), [output], name=self.fresh(f"{name}:{op_type}"),
                                           **attrs))
        return output


# ----- one function per op kind: (writer, node) → writes nodes whose last output is node.output -----

def conv2d(w: Writer, node):
    k, s, pads, d = Conv2d().full_geometry(node)
    x = node.inputs[0]
    mode = node.attrs.get("padding_mode", "zeros")
    if mode != "zeros":
        x, pads = pad_node(w, node, x, pads, mode), ((0, 0), (0, 0))
    inputs = [x, w.param(node.params["weight"])] + ([w.param(node.params["bias"])] if "bias" in node.params else [])
    w.node("Conv", inputs, node.output, node.name, kernel_shape=list(k), strides=list(s), dilations=list(d),
           group=int(node.attrs.get("groups", 1)), pads=[pads[0][0], pads[1][0], pads[0][1], pads[1][1]])


def pad_node(w: Writer, node, x, pads, mode):
    onnx_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    if mode == "circular" and w.opset < 19:
        raise CompileError(f"{where(node)}: padding_mode='circular' needs ONNX opset 19 (Pad mode 'wrap'); "
                           f"call export_onnx(path, opset=19)")
    amounts = w.const(f"{node.name}.pads", [0, 0, pads[0][0], pads[1][0], 0, 0, pads[0][1], pads[1][1]], np.int64)
    return w.node("Pad", [x, amounts], None, node.name, mode=onnx_mode)


def linear(w: Writer, node):
    inputs = [node.inputs[0], w.param(node.params["weight"])]
    if "bias" in node.params:
        inputs.append(w.param(node.params["bias"]))
    w.node("Gemm", inputs, node.output, node.name, transB=1)


def pool_pads(w: Writer, node):
    """(kernel, stride, padding, dilation, extra padding after per axis): ceil mode written as the
    extra padding its last window needs, so the window count is PyTorch's whatever the runtime's rule."""
    op = _OPS[node.kind]
    (k, s, p), d = op.geometry(node), op.dilation(node)
    in_shape, out_shape = w.graph.shape(node.inputs[0]), w.graph.shape(node.output)
    extra = [max(0, (out_shape[2 + t] - 1) * s[t] + d[t] * (k[t] - 1) + 1 - (in_shape[2 + t] + 2 * p[t]))
             for t in range(2)]
    return k, s, p, d, extra


def maxpool2d(w: Writer, node):
    k, s, p, d, e = pool_pads(w, node)
    w.node("MaxPool", [node.inputs[0]], node.output, node.name, kernel_shape=list(k), strides=list(s),
           dilations=list(d), pads=[p[0], p[1], p[0] + e[0], p[1] + e[1]])


def avgpool2d(w: Writer, node):
    k, s, p, _, e = pool_pads(w, node)
    include_pad, override = node.attrs.get("count_include_pad", True), node.attrs.get("divisor_override")
    if override is None and (not include_pad or e == [0, 0]):  # the runtime's divisor is PyTorch's
        w.node("AveragePool", [node.inputs[0]], node.output, node.name, kernel_shape=list(k), strides=list(s),
               pads=[p[0], p[1], p[0] + e[0], p[1] + e[1]], count_include_pad=int(include_pad))
        return
    window_sum(w, node, k, s, [p[0], p[1], p[0] + e[0], p[1] + e[1]], divisors(w, node, k, s, p, override))


def divisors(w: Writer, node, k, s, p, override):
    """1/n per output position, n as PyTorch counts it (`ir.ops.pool.window_count`)."""
    if override is not None:
        return np.float32(1.0 / override)
    (_, _, hh, ww), (_, _, oh, ow) = w.graph.shape(node.inputs[0]), w.graph.shape(node.output)
    counts = []
    for t, (size, out) in enumerate(((hh, oh), (ww, ow))):
        last = s[t] * (out - 1) - p[t]
        counts.append([float(window_count(s[t] * x - p[t], k[t], size, p[t], last, True)) for x in range(out)])
    return (1.0 / np.outer(counts[0], counts[1])).astype(np.float32)


def window_sum(w: Writer, node, k, s, pads, scale):
    """Σ over each window as a depth-wise convolution with a kernel of ones, times ``scale``."""
    channels = w.graph.shape(node.inputs[0])[1]
    ones = w.const(f"{node.name}.ones", np.ones((channels, 1, *k)))
    total = w.node("Conv", [node.inputs[0], ones], None, node.name, kernel_shape=list(k), strides=list(s),
                   pads=list(pads), group=int(channels))
    w.node("Mul", [total, w.const(f"{node.name}.divisor", scale)], node.output, node.name)


def adaptive_avgpool2d(w: Writer, node):
    (_, _, hh, ww), (_, _, oh, ow) = w.graph.shape(node.inputs[0]), w.graph.shape(node.output)
    if (oh, ow) == (1, 1):
        w.node("GlobalAveragePool", [node.inputs[0]], node.output, node.name)
    elif hh % oh == 0 and ww % ow == 0:
        k = [hh // oh, ww // ow]
        w.node("AveragePool", [node.inputs[0]], node.output, node.name, kernel_shape=k, strides=k)
    else:  # windows of different sizes: Y = A_h · X · A_wᵀ with the windows' means as rows
        rows = w.node("MatMul", [w.const(f"{node.name}.rows", window_matrix(hh, oh)), node.inputs[0]], None,
                      node.name)
        w.node("MatMul", [rows, w.const(f"{node.name}.columns", window_matrix(ww, ow).T)], node.output, node.name)


def window_matrix(size: int, out: int) -> np.ndarray:
    """Row x averages PyTorch's adaptive window ``[⌊x·H/O⌋, ⌈(x+1)·H/O⌉)``."""
    m = np.zeros((out, size), np.float32)
    for x, n in enumerate(window_lengths(size, out)):
        start = x * size // out
        m[x, start:start + n] = 1.0 / n
    return m


def adaptive_maxpool2d(w: Writer, node):
    (_, _, hh, ww), (_, _, oh, ow) = w.graph.shape(node.inputs[0]), w.graph.shape(node.output)
    if (oh, ow) == (1, 1):
        w.node("GlobalMaxPool", [node.inputs[0]], node.output, node.name)
    elif hh % oh == 0 and ww % ow == 0:
        k = [hh // oh, ww // ow]
        w.node("MaxPool", [node.inputs[0]], node.output, node.name, kernel_shape=k, strides=k)
    else:
        raise CompileError(f"{where(node)}: adaptive max pooling from {hh}×{ww} to {oh}×{ow} (windows of different "
                           f"sizes) has no ONNX export; use an input size that the output size divides")


def batchnorm2d(w: Writer, node):
    c, eps = node.attrs["num_features"], float(node.attrs.get("eps", 1e-5))
    scale = w.param(node.params["weight"]) if "weight" in node.params else w.const(f"{node.name}.scale", np.ones(c))
    shift = w.param(node.params["bias"]) if "bias" in node.params else w.const(f"{node.name}.shift", np.zeros(c))
    if "running_mean" in node.params:
        stats = [w.param(node.params["running_mean"]), w.param(node.params["running_var"])]
        w.node("BatchNormalization", [node.inputs[0], scale, shift, *stats], node.output, node.name, epsilon=eps)
        return
    # track_running_stats=False: batch statistics in eval too, written out
    axes = w.const(f"{node.name}.axes", [0, 2, 3], np.int64)
    x = node.inputs[0]
    centred = w.node("Sub", [x, reduce_mean(w, node, x, axes)], None, node.name)
    var = reduce_mean(w, node, w.node("Mul", [centred, centred], None, node.name), axes)
    std = w.node("Sqrt", [w.node("Add", [var, w.const(f"{node.name}.eps", eps)], None, node.name)], None, node.name)
    normal = w.node("Div", [centred, std], None, node.name)
    shape = w.const(f"{node.name}.channel_shape", [1, c, 1, 1], np.int64)
    scaled = w.node("Mul", [normal, w.node("Reshape", [scale, shape], None, node.name)], None, node.name)
    w.node("Add", [scaled, w.node("Reshape", [shift, shape], None, node.name)], node.output, node.name)


def reduce_mean(w: Writer, node, x, axes):
    if w.opset >= 18:
        return w.node("ReduceMean", [x, axes], None, node.name, keepdims=1)
    return w.node("ReduceMean", [x], None, node.name, axes=[0, 2, 3], keepdims=1)


def unary(op_type, **fixed):
    def write(w: Writer, node):
        attrs = {k: (f(node.attrs) if callable(f) else f) for k, f in fixed.items()}
        w.node(op_type, [node.inputs[0]], node.output, node.name, **attrs)
    return write


def constant_binary(op_type, key):
    def write(w: Writer, node):
        w.node(op_type, [node.inputs[0], w.const(f"{node.name}.{key}", node.attrs[key])], node.output, node.name)
    return write


def binary(op_type):
    def write(w: Writer, node):
        w.node(op_type, list(node.inputs), node.output, node.name)
    return write


def flatten(w: Writer, node):
    in_shape, out_shape = w.graph.shape(node.inputs[0]), w.graph.shape(node.output)
    if len(out_shape) == 2:
        w.node("Flatten", [node.inputs[0]], node.output, node.name, axis=1)
        return
    shape = w.const(f"{node.name}.shape", [0] + [int(n) for n in out_shape[1:]], np.int64)
    w.node("Reshape", [node.inputs[0], shape], node.output, node.name)


def softmax_axis(op_type):
    def write(w: Writer, node):
        w.node(op_type, [node.inputs[0]], node.output, node.name, axis=1)
    return write


def clip(w: Writer, node):
    """ReLU6 / Hardtanh / clamp, under whichever attribute names their op keeps."""
    a = node.attrs
    lo = next((a[k] for k in ("min_val", "min", "lower", "low") if a.get(k) is not None), None)
    hi = next((a[k] for k in ("max_val", "max", "upper", "high") if a.get(k) is not None), None)
    if node.kind == "relu6":
        lo, hi = 0.0, 6.0
    inputs = [node.inputs[0], "" if lo is None else w.const(f"{node.name}.min", lo),
              "" if hi is None else w.const(f"{node.name}.max", hi)]
    while inputs[-1] == "":
        inputs.pop()
    w.node("Clip", inputs, node.output, node.name)


def silu(w: Writer, node):
    w.node("Mul", [node.inputs[0], w.node("Sigmoid", [node.inputs[0]], None, node.name)], node.output, node.name)


def softplus(w: Writer, node):
    """log(1 + e^(βx))/β; PyTorch's linear branch above the threshold differs from it by < e^(−threshold)."""
    beta = float(node.attrs.get("beta", 1.0))
    if beta == 1.0:
        w.node("Softplus", [node.inputs[0]], node.output, node.name)
        return
    scaled = w.node("Mul", [node.inputs[0], w.const(f"{node.name}.beta", beta)], None, node.name)
    w.node("Div", [w.node("Softplus", [scaled], None, node.name), w.const(f"{node.name}.beta", beta)], node.output,
           node.name)


def gelu(w: Writer, node):
    approximate = node.attrs.get("approximate", "none")
    x = node.inputs[0]
    if w.opset >= 20:
        w.node("Gelu", [x], node.output, node.name, approximate=approximate)
        return
    if approximate == "tanh":  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        cube = w.node("Mul", [w.node("Mul", [x, x], None, node.name), x], None, node.name)
        inner = w.node("Add", [x, w.node("Mul", [cube, w.const(f"{node.name}.c", 0.044715)], None, node.name)], None,
                       node.name)
        core = w.node("Tanh", [w.node("Mul", [inner, w.const(f"{node.name}.k", np.sqrt(2 / np.pi))], None,
                                      node.name)], None, node.name)
    else:  # 0.5·x·(1 + erf(x/√2))
        core = w.node("Erf", [w.node("Mul", [x, w.const(f"{node.name}.k", np.sqrt(0.5))], None, node.name)], None,
                      node.name)
    one_plus = w.node("Add", [core, w.const(f"{node.name}.one", 1.0)], None, node.name)
    half_x = w.node("Mul", [x, w.const(f"{node.name}.half", 0.5)], None, node.name)
    w.node("Mul", [half_x, one_plus], node.output, node.name)


WRITERS = {
    "conv2d": conv2d, "linear": linear, "maxpool2d": maxpool2d, "avgpool2d": avgpool2d,
    "adaptive_avgpool2d": adaptive_avgpool2d, "adaptive_maxpool2d": adaptive_maxpool2d, "batchnorm2d": batchnorm2d,
    "relu": unary("Relu"), "sigmoid": unary("Sigmoid"), "tanh": unary("Tanh"),
    "leaky_relu": unary("LeakyRelu", alpha=lambda a: float(a.get("negative_slope", 0.01))),
    "scale": constant_binary("Mul", "factor"), "shift": constant_binary("Add", "offset"),
    "add": binary("Add"), "sub": binary("Sub"), "mul": binary("Mul"),
    "flatten": flatten, "identity": unary("Identity"), "dropout": unary("Identity"), "dropout2d": unary("Identity"),
    "cat": lambda w, node: w.node("Concat", list(node.inputs), node.output, node.name, axis=1),
    "softmax": softmax_axis("Softmax"), "log_softmax": softmax_axis("LogSoftmax"),
    "relu6": clip, "hardtanh": clip, "clamp": clip, "clip": clip,
    "elu": unary("Elu", alpha=lambda a: float(a.get("alpha", 1.0))), "silu": silu, "softplus": softplus, "gelu": gelu,
}


def network_ops(model) -> list:
    """The ops the heads need, in graph order (the loss and its targets left out)."""
    graph = model.graph_ir
    by_output = {n.output: n for n in graph.ops}
    needed, todo = set(), [t.name for _, t in model.heads]
    while todo:
        node = by_output.get(todo.pop())
        if node is not None and node.name not in needed:
            needed.add(node.name)
            todo.extend(node.inputs)
    return [n for n in graph.ops if n.name in needed]


def output_names(model) -> list[str]:
    keys = [k for k, _ in model.heads]
    if keys == [None]:
        return ["output"]
    return [str(k) if isinstance(k, str) else f"output{k}" for k in keys]


def build(model, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of ``model``'s inference graph (float32, dynamic batch axis ``N``)."""
    onnx = _onnx()
    if opset < 17:
        raise CompileError(f"export_onnx: opset {opset} is too old; use 17 or newer")
    w = Writer(onnx, model, opset)
    for node in network_ops(model):
        write = WRITERS.get(node.kind)
        if write is None:
            raise CompileError(f"{where(node)}: op kind '{node.kind}' has no ONNX export; exportable kinds: "
                               f"{', '.join(sorted(WRITERS))}")
        write(w, node)
    outputs = []
    for name, (_, tensor) in zip(output_names(model), model.heads):
        w.node("Identity", [tensor.name], name, "output")
        outputs.append(value_info(onnx, name, tensor.shape))
    (x,) = [t for t in w.graph.inputs if w.graph.tensors[t].role == "input"]
    inputs = [value_info(onnx, x, w.graph.shape(x))]
    # checked without the weights (declared as inputs): serializing them for the checker costs seconds
    weights = [onnx.helper.make_tensor_value_info(name, tensor_type(onnx, a), a.shape) for name, a in w.initializers]
    onnx.checker.check_model(make_model(onnx, w, inputs + weights, outputs, opset))
    proto = make_model(onnx, w, inputs, outputs, opset)
    for name, array in w.initializers:
        t = proto.graph.initializer.add()
        t.name, t.data_type = name, tensor_type(onnx, array)
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return proto


def tensor_type(onnx, array) -> int:
    return onnx.TensorProto.INT64 if array.dtype == np.int64 else onnx.TensorProto.FLOAT


def make_model(onnx, w: Writer, inputs, outputs, opset: int):
    graph = onnx.helper.make_graph(w.nodes, "cnncompile", inputs, outputs)
    proto = onnx.helper.make_model(graph, producer_name="cnncompile",
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    proto.ir_version = min(proto.ir_version, 9)  # readable by onnxruntime releases of the last two years
    return proto


def value_info(onnx, name: str, shape) -> object:
    dims = ["N"] + [int(n) for n in shape[1:]]
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims)


def export(model, path, opset: int = DEFAULT_OPSET) -> None:
    """Write ``model``'s inference graph with its current weights to ``path``."""
    _onnx().save(build(model, opset), str(path))
