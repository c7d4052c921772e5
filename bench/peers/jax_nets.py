"""The example networks in JAX, the whole SGD train step under one ``jax.jit``.

Activations are NHWC inside (XLA's CPU convolutions are NHWC; what a JAX user writes, as flax
does); the weights come in PyTorch's layout and are transposed once at load. ``flatten(1)`` goes
back to NCHW order first, so the Linear weights after it are PyTorch's as they are.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from netdefs import PeerError, Value, check_state, load_example


class JaxOps:
    """The layer arithmetic on NHWC arrays; convolution weights are HWIO (see ``to_jax``)."""
    name = "jax"

    @staticmethod
    def conv2d(x, w, b, stride, padding, groups):
        y = lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                     precision=lax.Precision.HIGHEST)
        return y if b is None else y + b

    @staticmethod
    def batch_norm_train(x, w, b, eps):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        n = x.size // x.shape[-1]
        return (x - mean) * lax.rsqrt(var + eps) * w + b, mean, var * (n / max(n - 1, 1))

    @staticmethod
    def max_pool(x, k, s, p):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), [(0, 0), (p, p), (p, p), (0, 0)])

    @staticmethod
    def avg_pool(x, k, s, p, count_include_pad):
        pads = [(0, 0), (p, p), (p, p), (0, 0)]
        total = lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), pads)
        if count_include_pad or p == 0:
            return total / (k * k)
        ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
        return total / lax.reduce_window(ones, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), pads)

    @staticmethod
    def global_avg_pool(x):
        return x.mean((1, 2), keepdims=True)

    @staticmethod
    def linear(x, w, b):
        y = jnp.dot(x, w.T, precision=lax.Precision.HIGHEST)
        return y if b is None else y + b

    relu = staticmethod(jax.nn.relu)
    sigmoid = staticmethod(jax.nn.sigmoid)

    @staticmethod
    def flatten(x):
        return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's (C, H, W) order

    @staticmethod
    def cat(values, dim):
        if dim != 1:
            raise PeerError(f"cat(dim={dim}): the JAX peer concatenates channels (dim 1) only")
        return jnp.concatenate(values, axis=-1)

    key = None  # the step's random key while it is traced (see JaxTrainer)

    def dropout(self, x, p):
        """PyTorch's dropout (scaled by 1/(1-p)); its own draws, so such a net's losses are not compared."""
        if not p:
            return x
        self.key, draw = jax.random.split(self.key)
        return jnp.where(jax.random.bernoulli(draw, 1 - p, x.shape), x / (1 - p), 0.0)


def to_jax(name: str, a: np.ndarray) -> jnp.ndarray:
    """PyTorch's layout → the JAX nets' (convolution OIHW → HWIO)."""
    return jnp.asarray(a.transpose(2, 3, 1, 0) if a.ndim == 4 else a)


def cross_entropy(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1).mean()


class JaxTrainer:
    """One example network with cnncompile's weights and SGD (PyTorch's rule), stepped by one
    jitted function (parameters, momentum and running statistics donated, updated in place)."""

    def __init__(self, name: str, state: dict, hyper: dict):
        if hyper.get("nesterov"):
            raise PeerError("JAX peer: nesterov SGD is not written here")
        self.ops = ops = JaxOps()
        spec = load_example(name, ops)
        self.net = net = spec["net"]
        check_state(net, state, "jax")
        kinds = dict(net.state_names())
        self.params = {k: to_jax(k, state[k]) for k, kind in kinds.items() if kind == "param"}
        self.buffers = {k: to_jax(k, state[k]) for k, kind in kinds.items() if kind == "buffer"}
        self.momentum = {k: jnp.zeros_like(v) for k, v in self.params.items()}
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]

        def loss_fn(params, buffers, x, y, key):
            net.bind({**params, **buffers})
            ops.key = key
            logits = net(Value(ops, x)).a
            ops.key = None
            return cross_entropy(logits, y), net.collect_updates()

        @partial(jax.jit, donate_argnums=(0, 1, 2))
        def step(params, momentum, buffers, x, y, key):
            key, draws = jax.random.split(key)
            (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, buffers, x, y, draws)
            new_p, new_m = {}, {}
            for k, p in params.items():
                g = grads[k] + wd * p if wd else grads[k]
                new_m[k] = mu * momentum[k] + g if mu else g
                new_p[k] = p - lr * new_m[k]
            return new_p, new_m, {**buffers, **updates}, loss, key
        self._step, self.key = step, jax.random.PRNGKey(0)

    def set_batch(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y.astype(np.int32))

    def step(self):
        """One train step, dispatched (not waited for: ``sync`` does)."""
        self.params, self.momentum, self.buffers, self.loss, self.key = self._step(
            self.params, self.momentum, self.buffers, self.x, self.y, self.key)
        return self.loss

    def sync(self) -> float:
        return float(jax.block_until_ready(self.loss))

