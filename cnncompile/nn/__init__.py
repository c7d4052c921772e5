"""Describe a network as in PyTorch: ``from cnncompile import nn``."""
from . import functional
from .layers import (AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool2d, BatchNorm2d, Conv2d, Dropout, Dropout2d, Flatten,
                     Identity, LeakyReLU, Linear, MaxPool2d, ReLU, Sigmoid, Tanh)
from .loss import CrossEntropyLoss, L1Loss, MSELoss
from .module import Layer, Module, ModuleList, Sequential, TracedTensor

__all__ = ["functional", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout",
           "Dropout2d", "Flatten", "Identity", "LeakyReLU",
           "Linear", "MaxPool2d", "ReLU", "Sigmoid", "Tanh", "CrossEntropyLoss", "L1Loss", "MSELoss", "Layer",
           "Module", "ModuleList", "Sequential", "TracedTensor"]

from .loss import BCEWithLogitsLoss, HuberLoss, NLLLoss, SmoothL1Loss  # noqa: E402
from .softmax import LogSoftmax, Softmax  # noqa: E402

__all__ += ["BCEWithLogitsLoss", "HuberLoss", "NLLLoss", "SmoothL1Loss", "LogSoftmax", "Softmax"]

from .activations import ELU, GELU, Hardtanh, ReLU6, SiLU, Softplus  # noqa: E402

__all__ += ["ELU", "GELU", "Hardtanh", "ReLU6", "SiLU", "Softplus"]
