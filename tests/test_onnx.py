"""ONNX out (``model.export_onnx``, ``cnncompile export``) and in (``cc.from_onnx``), checked against
onnxruntime and, for fine-tuning, against PyTorch on the module the file came from."""
from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import cnncompile as cc
from cnncompile import nn
from cnncompile.onnx_export import WRITERS

tn = torch.nn
EXAMPLES = Path(__file__).parent.parent / "examples"
F = nn.functional


def run_onnx(path, x) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})


def outputs_of(pred) -> list[np.ndarray]:
    if isinstance(pred, dict):
        return list(pred.values())
    return list(pred) if isinstance(pred, tuple) else [pred]


def relative(got, want) -> float:
    """The largest difference relative to the reference's scale (taken as at least 1e-6)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def assert_close(got, want, tol=1e-5, what=""):
    """Equal within ``tol`` of the output's scale."""
    assert np.shape(got) == np.shape(want)
    err = relative(got, want)
    assert err < tol, f"{what} relative error {err:.2e}"


def randomize_statistics(model, rng):
    """Running statistics away from 0 and 1, so that eval mode's batch norm is really checked."""
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        elif k.endswith(".weight") and v.ndim == 1:
            state[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    model.load_state_dict(state)


# ----- ONNX out ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet5", "alexnet", "resnet20", "resnet18", "densenet", "mobilenet", "bbox", "pose"])
def test_export_of_each_example_matches_predict(name, tmp_path):
    """Every example network's export, run by onnxruntime, gives model.predict's outputs (all heads)."""
    spec = runpy.run_path(str(EXAMPLES / f"{name}.py"))
    model = cc.compile(spec["net"], input_shape=spec["input_shape"], backend="numpy", seed=3)
    rng = np.random.default_rng(0)
    randomize_statistics(model, rng)
    x = rng.normal(size=(1 if name in ("alexnet", "resnet18") else 2, *spec["input_shape"])).astype(np.float32)
    path = tmp_path / f"{name}.onnx"
    model.export_onnx(path)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # any batch size
    got, want = run_onnx(path, x), outputs_of(model.predict(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w)
    assert {i.name for i in proto.graph.initializer} >= set(model.prog.params)  # the weights, by state_dict name


def test_export_of_layer_options_matches_predict(tmp_path):
    """Ceil-mode pools past the padding, mean divisors (count_include_pad, divisor_override), 'same'
    and reflect padding, grouped convolution, batch statistics in eval, uneven adaptive windows,
    scalar arithmetic and several activations export exactly."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 4, padding="same"), nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", groups=3),
        nn.BatchNorm2d(6, track_running_stats=False), nn.LeakyReLU(0.2),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.Sigmoid(),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=True), nn.Tanh(),
        nn.AvgPool2d(2, stride=1, divisor_override=3), nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False),
        nn.AdaptiveAvgPool2d((3, 2)), nn.Dropout2d(0.3), nn.Flatten(), nn.Dropout(0.5), nn.Linear(36, 7),
        nn.Softmax(dim=1))
    check_export(net, (3, 23, 21), tmp_path)


class Joins(nn.Module):
    """Residual arithmetic, concatenation, partial flatten, adaptive max pooling, log-softmax."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.fc = nn.Linear(8 * 2 * 2, 3, bias=False)

    def forward(self, x):
        a, b = F.relu(self.a(x)), self.b(x)
        h = cc.cat([a * b - a, (a + b) * 0.5 + 1.0], 1)
        h = F.adaptive_max_pool2d(self.bn(h), 2)
        return nn.LogSoftmax(dim=1)(self.fc(h.flatten(2).flatten(1)))


def test_export_of_joins_matches_predict(tmp_path):
    """Adds, products, scalar shifts, channel concatenation, flatten of some axes, adaptive max pooling."""
    check_export(Joins(), (2, 6, 6), tmp_path)


def check_export(net, shape, tmp_path, tol=1e-5):
    model = cc.compile(net, input_shape=shape, backend="numpy", seed=1)
    rng = np.random.default_rng(1)
    randomize_statistics(model, rng)
    x = rng.normal(size=(3, *shape)).astype(np.float32)
    model.export_onnx(tmp_path / "net.onnx")
    assert_close(run_onnx(tmp_path / "net.onnx", x)[0], model.predict(x), tol)
    return model


def test_export_of_newer_activations(tmp_path):
    """Hardtanh/ReLU6 as Clip, ELU, SiLU, Softplus (β ≠ 1) and both GELUs export (opset 17 and 20)."""
    if not hasattr(nn, "GELU"):
        pytest.fail("cnncompile.nn has no GELU/Hardtanh layers")
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Hardtanh(-0.5, 0.5), nn.Conv2d(4, 4, 1), nn.ReLU6(), nn.ELU(0.7),
                        nn.SiLU(), nn.Softplus(beta=2.0), nn.GELU(), nn.GELU("tanh"), nn.Flatten())
    model = check_export(net, (1, 6, 6), tmp_path)
    x = np.random.default_rng(2).normal(size=(2, 1, 6, 6)).astype(np.float32)
    model.export_onnx(tmp_path / "opset20.onnx", opset=20)
    assert_close(run_onnx(tmp_path / "opset20.onnx", x)[0], model.predict(x))


def test_export_names_an_op_it_cannot_write(tmp_path, monkeypatch):
    """An op kind with no ONNX form is a CompileError naming the layer and the kind, and no file."""
    monkeypatch.delitem(WRITERS, "tanh")
    model = cc.compile(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh()), input_shape=(1, 5, 5), backend="numpy")
    with pytest.raises(cc.CompileError, match=r"'1' \(Tanh\).*'tanh' has no ONNX export"):
        model.export_onnx(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_uneven_adaptive_max(tmp_path):
    """Adaptive max pooling over windows of different sizes has no ONNX operator: refused, named."""
    model = cc.compile(nn.Sequential(nn.AdaptiveMaxPool2d(2)), input_shape=(1, 5, 5), backend="numpy")
    with pytest.raises(cc.CompileError, match="adaptive max pooling from 5×5 to 2×2"):
        model.export_onnx(tmp_path / "x.onnx")


def test_cli_export_writes_a_runnable_file(tmp_path, capsys):
    """``cnncompile export FILE --onnx PATH`` writes what onnxruntime runs at any batch size."""
    from cnncompile.cli import main
    main(["export", str(EXAMPLES / "lenet5.py"), "--onnx", str(tmp_path / "lenet5.onnx")])
    assert "wrote" in capsys.readouterr().out
    for batch in (1, 5):
        (out,) = run_onnx(tmp_path / "lenet5.onnx", np.zeros((batch, 1, 32, 32), np.float32))
        assert out.shape == (batch, 10)


# ----- ONNX in: files written by torch.onnx.export -------------------------------------------------

class LeNet(tn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = tn.Conv2d(1, 6, 5, padding=2), tn.Conv2d(6, 16, 5)
        self.fc1, self.fc2 = tn.Linear(16 * 5 * 5, 32), tn.Linear(32, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)  # Shape → Gather → Concat → Reshape in the file
        return self.fc2(torch.nn.functional.leaky_relu(self.fc1(x), 0.1))


class Residual(tn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = tn.Conv2d(3, 8, 3, padding=1, bias=False), tn.BatchNorm2d(8)
        self.conv2, self.bn2 = tn.Conv2d(8, 8, 3, padding=1, bias=False), tn.BatchNorm2d(8)
        self.down = tn.Sequential(tn.Conv2d(3, 8, 1, stride=2, bias=False), tn.BatchNorm2d(8))
        self.conv3 = tn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = tn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv3(self.bn2(self.conv2(y)) + y)
        y = torch.relu(y + self.down(x))
        return self.fc(torch.flatten(tn.functional.adaptive_avg_pool2d(y, 1), 1))


class Dense(tn.Module):
    """A DenseNet-style concatenation block with a ceil-mode pool and ReLU6."""

    def __init__(self):
        super().__init__()
        self.bn = tn.BatchNorm2d(4)
        self.conv = tn.Conv2d(4, 4, 3, padding=1)
        self.pool = tn.MaxPool2d(2, ceil_mode=True)
        self.avg = tn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = tn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        h = torch.cat([x, tn.functional.relu6(self.conv(torch.relu(self.bn(x))))], 1)
        return self.fc(torch.flatten(self.avg(self.pool(h)), 1))


class Separable(tn.Module):
    """MobileNet's depth-wise separable block, a global mean as x.mean((2, 3)), sigmoid output."""

    def __init__(self):
        super().__init__()
        self.body = tn.Sequential(
            tn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), tn.BatchNorm2d(8), tn.ReLU6(inplace=True),
            tn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), tn.BatchNorm2d(8), tn.ReLU(inplace=True),
            tn.Conv2d(8, 12, 1, bias=False), tn.BatchNorm2d(12), tn.ReLU(inplace=True))
        self.head = tn.Linear(12, 4)

    def forward(self, x):
        return torch.sigmoid(self.head(self.body(x).mean((2, 3))))


TORCH_NETS = {"lenet": (LeNet, (1, 28, 28)), "residual": (Residual, (3, 8, 8)), "dense": (Dense, (4, 7, 7)),
              "separable": (Separable, (3, 10, 10))}


def torch_export(module, shape, path, **kw):
    """The legacy exporter keeping batch norm as its own node (PRESERVE: no folding into the
    convolution), with a dynamic batch axis."""
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, *shape),), str(path), dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "N"}, "output": {0: "N"}}, **kw)


def spread_statistics(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("name", sorted(TORCH_NETS))
def test_torch_export_imports_predicts_and_fine_tunes(name, tmp_path):
    """A torch.onnx.export file: the import predicts what onnxruntime computes (1e-5), keeps the
    module's parameter names, and 3 SGD steps on it equal PyTorch's on the original module (1e-4)."""
    make, shape = TORCH_NETS[name]
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        spread_statistics(module)
    path = tmp_path / f"{name}.onnx"
    torch_export(module, shape, path)
    net = cc.from_onnx(path)
    assert net.input_shape == shape
    model = cc.compile(net, input_shape=net.input_shape, loss=nn.CrossEntropyLoss()
                       if name != "separable" else nn.MSELoss(), optimizer=cc.optim.SGD(lr=0.1), backend="numpy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *shape)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(path, x)[0])

    state = model.state_dict()
    expected = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert set(state) == set(expected)  # the module's own names
    for k in state:
        np.testing.assert_array_equal(state[k], expected[k])

    fine_tune_against_torch(module, model, shape, rng, regression=name == "separable")


def fine_tune_against_torch(module, model, shape, rng, regression=False, batch=6, lr=0.1):
    """3 SGD steps on both (batch norm in training): the losses, then every parameter and buffer, within 1e-4."""
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    out_features = model.predict(np.zeros((1, *shape), model.dtype)).shape[1]
    for step in range(3):
        xs = rng.normal(size=(batch, *shape)).astype(model.dtype)
        if regression:
            y = rng.uniform(size=(batch, out_features)).astype(model.dtype)
            target, loss_fn = torch.tensor(y), tn.functional.mse_loss
        else:
            y = rng.integers(0, out_features, batch)
            target, loss_fn = torch.tensor(y), tn.functional.cross_entropy
        opt.zero_grad()
        loss = loss_fn(module(torch.tensor(xs)), target)
        loss.backward()
        opt.step()
        ours = model.train_step(xs, y)
        assert abs(ours - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    trained = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    for k, v in model.state_dict().items():
        assert_close(v, trained[k], 1e-4, k)
    worst = max(relative(v, trained[k]) for k, v in model.state_dict().items())
    print(f"after 3 steps: largest relative difference {worst:.1e}")



class SmallResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.adaptive_avg_pool2d(self.pool(h), 1).flatten(1))


def torchvision_models():
    """torchvision's model definitions without its package initializer (its compiled operators do not
    load against this CPU build of torch; the definitions are plain Python)."""
    import importlib.util
    import sys
    import types
    if "torchvision" not in sys.modules:
        spec = importlib.util.find_spec("torchvision")
        if spec is None:
            pytest.fail("torchvision is not installed (pip install -e '.[test]')")
        package = types.ModuleType("torchvision")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = package
    import torchvision.models
    return torchvision.models


@pytest.mark.parametrize("name", ["squeezenet1_1", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_torchvision_export_imports_and_predicts(name, tmp_path):
    """torchvision networks (ceil-mode pools and concatenations; residual blocks with batch norm)
    exported by torch.onnx.export at 64×64 import with their parameter names and predict as onnxruntime."""
    torch.manual_seed(0)
    module = getattr(torchvision_models(), name)(num_classes=10)
    with torch.no_grad():
        spread_statistics(module)
    shape = (3, 64, 64)
    torch_export(module, shape, tmp_path / "tv.onnx")
    net = cc.from_onnx(tmp_path / "tv.onnx")
    model = cc.compile(net, input_shape=shape, backend="numpy")
    assert list(model.state_dict()) == list(module.state_dict())
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(tmp_path / "tv.onnx", x)[0])


SLOW = pytest.mark.slow


def spread_running_statistics(module, seed=0):
    """Running statistics away from 0 and 1 (eval-mode predictions check them; training-mode steps
    only update them, so the steps' conditioning is the network's own)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


NO_DROPOUT = {"dropout": 0.0}  # the eval-mode file has no Dropout: PyTorch's training run must not drop either
ONNX_FINE_TUNE = [  # (model, input size, batch, constructor arguments)
    ("resnet18", 64, 4, {}), ("squeezenet1_1", 64, 4, NO_DROPOUT), ("resnet50", 64, 4, {}),
    ("mobilenet_v2", 64, 4, NO_DROPOUT), ("densenet121", 64, 4, {}),
    ("googlenet", 64, 4, {"aux_logits": False, "init_weights": True, "dropout": 0.0}),
    # torch.onnx.export writes an adaptive pool only where its output size divides its input size
    # (or is 1×1): AlexNet's (6, 6) and VGG's (7, 7) pools need 224×224 inputs
    ("alexnet", 224, 2, NO_DROPOUT), ("vgg11_bn", 224, 2, NO_DROPOUT),
]


@SLOW
@pytest.mark.parametrize("name, size, batch, kw", ONNX_FINE_TUNE, ids=[row[0] for row in ONNX_FINE_TUNE])
def test_torchvision_onnx_import_fine_tunes(name, size, batch, kw, tmp_path):
    """A torchvision network's torch.onnx.export file (eval mode, batch norm kept as its own node),
    imported: it predicts what onnxruntime computes (1e-5), and 3 SGD steps (batch norm in training)
    give PyTorch's losses, parameters and running statistics on the original module within 1e-4.

    Compared in float64 on both sides, because float32 cannot hold 1e-4 here: PyTorch's own float32
    run is already far from its float64 run after these 3 steps (largest relative difference of a
    parameter or buffer: resnet18 3 %, squeezenet1_1 3 %, densenet121 56 %, vgg11_bn 57 %,
    mobilenet_v2 85 %, googlenet 100 %, resnet50 190 %, on small batch-norm or conv biases; only
    alexnet, without batch norm, stays at 2e-7), as batch norm over a few values per channel divides
    by small standard deviations and near-ties of max pooling and ReLU route gradients either way.
    The float64 runs of the two libraries agree to about 1e-9 (mobilenet_v2: 5e-10).

    The configuration is well conditioned on purpose: at 32×32 with a batch of 2, mobilenet_v2's
    blocks after its last stride 2 run at 1×1 and their batch norms normalise 2 values per channel; PyTorch's
    first gradients reach 1e7 and PyTorch against itself, with the input changed by 1e-15, ends
    three steps 1e3 apart. At 64×64 with a batch of 4 it is 16 values and the same probe stays
    within 3e-10."""
    torch.manual_seed(0)
    module = getattr(torchvision_models(), name)(num_classes=10, **kw)
    with torch.no_grad():
        spread_running_statistics(module)
    shape = (3, size, size)
    torch_export(module, shape, tmp_path / "tv.onnx")
    model = cc.compile(cc.from_onnx(tmp_path / "tv.onnx"), input_shape=shape, loss=nn.CrossEntropyLoss(),
                       optimizer=cc.optim.SGD(lr=0.01), backend="numpy", dtype="float64")
    assert list(model.state_dict()) == list(module.state_dict())  # every batch norm kept, PyTorch's names
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(tmp_path / "tv.onnx", x)[0])  # eval mode: the running statistics
    (tmp_path / "tv.onnx").unlink()  # (VGG's file is half a gigabyte)
    fine_tune_against_torch(module.double(), model, shape, np.random.default_rng(0), batch=batch, lr=0.01)


@pytest.mark.parametrize("name, size", [("squeezenet1_1", 64)] + [
    pytest.param(n, s, marks=SLOW) for n, s in [("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 64),
                                                ("googlenet", 64), ("densenet121", 64), ("alexnet", 224),
                                                ("vgg11_bn", 224)]])
def test_export_of_compiled_torchvision_module(name, size, tmp_path):
    """A torchvision module compiled as it is (the torch.fx frontend) exports, and onnxruntime
    computes model.predict's outputs."""
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    module = getattr(torchvision_models(), name)(num_classes=10, **kw).eval()
    model = cc.compile(module, input_shape=(3, size, size), backend="numpy")
    randomize_statistics(model, np.random.default_rng(0))
    model.export_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng(1).normal(size=(1, 3, size, size)).astype(np.float32)
    assert_close(run_onnx(tmp_path / "m.onnx", x)[0], model.predict(x))


def test_own_export_round_trips(tmp_path):
    """Our export imported again: the same outputs as the original model and onnxruntime, the same
    parameter names, and the same 3 SGD steps (momentum, batch norm in training) as the original."""
    shape, loss = (3, 8, 8), nn.CrossEntropyLoss()
    original = cc.compile(SmallResidual(), input_shape=shape, loss=loss, optimizer=cc.optim.SGD(lr=0.05, momentum=0.9),
                          backend="numpy", seed=2)
    rng = np.random.default_rng(5)
    randomize_statistics(original, rng)
    original.export_onnx(tmp_path / "small.onnx")
    imported = cc.compile(cc.from_onnx(tmp_path / "small.onnx"), input_shape=shape, loss=loss,
                          optimizer=cc.optim.SGD(lr=0.05, momentum=0.9), backend="numpy")
    x = rng.normal(size=(4, *shape)).astype(np.float32)
    assert_close(imported.predict(x), run_onnx(tmp_path / "small.onnx", x)[0])
    assert_close(imported.predict(x), original.predict(x))
    assert list(imported.state_dict()) == list(original.state_dict())
    for _ in range(3):
        xs, y = rng.normal(size=(8, *shape)).astype(np.float32), rng.integers(0, 10, 8)
        assert abs(imported.train_step(xs, y) - original.train_step(xs, y)) < 1e-4
    for k, v in imported.state_dict().items():
        assert_close(v, original.state_dict()[k], 1e-4)


def test_own_export_of_two_heads_round_trips(tmp_path):
    """A network with a dict of heads comes back as a network returning the same dict."""
    spec = runpy.run_path(str(EXAMPLES / "bbox.py"))
    model = cc.compile(spec["net"], input_shape=spec["input_shape"], backend="numpy")
    model.export_onnx(tmp_path / "bbox.onnx")
    back = cc.compile(cc.from_onnx(tmp_path / "bbox.onnx"), input_shape=spec["input_shape"], backend="numpy")
    x = np.random.default_rng(0).normal(size=(2, *spec["input_shape"])).astype(np.float32)
    want, got = model.predict(x), back.predict(x)
    assert set(got) == {"cls", "box"}
    for k in want:
        assert_close(got[k], want[k])


# ----- ONNX in: conventions, written by hand --------------------------------------------------------

def single_node_model(path, op, shape, out_channels=None, weight=None, **attrs):
    """A one-node ONNX file (with the weight as an initializer named ``<op>.weight``)."""
    inputs, inits = ["input"], []
    if weight is not None:
        inits.append(numpy_helper.from_array(weight, "layer.weight"))
        inputs.append("layer.weight")
    node = helper.make_node(op, inputs, ["output"], name=op, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("size, op, attrs", [
    (7, "Conv", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])),  # the extra row is never read
    (8, "Conv", dict(kernel_shape=[4, 4], auto_pad="SAME_UPPER")),  # padding='same'
    (9, "Conv", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    (7, "MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])),  # as ceil_mode
    (7, "MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    (7, "AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])),  # count_include_pad=0
    (8, "AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1, ceil_mode=1)),
    (7, "AveragePool", dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", count_include_pad=1)),
])
def test_onnx_padding_conventions(size, op, attrs, tmp_path):
    """auto_pad and asymmetric pads import where cnncompile's symmetric padding, padding='same' or
    ceil_mode computes the same windows (and divisors), checked against onnxruntime."""
    weight = np.random.default_rng(0).normal(size=(3, 2, *attrs["kernel_shape"])).astype(np.float32) \
        if op == "Conv" else None
    path = single_node_model(tmp_path / "m.onnx", op, (2, size, size), weight=weight, **attrs)
    model = cc.compile(cc.from_onnx(path), input_shape=(2, size, size), backend="numpy")
    x = np.random.default_rng(1).normal(size=(2, 2, size, size)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(path, x)[0])


@pytest.mark.parametrize("size, op, attrs, message", [
    (8, "Conv", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]), "pads both sides alike"),
    (8, "Conv", dict(kernel_shape=[4, 4], auto_pad="SAME_LOWER"), "pads both sides alike"),
    (7, "AveragePool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], count_include_pad=1),
     "divisors"),
])
def test_onnx_padding_without_equivalent_is_refused(size, op, attrs, message, tmp_path):
    """Pads no cnncompile padding reproduces are a CompileError naming the node and the pads."""
    weight = np.ones((3, 2, *attrs["kernel_shape"]), np.float32) if op == "Conv" else None
    path = single_node_model(tmp_path / "m.onnx", op, (2, size, size), weight=weight, **attrs)
    with pytest.raises(cc.CompileError, match=rf"ONNX node '{op}' \({op}\): pads .*{message}"):
        cc.compile(cc.from_onnx(path), input_shape=(2, size, size), backend="numpy")


def test_matmul_add_clip_and_softmax_import(tmp_path):
    """Scalar arithmetic (1 − x, x / 2) is traced, MatMul + Add become one dense layer (bias
    included), Clip becomes Hardtanh or ReLU, Softmax at the output stays; the file's values are
    the parameters, trainable."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(12, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w2 = rng.normal(size=(4, 6)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
             helper.make_node("Sub", ["one", "flat"], ["s"]), helper.make_node("Div", ["s", "two"], ["f"]),
             helper.make_node("MatMul", ["f", "w1"], ["m"], name="fc1"), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
             helper.make_node("Clip", ["c", "zero"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["g"], name="fc2", transB=1),
             helper.make_node("Softmax", ["g"], ["output"], axis=-1)]
    inits = [numpy_helper.from_array(v, n) for n, v in
             [("w1", w1), ("b1", b1), ("w2", w2), ("lo", np.float32(-0.5)), ("hi", np.float32(1.0)),
              ("zero", np.float32(0.0)), ("one", np.float32(1.0)), ("two", np.float32(2.0))]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    net = cc.from_onnx(path)
    kinds = [type(m).__name__ for _, m in net.named_modules() if _]
    assert kinds.count("Linear") == 2 and "Hardtanh" in kinds and "ReLU" in kinds and "Softmax" in kinds
    model = cc.compile(net, input_shape=(3, 2, 2), loss=nn.MSELoss(), optimizer=cc.optim.SGD(lr=0.1),
                       backend="numpy")
    x = rng.normal(size=(5, 3, 2, 2)).astype(np.float32)
    assert_close(model.predict(x), run_onnx(path, x)[0])
    np.testing.assert_array_equal(model.state_dict()["fc1.weight"], w1.T)
    before = model.state_dict()["fc2.weight"].copy()
    model.train_step(x, rng.uniform(size=(5, 4)).astype(np.float32))
    assert not np.array_equal(model.state_dict()["fc2.weight"], before)


def test_unsupported_operator_is_named(tmp_path):
    """An ONNX operator with no cnncompile layer is a CompileError naming the node and the supported list."""
    path = single_node_model(tmp_path / "m.onnx", "Resize", (2, 4, 4))
    with pytest.raises(cc.CompileError, match="ONNX node 'Resize' \\(Resize\\): ONNX operator Resize has no "
                                              "cnncompile equivalent; supported: .*Conv"):
        cc.from_onnx(path)
