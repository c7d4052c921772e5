"""Functional forms of the layers, for use inside ``forward`` on traced tensors."""
from __future__ import annotations

from . import tracing


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


def max_pool2d(x, kernel_size, stride=None, padding=0):
    return _f("maxpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    return _f("avgpool2d", x, kernel_size=kernel_size, stride=stride, padding=padding,
              count_include_pad=count_include_pad)


def adaptive_avg_pool2d(x, output_size):
    return _f("adaptive_avgpool2d", x, output_size=output_size)


def flatten(x, start_dim=1):
    return x.flatten(start_dim)


def dropout(x, p=0.5, training=True, inplace=False):
    """As PyTorch: active only when ``training`` (pass ``self.training``); eval is the identity."""
    return _f("dropout", x, p=p) if training else x


def batch_norm(*args, **kwargs):
    raise NotImplementedError("use the nn.BatchNorm2d layer: its running statistics need a home in state_dict")
