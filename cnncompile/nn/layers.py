"""The layers cnncompile traces, with PyTorch's arguments (same names, defaults and positional order) and
parameter initialisation.

Every constructor checks its call against its own signature: an argument PyTorch does not have,
one too many, or an option cnncompile cannot run is a `CompileError` naming the layer and the
argument, never a bare ``TypeError`` (or, worse, a silently different network).
"""
from __future__ import annotations

import functools
import inspect
import math

import numpy as np

from cnncompile.ir.errors import CompileError

from .module import Layer


def uniform_fan_in(rng, shapes: dict, fan_in: int) -> dict:
    """PyTorch's default: kaiming_uniform(a=√5) for weights, which is U(±1/√fan_in), and the same for bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return {k: rng.uniform(-bound, bound, size=s).astype(np.float32) for k, s in shapes.items()}


def signature_text(init) -> str:
    params = list(inspect.signature(init).parameters.values())[1:]
    return ", ".join(str(p) for p in params)


def pytorch_signature(cls):
    """Wrap ``cls.__init__`` so that a call that does not bind to it (unknown keyword, too many
    positional arguments, a missing one) is a `CompileError` that names the layer, what was wrong,
    and the arguments the layer takes."""
    init = cls.__init__
    sig = inspect.signature(init)

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        try:
            sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            reason = str(exc).replace("__init__() ", "").replace("checked() ", "")
            raise CompileError(f"{cls.__name__}: {reason}; {cls.__name__} takes ({signature_text(init)}) "
                               f"in PyTorch's order") from None
        init(self, *args, **kwargs)

    cls.__init__ = checked
    return cls


def refuse(layer: str, option: str, value, why: str) -> None:
    raise CompileError(f"{layer}: {option}={value!r} is not supported; {why}")


def no_placement(layer: str, device, dtype) -> None:
    """``device``/``dtype`` exist in PyTorch's signatures; cnncompile decides both at compile time."""
    if device is not None and str(device) != "cpu":
        refuse(layer, "device", device, "cnncompile runs on the CPU; leave device=None")
    if dtype is not None:
        refuse(layer, "dtype", dtype, "choose the precision with cc.compile(..., dtype='float32'|'float64')")


def one_of(layer: str, option: str, value, allowed) -> None:
    if value not in allowed:
        raise CompileError(f"{layer}: {option}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@pytorch_signature
class Conv2d(Layer):
    kind = "conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        no_placement("Conv2d", device, dtype)
        one_of("Conv2d", "padding_mode", padding_mode, PADDING_MODES)
        if isinstance(padding, str):
            one_of("Conv2d", "padding", padding, ("same", "valid"))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups, self.bias = stride, padding, dilation, groups, bias
        self.padding_mode = padding_mode

    def attrs(self):
        out = dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                   stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                   bias=self.bias)
        if self.padding_mode != "zeros":  # absent by default: the traced graph (and its cache key) stays as it was
            out["padding_mode"] = self.padding_mode
        return out

    def init_params(self, rng, shapes):
        w = shapes["weight"]
        return uniform_fan_in(rng, shapes, w[1] * w[2] * w[3])


@pytorch_signature
class Linear(Layer):
    kind = "linear"

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        no_placement("Linear", device, dtype)
        self.in_features, self.out_features, self.bias = in_features, out_features, bias

    def attrs(self):
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias)

    def init_params(self, rng, shapes):
        return uniform_fan_in(rng, shapes, self.in_features)


def no_indices(layer: str, return_indices) -> None:
    if return_indices:
        refuse(layer, "return_indices", return_indices,
               "the winners' positions are recorded for the derived gradient but not handed out; "
               "use return_indices=False")


def pool_attrs(**attrs) -> dict:
    """Options at their defaults are left out, so a network that does not use them traces as before."""
    defaults = dict(dilation=1, ceil_mode=False, divisor_override=None)
    return {k: v for k, v in attrs.items() if k not in defaults or v != defaults[k]}


@pytorch_signature
class MaxPool2d(Layer):
    kind = "maxpool2d"

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        no_indices("MaxPool2d", return_indices)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, bool(ceil_mode)

    def attrs(self):
        return pool_attrs(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                          dilation=self.dilation, ceil_mode=self.ceil_mode)


@pytorch_signature
class AvgPool2d(Layer):
    kind = "avgpool2d"

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(divisor_override, int)
                                             or divisor_override == 0):
            refuse("AvgPool2d", "divisor_override", divisor_override, "give a non-zero int or None")
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self.divisor_override = divisor_override

    def attrs(self):
        return pool_attrs(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                          ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad,
                          divisor_override=self.divisor_override)


@pytorch_signature
class AdaptiveAvgPool2d(Layer):
    kind = "adaptive_avgpool2d"

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def attrs(self):
        return dict(output_size=self.output_size)


@pytorch_signature
class AdaptiveMaxPool2d(Layer):
    kind = "adaptive_maxpool2d"

    def __init__(self, output_size, return_indices=False):
        super().__init__()
        no_indices("AdaptiveMaxPool2d", return_indices)
        self.output_size = output_size

    def attrs(self):
        return dict(output_size=self.output_size)


@pytorch_signature
class ReLU(Layer):
    kind = "relu"

    def __init__(self, inplace=False):
        super().__init__()


@pytorch_signature
class Sigmoid(Layer):
    kind = "sigmoid"

    def __init__(self):
        super().__init__()


@pytorch_signature
class Tanh(Layer):
    kind = "tanh"

    def __init__(self):
        super().__init__()


@pytorch_signature
class LeakyReLU(Layer):
    kind = "leaky_relu"

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope = negative_slope

    def attrs(self):
        return dict(negative_slope=self.negative_slope)


@pytorch_signature
class Flatten(Layer):
    """``start_dim``..``end_dim`` merged into one axis; the batch axis must stay first and whole
    (checked against the input's rank when traced)."""

    kind = "flatten"

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        for name, value in (("start_dim", start_dim), ("end_dim", end_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                refuse("Flatten", name, value, "give an int axis")
        if start_dim == 0:
            refuse("Flatten", "start_dim", start_dim, "the batch axis stays first; use start_dim=1 or later")
        self.start_dim, self.end_dim = start_dim, end_dim

    def attrs(self):
        return {} if (self.start_dim, self.end_dim) == (1, -1) else dict(start_dim=self.start_dim,
                                                                          end_dim=self.end_dim)


class Identity(Layer):
    kind = "identity"

    def __init__(self, *args, **kwargs):
        """As PyTorch's: any arguments, all ignored."""
        super().__init__()


@pytorch_signature
class BatchNorm2d(Layer):
    """``track_running_stats=False``: batch statistics in eval too, no buffers. ``momentum=None``:
    the running statistics are the cumulative average (factor 1/num_batches_tracked). ``bias=False``
    (keyword only, as in PyTorch 2.13): a scale γ without a shift β."""

    kind = "batchnorm2d"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True):
        super().__init__()
        no_placement("BatchNorm2d", device, dtype)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0 <= momentum <= 1):
            refuse("BatchNorm2d", "momentum", momentum, "give a number in [0, 1], or None for a cumulative average")
        self.num_features, self.eps, self.momentum, self.affine = num_features, eps, momentum, affine
        self.track_running_stats, self.bias = bool(track_running_stats), bool(bias)

    def attrs(self):
        out = dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine)
        if not self.track_running_stats:
            out["track_running_stats"] = False
        if not self.bias:
            out["bias"] = False
        return out

    def init_params(self, rng, shapes):
        ones = {"weight", "running_var"}
        return {k: (np.ones if k in ones else np.zeros)(s, dtype=np.float32) for k, s in shapes.items()}


def check_p(layer: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise CompileError(f"{layer}: p must be a probability in [0, 1], got {p!r}")


@pytorch_signature
class Dropout(Layer):
    kind = "dropout"

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        check_p("Dropout", p)
        self.p = p

    def attrs(self):
        return dict(p=self.p)


@pytorch_signature
class Dropout2d(Layer):
    """Whole channels dropped: one draw per (example, channel), scaled by 1/(1−p) as PyTorch does."""

    kind = "dropout2d"

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        check_p("Dropout2d", p)
        self.p = p

    def attrs(self):
        return dict(p=self.p)
