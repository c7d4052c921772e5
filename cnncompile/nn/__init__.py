"""Describe a network as in PyTorch: ``from cnncompile import nn``."""
from . import functional
from .layers import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Identity, LeakyReLU,
                     Linear, MaxPool2d, ReLU, Sigmoid, Tanh)
from .loss import CrossEntropyLoss, L1Loss, MSELoss
from .module import Layer, Module, ModuleList, Sequential, TracedTensor

__all__ = ["functional", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "Identity", "LeakyReLU",
           "Linear", "MaxPool2d", "ReLU", "Sigmoid", "Tanh", "CrossEntropyLoss", "L1Loss", "MSELoss", "Layer",
           "Module", "ModuleList", "Sequential", "TracedTensor"]
