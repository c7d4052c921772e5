"""torch.nn modules that torch.fx cannot trace (Python control flow on shapes) compile through
torch.export: checked against PyTorch itself (loss, every gradient, 3 SGD steps in float64 on both
backends, the weights loaded back with ``to_torch_state_dict``), and unmapped ATen operators are
errors that name them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

import cnncompile as cc
from cnncompile import nn
from cnncompile.frontends import torch_export
from cnncompile.frontends.torch_export import ExportGraph

from test_torch_frontend import check_parity


class Branchy(tnn.Module):
    """A forward torch.fx refuses: a branch on the input's width and a loop over the channel count.
    Around them, most of what torch.export writes for a CNN: conv2d (bias or not, padding='same',
    groups), batch norm, ReLU, ReLU6, Hardtanh, LeakyReLU, max and average pools, an adaptive pool,
    mean over (2, 3), residual adds, scalar arithmetic, cat, dropout, view(x.size(0), -1), linear,
    tanh."""

    def __init__(self):
        super().__init__()
        self.stem = tnn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = tnn.BatchNorm2d(8)
        self.block = tnn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.side = tnn.Conv2d(8, 4, 1)
        self.drop = tnn.Dropout(0.0)
        self.fc = tnn.Linear(12 * 2 * 2 + 12, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        if x.shape[-1] > 32:                     # large inputs are pooled first
            x = F.max_pool2d(x, 2)
        for _ in range(x.shape[1] // 4):         # two residual steps for 8 channels
            x = x + F.relu6(self.block(x)) * 0.5
        y = F.hardtanh(self.side(x), -0.5, 0.75)
        z = torch.cat([F.leaky_relu(x, 0.1), y], 1)
        z = F.avg_pool2d(z, 3, stride=2, padding=1, count_include_pad=False)
        a = F.adaptive_avg_pool2d(z, 2)
        a = self.drop(a).view(a.size(0), -1)
        b = torch.tanh(z.mean((2, 3)))
        return self.fc(torch.cat([a, b - 1.0], 1))


def test_fx_cannot_trace_it():
    """The module really needs the fallback: torch.fx refuses its control flow."""
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(Branchy())


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_control_flow_module_compiles_through_torch_export(backend):
    """At 36×36 (the pooled branch): PyTorch's loss, every gradient and three SGD steps in float64,
    under PyTorch's parameter names, and the trained weights load back into the module."""
    torch.manual_seed(0)
    model = check_parity(Branchy(), (3, 36, 36), backend=backend, tol=1e-10)
    assert isinstance(model.net, ExportGraph)
    kinds = {n.kind for n in model.graph_ir.ops}
    assert {"maxpool2d", "dropout", "cat"} <= kinds
    assert list(model.state_dict())[:6] == ["stem.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                            "bn.running_var", "bn.num_batches_tracked"]


def test_each_input_size_takes_its_own_branch():
    """The branch is settled per input size: at 16×16 there is no max pool, and the result is
    still PyTorch's."""
    torch.manual_seed(0)
    model = check_parity(Branchy(), (3, 16, 16), tol=1e-10)
    assert "maxpool2d" not in {n.kind for n in model.graph_ir.ops}


def test_decomposed_aten_forms(monkeypatch):
    """The decomposed operator set (aten.convolution, _native_batch_norm_legit_functional with its
    counter update, max_pool2d_with_indices, hardtanh for ReLU6, _adaptive_avg_pool2d, addmm with a
    permuted weight) maps to the same network: PyTorch's loss, gradients and steps."""
    exported = torch_export.export_program
    monkeypatch.setattr(torch_export, "export_program", lambda m, x: exported(m, x).run_decompositions())
    torch.manual_seed(0)
    model = check_parity(Branchy(), (3, 36, 36), tol=1e-10)
    (program,) = model.net.programs.values()
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"aten.convolution.default", "aten._native_batch_norm_legit_functional.default", "aten.addmm.default",
            "aten.max_pool2d_with_indices.default", "aten.permute.default", "aten.hardtanh.default",
            "aten._adaptive_avg_pool2d.default"} <= targets


class Looped(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        for _ in range(x.shape[-1] // 4):  # the same layer twice: one set of parameters
            x = F.relu(self.conv(x))
        return x


def test_a_layer_called_in_a_loop_shares_its_parameters():
    """A conv called once per loop iteration is one layer: one set of parameters under its torch
    name, PyTorch's output."""
    torch.manual_seed(0)
    looped = Looped().double()
    model = cc.compile(looped, input_shape=(2, 8, 8), backend="numpy", dtype="float64")
    assert list(model.state_dict()) == ["conv.weight", "conv.bias"]
    assert [n.type for n in model.graph_ir.ops].count("Conv2d") == 2
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8))
    np.testing.assert_allclose(model.predict(x), looped(torch.from_numpy(x)).detach().numpy(), rtol=1e-12,
                               atol=1e-12)


def test_inside_a_cnncompile_network_it_is_refused_at_once():
    """Inside a cnncompile container the input size is not known when the torch module arrives, so
    one that fx cannot trace is refused there, naming it and the way that works."""
    with pytest.raises(cc.CompileError, match=r"Looped.*torch\.fx cannot trace.*compiled on its own, "
                                              r"cc\.compile\(module, \.\.\.\), it would be tried with torch\.export"):
        nn.Sequential(Looped(), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))


def test_unmapped_aten_operator_is_an_error_naming_it():
    """An ATen operator with no mapping is a CompileError naming the node, its target and the
    supported list, at compile time."""
    class Sine(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv = tnn.Conv2d(1, 2, 3)

        def forward(self, x):
            if x.shape[-1] > 4:
                x = self.conv(x)
            return torch.sin(x).flatten(1)

    with pytest.raises(cc.CompileError, match=r"Sine \(Sine, through torch.export\): node 'sin' \(call_function "
                                              r"aten\.sin\.default\) has no cnncompile mapping; supported ATen "
                                              r"operators: .*aten\.conv2d\.default"):
        cc.compile(Sine(), input_shape=(1, 6, 6), backend="numpy")


def test_parameter_read_directly_is_an_error():
    """A parameter used outside a layer (F.conv2d on the module's own tensor) is refused by name."""
    class Raw(tnn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tnn.Parameter(torch.ones(2, 1, 3, 3))

        def forward(self, x):
            if x.shape[-1] > 4:
                x = F.conv2d(x, self.kernel)
            return x.flatten(1)

    with pytest.raises(cc.CompileError, match=r"node 'conv2d'.*reads kernel as its weight.*keep it inside a layer"):
        cc.compile(Raw(), input_shape=(1, 6, 6), backend="numpy")


def test_neither_fx_nor_export_is_one_error_naming_both():
    """A branch on a tensor's values defeats both tracers: one CompileError says so."""
    class ValueBranch(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv = tnn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(cc.CompileError, match=r"torch\.fx could not trace it .*torch\.export failed too"):
        cc.compile(ValueBranch(), input_shape=(1, 6, 6), backend="numpy")
