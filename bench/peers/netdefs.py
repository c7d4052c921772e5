"""The example networks (examples/NAME.py) run with another framework's arrays: the example file is
executed with a small ``nn`` of our own in place of ``cnncompile.nn``, whose layers call a
framework's ``Ops`` (jax_nets.py, tinygrad_nets.py). The same file, the same layer names, so the
state_dict names (and so the shared weights) are PyTorch's and cnncompile's.

Only the layers the example zoo uses are here; any other name fails at build time, naming it.
"""
from __future__ import annotations

import re
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


class PeerError(RuntimeError):
    """A network or weight file the peer framework cannot run as cnncompile does."""


class Value:
    """A framework array during the forward pass, with the few tensor methods the example files call
    (``+``, ``.flatten(1)``): the frameworks spell those differently (jax's ``flatten`` takes no
    start dimension)."""

    def __init__(self, ops, a):
        self.ops, self.a = ops, a

    def __add__(self, other):
        return Value(self.ops, self.a + other.a)

    def flatten(self, start_dim=0):
        if start_dim != 1:
            raise PeerError(f"flatten({start_dim}): only flatten(1) is supported by the bench peers")
        return Value(self.ops, self.ops.flatten(self.a))


class Module:
    """Children, parameters and buffers in PyTorch's state_dict order (own parameters, own buffers,
    then children); ``bind`` puts a framework's arrays in place of the names."""

    def __init__(self):
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_state", {})  # name → "param" | "buffer", in registration order
        object.__setattr__(self, "updates", {})  # buffer name → new value, written by forward

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    def register(self, name, kind, shape):
        self._state[name] = kind
        object.__setattr__(self, name, shape)  # a placeholder until bind

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def state_names(self):
        """(full name, kind) in PyTorch's state_dict order."""
        out = []
        for prefix, module in self.named_modules():
            for name, kind in module._state.items():
                out.append((prefix + name, kind))
        return out

    def bind(self, arrays: dict):
        """Set every parameter and buffer to ``arrays[full name]``."""
        for prefix, module in self.named_modules():
            for name in module._state:
                object.__setattr__(module, name, arrays[prefix + name])

    def collect_updates(self) -> dict:
        """The new buffer values the last forward wrote (batch norm's running statistics)."""
        return {prefix + k: v for prefix, m in self.named_modules() for k, v in m.updates.items()}

    def __call__(self, *args):
        return self.forward(*args)


def make_nn(ops):
    """A ``torch.nn``-shaped namespace whose layers compute with ``ops`` (see jax_nets.JaxOps)."""

    class Sequential(Module):
        def __init__(self, *layers):
            super().__init__()
            for i, layer in enumerate(layers):
                setattr(self, str(i), layer)

        def forward(self, x):
            for layer in self._children.values():
                x = layer(x)
            return x

    class Conv2d(Module):
        def __init__(self, cin, cout, kernel_size, stride=1, padding=0, groups=1, bias=True):
            super().__init__()
            if cin % groups or cout % groups:
                raise PeerError(f"Conv2d({cin}, {cout}, groups={groups}): channels not divisible by groups")
            self.stride, self.padding, self.groups = stride, padding, groups
            self.register("weight", "param", (cout, cin // groups, kernel_size, kernel_size))
            self.has_bias = bias
            if bias:
                self.register("bias", "param", (cout,))

        def forward(self, x):
            return Value(ops, ops.conv2d(x.a, self.weight, self.bias if self.has_bias else None,
                                         self.stride, self.padding, self.groups))

    class BatchNorm2d(Module):
        def __init__(self, channels, eps=1e-5, momentum=0.1):
            super().__init__()
            self.eps, self.momentum = eps, momentum
            for name, kind in (("weight", "param"), ("bias", "param"), ("running_mean", "buffer"),
                               ("running_var", "buffer")):
                self.register(name, kind, (channels,))

        def forward(self, x):
            """Training mode: batch statistics; the running ones move as PyTorch's (unbiased variance)."""
            y, mean, var_unbiased = ops.batch_norm_train(x.a, self.weight, self.bias, self.eps)
            m = self.momentum
            self.updates["running_mean"] = self.running_mean * (1 - m) + mean * m
            self.updates["running_var"] = self.running_var * (1 - m) + var_unbiased * m
            return Value(ops, y)

    class Linear(Module):
        def __init__(self, fin, fout, bias=True):
            super().__init__()
            self.register("weight", "param", (fout, fin))
            self.has_bias = bias
            if bias:
                self.register("bias", "param", (fout,))

        def forward(self, x):
            return Value(ops, ops.linear(x.a, self.weight, self.bias if self.has_bias else None))

    def stateless(fn):
        class Layer(Module):
            def __init__(self, *args, **kwargs):
                super().__init__()
                self.args, self.kwargs = args, kwargs

            def forward(self, x):
                return Value(ops, fn(x.a, *self.args, **self.kwargs))
        return Layer

    def adaptive_avg(a, output_size):
        if output_size not in (1, (1, 1)):
            raise PeerError(f"AdaptiveAvgPool2d({output_size}): the bench peers support output size 1 only")
        return ops.global_avg_pool(a)

    def max_pool(a, kernel_size, stride=None, padding=0):
        return ops.max_pool(a, kernel_size, stride or kernel_size, padding)

    def avg_pool(a, kernel_size, stride=None, padding=0, count_include_pad=True):
        return ops.avg_pool(a, kernel_size, stride or kernel_size, padding, count_include_pad)

    class functional:
        relu = staticmethod(lambda x: Value(ops, ops.relu(x.a)))
        sigmoid = staticmethod(lambda x: Value(ops, ops.sigmoid(x.a)))

    class Namespace:
        def __getattr__(self, name):
            raise PeerError(f"{ops.name} peer: no nn.{name}; add it to bench/peers/netdefs.py (make_nn)")

    nn = Namespace()
    nn.Module, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.Linear = Module, Sequential, Conv2d, BatchNorm2d, Linear
    nn.ReLU = stateless(lambda a: ops.relu(a))
    nn.Flatten = stateless(lambda a: ops.flatten(a))
    nn.MaxPool2d = stateless(max_pool)
    nn.AvgPool2d = stateless(avg_pool)
    nn.AdaptiveAvgPool2d = stateless(adaptive_avg)
    nn.Dropout = stateless(lambda a, p=0.5: ops.dropout(a, p))
    nn.CrossEntropyLoss = lambda *a, **k: "cross_entropy"
    nn.functional = functional
    nn.cat = lambda values, dim=0: Value(ops, ops.cat([v.a for v in values], dim))
    nn.__name__ = f"bench.peers.{ops.name}.nn"
    return nn


class _Unused:
    """What the example files import besides ``nn`` (optimizer, callbacks, data sets): the bench takes
    the optimizer from cnncompile's compiled model instead, so any call or attribute does nothing."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


_IMPORT = re.compile(r"^(from cnncompile(?:\.\w+)* import .+|import cnncompile as \w+)$", re.M)


def _rewrite_import(line: str) -> str:
    """``from cnncompile import nn, optim as o`` → ``nn, o = __peer__('nn'), __peer__('optim')``."""
    if line.startswith("import "):
        return f"{line.split()[-1]} = __peer__('cc')"
    names = [n.strip() for n in line.split(" import ", 1)[1].split(",")]
    pairs = [(n.split(" as ")[0].strip(), n.split(" as ")[-1].strip()) for n in names]
    return f"{', '.join(b for _, b in pairs)}, = {', '.join(f'__peer__({a!r})' for a, _ in pairs)},"


def load_example(name: str, ops) -> dict:
    """Run examples/NAME.py with ``ops``'s layers; its namespace (``net``, ``input_shape``, ...)."""
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        raise PeerError(f"no example network {path}")
    nn = make_nn(ops)
    src = _IMPORT.sub(lambda m: _rewrite_import(m.group(0)), path.read_text())

    def peer(what):
        return nn if what in ("nn", "cc") else _Unused()
    namespace = {"__file__": str(path), "__name__": f"bench_peer_{ops.name}", "__peer__": peer}
    exec(compile(src, str(path), "exec"), namespace)
    return namespace


def check_state(net: Module, state: dict, framework: str) -> None:
    """Fail unless the weight file holds exactly the network's parameters and buffers, shape for shape."""
    names = dict(net.state_names())
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(names) - given), sorted(given - set(names))
    if missing or unexpected:
        raise PeerError(f"{framework}: the weight file does not fit the network: missing {missing}, "
                        f"unexpected {unexpected}")
    for prefix, module in net.named_modules():
        for n in module._state:
            want = tuple(getattr(module, n))
            if tuple(state[prefix + n].shape) != want:
                raise PeerError(f"{framework}: {prefix + n} has shape {tuple(state[prefix + n].shape)}, "
                                f"the network wants {want}")
