"""The layers of API.md, with PyTorch's arguments, defaults and parameter initialisation."""
from __future__ import annotations

import math

import numpy as np

from .module import Layer


def uniform_fan_in(rng, shapes: dict, fan_in: int) -> dict:
    """PyTorch's default: kaiming_uniform(a=√5) for weights, which is U(±1/√fan_in), and the same for bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return {k: rng.uniform(-bound, bound, size=s).astype(np.float32) for k, s in shapes.items()}


class Conv2d(Layer):
    kind = "conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups, self.bias = stride, padding, dilation, groups, bias

    def attrs(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                    stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    bias=self.bias)

    def init_params(self, rng, shapes):
        w = shapes["weight"]
        return uniform_fan_in(rng, shapes, w[1] * w[2] * w[3])


class Linear(Layer):
    kind = "linear"

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.bias = in_features, out_features, bias

    def attrs(self):
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias)

    def init_params(self, rng, shapes):
        return uniform_fan_in(rng, shapes, self.in_features)


class MaxPool2d(Layer):
    kind = "maxpool2d"

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def attrs(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)


class AvgPool2d(Layer):
    kind = "avgpool2d"

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.count_include_pad = count_include_pad

    def attrs(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    count_include_pad=self.count_include_pad)


class AdaptiveAvgPool2d(Layer):
    kind = "adaptive_avgpool2d"

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def attrs(self):
        return dict(output_size=self.output_size)


class _Activation(Layer):
    def __init__(self, inplace: bool = False):
        super().__init__()


class ReLU(_Activation):
    kind = "relu"


class Sigmoid(_Activation):
    kind = "sigmoid"


class Tanh(_Activation):
    kind = "tanh"


class LeakyReLU(Layer):
    kind = "leaky_relu"

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope = negative_slope

    def attrs(self):
        return dict(negative_slope=self.negative_slope)


class Flatten(Layer):
    kind = "flatten"

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        if start_dim != 1 or end_dim != -1:
            raise ValueError("Flatten: only start_dim=1, end_dim=-1 is supported (the batch axis stays first)")


class Identity(Layer):
    kind = "identity"

    def __init__(self, *args, **kwargs):
        super().__init__()


class BatchNorm2d(Layer):
    kind = "batchnorm2d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        if momentum is None or not track_running_stats:
            raise ValueError("BatchNorm2d: only momentum as a number with track_running_stats=True is supported")
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine

    def attrs(self):
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine)

    def init_params(self, rng, shapes):
        ones = {"weight", "running_var"}
        return {k: (np.ones if k in ones else np.zeros)(s, dtype=np.float32) for k, s in shapes.items()}


class Dropout(Layer):
    kind = "dropout"

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p

    def attrs(self):
        return dict(p=self.p)
