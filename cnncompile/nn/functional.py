"""Functional forms of the layers, for use inside ``forward`` on traced tensors, with
``torch.nn.functional``'s arguments in its order."""
from __future__ import annotations

from . import tracing
from .layers import check_p, no_indices


def _f(kind, x, **attrs):
    return tracing.current().add_functional(kind, [x], **attrs)


def relu(x, inplace=False):
    return _f("relu", x)


def sigmoid(x):
    return _f("sigmoid", x)


def tanh(x):
    return _f("tanh", x)


def leaky_relu(x, negative_slope=0.01, inplace=False):
    return _f("leaky_relu", x, negative_slope=negative_slope)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    no_indices("max_pool2d", return_indices)
    return _f("maxpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
              ceil_mode=bool(ceil_mode))


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    return _f("avgpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=bool(ceil_mode),
              count_include_pad=count_include_pad, divisor_override=divisor_override)


def adaptive_avg_pool2d(x, output_size):
    return _f("adaptive_avgpool2d", x, output_size=output_size)


def adaptive_max_pool2d(x, output_size, return_indices=False):
    no_indices("adaptive_max_pool2d", return_indices)
    return _f("adaptive_maxpool2d", x, output_size=output_size)


def flatten(x, start_dim=1, end_dim=-1):
    """As ``torch.flatten``, except that ``start_dim`` defaults to 1: the batch axis stays first."""
    return x.flatten(start_dim, end_dim)


def dropout(x, p=0.5, training=True, inplace=False):
    """As PyTorch: active only when ``training`` (pass ``self.training``); eval is the identity."""
    check_p("dropout", p)
    return _f("dropout", x, p=p) if training else x


def dropout2d(x, p=0.5, training=True, inplace=False):
    """Whole channels dropped, as ``torch.nn.functional.dropout2d``; eval is the identity."""
    check_p("dropout2d", p)
    return _f("dropout2d", x, p=p) if training else x


def batch_norm(*args, **kwargs):
    raise NotImplementedError("use the nn.BatchNorm2d layer: its running statistics need a home in state_dict")
