"""The example networks in tinygrad (NCHW, its only convolution layout), the SGD train step under
``TinyJit``: the first call runs and compiles the kernels, the second captures them, later calls
replay the captured kernels without Python.

The CPU backend is chosen before tinygrad is imported (``DEV``): see ``choose_device``.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from netdefs import PeerError, Value, check_state, load_example

# tinygrad's CPU device compiles C with ``$CC`` (default clang) for its own worker thread, whatever the
# renderer; Debian names it clang-NN.
CLANGS = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")
DEFAULT_DEVICE = "CPU:CLANG"


def choose_device(device: str | None = None) -> str:
    """Set tinygrad's device (``CPU:LLVM``, ``CPU:CLANG``, ``CPU:X86``) and a C compiler before
    it is imported; ``$BENCH_TINYGRAD_DEV`` overrides the default."""
    device = device or os.environ.get("BENCH_TINYGRAD_DEV", DEFAULT_DEVICE)
    os.environ["DEV"] = device
    if "CC" not in os.environ:
        found = next((c for c in CLANGS if shutil.which(c)), None)
        if found is None:
            raise PeerError("tinygrad's CPU device needs clang on PATH (apt-get install clang)")
        os.environ["CC"] = found
    return device


class TinyOps:
    name = "tinygrad"

    @staticmethod
    def conv2d(x, w, b, stride, padding, groups):
        return x.conv2d(w, b, groups=groups, stride=stride, padding=padding)

    @staticmethod
    def batch_norm_train(x, w, b, eps):
        mean = x.mean(axis=(0, 2, 3))
        centered = x - mean.reshape(1, -1, 1, 1)
        var = (centered * centered).mean(axis=(0, 2, 3))
        n = x.numel() // x.shape[1]
        y = centered * (var + eps).rsqrt().reshape(1, -1, 1, 1) * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
        return y, mean, var * (n / max(n - 1, 1))

    @staticmethod
    def max_pool(x, k, s, p):
        return x.max_pool2d((k, k), stride=s, padding=p)

    @staticmethod
    def avg_pool(x, k, s, p, count_include_pad):
        return x.avg_pool2d((k, k), stride=s, padding=p, count_include_pad=count_include_pad)

    @staticmethod
    def global_avg_pool(x):
        return x.mean(axis=(2, 3), keepdim=True)

    @staticmethod
    def linear(x, w, b):
        return x.linear(w.T, b)

    relu = staticmethod(lambda x: x.relu())
    sigmoid = staticmethod(lambda x: x.sigmoid())
    flatten = staticmethod(lambda x: x.flatten(1))

    @staticmethod
    def cat(values, dim):
        return values[0].cat(*values[1:], dim=dim)

    @staticmethod
    def dropout(x, p):
        """tinygrad's own (its draws: such a net's losses are not compared)."""
        return x.dropout(p)


class TinygradTrainer:
    """One example network with cnncompile's weights and tinygrad's SGD (PyTorch's rule: weight decay
    added to the gradient, then momentum), one TinyJit function per step."""

    def __init__(self, name: str, state: dict, hyper: dict):
        from tinygrad import Tensor, TinyJit
        from tinygrad.helpers import Context
        from tinygrad.nn.optim import SGD
        spec = load_example(name, TinyOps)
        self.net = net = spec["net"]
        check_state(net, state, "tinygrad")
        kinds = dict(net.state_names())
        arrays = {k: Tensor(np.ascontiguousarray(state[k])).is_param_(kind == "param").realize()
                  for k, kind in kinds.items()}
        net.bind(arrays)
        self.buffers = {k: arrays[k] for k, kind in kinds.items() if kind == "buffer"}
        params = [arrays[k] for k, kind in kinds.items() if kind == "param"]
        opt = SGD(params, lr=hyper["lr"], momentum=hyper["momentum"], weight_decay=hyper["weight_decay"],
                  nesterov=hyper.get("nesterov", False))
        self.Tensor, self.Context = Tensor, Context

        @TinyJit
        def step(x, y):
            opt.zero_grad()
            loss = net(Value(TinyOps, x)).a.sparse_categorical_crossentropy(y)
            loss.backward()
            updates = [self.buffers[k].assign(v) for k, v in net.collect_updates().items()]
            return loss.realize(*updates, *opt.schedule_step())
        self._step = step

    def set_batch(self, x: np.ndarray, y: np.ndarray):
        self.x = self.Tensor(np.ascontiguousarray(x)).is_param_(False).realize()
        self.y = self.Tensor(y.astype(np.int32)).is_param_(False).realize()

    def step(self):
        with self.Context(TRAINING=1):
            self.loss = self._step(self.x, self.y)
        return self.loss

    def sync(self) -> float:
        return float(self.loss.item())
