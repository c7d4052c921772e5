"""Functional forms of the layers, for use inside ``forward`` on traced tensors, with
``torch.nn.functional``'s arguments in its order."""
from __future__ import annotations

import functools
import inspect

from cnncompile.ir.errors import CompileError

from . import tracing
from .layers import check_p, no_indices


def torch_signature(fn):
    """A call that does not bind to ``fn``'s signature (an unknown keyword, one argument too many)
    is a `CompileError` naming the function and its arguments, not a bare ``TypeError``."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            takes = ", ".join(map(str, sig.parameters.values()))
            raise CompileError(f"functional.{fn.__name__}: {exc}; it takes ({takes}) in torch.nn.functional's "
                               f"order") from None
        return fn(*args, **kwargs)

    return checked


def _f(kind, x, **attrs):
    return tracing.current().add_functional(kind, [x], **attrs)


@torch_signature
def relu(x, inplace=False):
    return _f("relu", x)


@torch_signature
def sigmoid(x):
    return _f("sigmoid", x)


@torch_signature
def tanh(x):
    return _f("tanh", x)


@torch_signature
def leaky_relu(x, negative_slope=0.01, inplace=False):
    return _f("leaky_relu", x, negative_slope=negative_slope)


@torch_signature
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    no_indices("max_pool2d", return_indices)
    return _f("maxpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
              ceil_mode=bool(ceil_mode))


@torch_signature
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _f("avgpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=bool(ceil_mode),
              count_include_pad=count_include_pad, divisor_override=divisor_override)


@torch_signature
def adaptive_avg_pool2d(x, output_size):
    return _f("adaptive_avgpool2d", x, output_size=output_size)


@torch_signature
def adaptive_max_pool2d(x, output_size, return_indices=False):
    no_indices("adaptive_max_pool2d", return_indices)
    return _f("adaptive_maxpool2d", x, output_size=output_size)


@torch_signature
def flatten(x, start_dim=1, end_dim=-1):
    """As ``torch.flatten``, except that ``start_dim`` defaults to 1: the batch axis stays first."""
    return x.flatten(start_dim, end_dim)


@torch_signature
def dropout(x, p=0.5, training=True, inplace=False):
    """As PyTorch: active only when ``training`` (pass ``self.training``); eval is the identity."""
    check_p("dropout", p)
    return _f("dropout", x, p=p) if training else x


@torch_signature
def dropout2d(x, p=0.5, training=True, inplace=False):
    """Whole channels dropped, as ``torch.nn.functional.dropout2d``; eval is the identity."""
    check_p("dropout2d", p)
    return _f("dropout2d", x, p=p) if training else x


def batch_norm(*args, **kwargs):
    raise NotImplementedError("use the nn.BatchNorm2d layer: its running statistics need a home in state_dict")


@torch_signature
def softmax(x, dim=None, _stacklevel=3, dtype=None):
    """Over dim 1 (the classes, or a map's channels), as the Softmax layer."""
    return _f("softmax", x, dim=dim)


@torch_signature
def log_softmax(x, dim=None, _stacklevel=3, dtype=None):
    """Over dim 1, as the LogSoftmax layer (before NLLLoss: cross-entropy in two steps)."""
    return _f("log_softmax", x, dim=dim)
