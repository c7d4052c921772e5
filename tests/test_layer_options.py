"""The layer options PyTorch users pass every day, against PyTorch in float64: pooling with
dilation, ceil_mode and divisor_override; convolutions with padding='same'/'valid' and non-zero
padding modes; adaptive pooling with windows that do not tile the input; Flatten over inner axes;
batch norm without running statistics, with a cumulative average, called twice; channel dropout.
Each network is built by ONE function called with ``torch.nn`` or ``cnncompile.nn``, with the
options passed positionally where PyTorch's order matters. Options that cannot run are refused
with a CompileError naming the layer and the option."""
import re
from math import floor

import numpy as np
import pytest

import cnncompile as cc
from cnncompile import nn as cnn
from cnncompile.ir.expr import var_bounds
from helpers import check_gradients, relative, torch_state

import torch  # noqa: E402  (the test extra)

BACKENDS = ["numpy", "llvm"]
TOL = 1e-10  # float64 on both sides: only summation order differs


def pool_net(nn):
    """13×11 → max (dilation 2, ceil: partial last windows) → mean (ceil, window clipped to
    input + padding) → sum / 3 (divisor_override) → mean (ceil, count_include_pad=False)."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, 1, 1),
        nn.MaxPool2d(3, 2, 1, 2, False, True),
        nn.Conv2d(3, 4, 1),
        nn.AvgPool2d(3, 2, 1, True, True),
        nn.Tanh(),
        nn.AvgPool2d(2, 1, 0, True, False, 3),
        nn.AvgPool2d(2, 2, 0, True, False),
        nn.Flatten(), nn.Linear(8, 5))


def padding_net(nn):
    """Reflect (positional padding_mode), circular and replicate padding, 'same' with even kernels
    and dilation (one more row/column after than before), zero 'same' and 'valid'."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, 1, 1, 1, 1, True, "reflect"),
        nn.Conv2d(3, 3, (2, 3), padding="same", padding_mode="circular"), nn.Tanh(),
        nn.Conv2d(3, 4, 4, padding="same", dilation=(1, 2), padding_mode="replicate"),
        nn.Conv2d(4, 4, (3, 2), padding="same", bias=False), nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, padding="valid"),
        nn.Flatten(), nn.Linear(3 * 4 * 3, 5))


def adaptive_net(nn):
    """9×8 → max pool in ceil mode whose extra window would start in the right padding (dropped:
    5×5) → adaptive mean (3, None) over windows of 2, 3, 2 rows → adaptive max 2×3 over
    overlapping windows → Flatten(2) keeps (N, C, H·W) → Flatten."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.MaxPool2d(2, 2, 1, ceil_mode=True),
        nn.AdaptiveAvgPool2d((3, None)), nn.Conv2d(4, 4, 1),
        nn.AdaptiveMaxPool2d((2, 3)),
        nn.Flatten(2), nn.Tanh(), nn.Flatten(1, -1), nn.Linear(4 * 2 * 3, 5))


CASES = [(pool_net, (2, 13, 11)), (padding_net, (2, 9, 8)), (adaptive_net, (2, 11, 10))]


def data(input_shape, n=3, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *input_shape)), rng.integers(0, classes, n)


def twins(builder, input_shape, backend, **kw):
    model = cc.compile(builder(cnn), input_shape=input_shape, loss=cnn.CrossEntropyLoss(), backend=backend,
                       dtype="float64", seed=2, **kw)
    ref = builder(torch.nn).double()
    ref.load_state_dict(torch_state(model))
    return model, ref


def assert_grads_match(model, ref, x, y):
    """Loss, every parameter gradient and the input gradient against torch autograd."""
    loss, grads = model.loss_and_grads(x, y)
    xt = torch.tensor(x, requires_grad=True)
    ref_loss = torch.nn.functional.cross_entropy(ref(xt), torch.tensor(y))
    ref_loss.backward()
    assert relative(loss, ref_loss.item()) < TOL
    ref_params = dict(ref.named_parameters())
    assert list(grads) == list(ref_params)
    for name, g in grads.items():
        assert relative(g, ref_params[name].grad.numpy()) < TOL, name
    assert relative(model.input_gradient(x, y), xt.grad.numpy()) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("builder,input_shape", CASES)
def test_options_match_pytorch(backend, builder, input_shape):
    model, ref = twins(builder, input_shape, backend, input_grad=True)
    x, y = data(input_shape)
    assert_grads_match(model, ref, x, y)
    np.testing.assert_allclose(model.predict(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


def small_pools(nn):
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.MaxPool2d(2, 2, 0, 2, False, True), nn.AvgPool2d(2, 2, 1, True, False),
                         nn.Flatten(), nn.Linear(8, 3))


def small_padding(nn):
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"),
                         nn.Conv2d(2, 1, (2, 3), padding="same", padding_mode="circular"),
                         nn.Conv2d(1, 1, 2, padding="same", padding_mode="replicate"), nn.Flatten(), nn.Linear(42, 3))


def small_adaptive(nn):
    return nn.Sequential(nn.Conv2d(1, 2, 2), nn.AdaptiveAvgPool2d((None, 3)), nn.Conv2d(2, 2, 1),
                         nn.AdaptiveMaxPool2d((4, 2)), nn.Flatten(2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("builder", [small_pools, small_padding, small_adaptive])
def test_options_finite_differences(builder):
    """Small twins of the networks above against float64 central differences."""
    x, y = data((1, 7, 6), n=2, classes=3, seed=1)
    check_gradients(builder(cnn), (1, 7, 6), cnn.CrossEntropyLoss(), x, y, "numpy", tol=1e-6)


def test_ceil_mode_window_bounds_in_explain():
    """The ceil-mode max pool's stage bounds its window by the input, and explain shows it: the last
    window (x = 5 of 6 rows of a 13-row input: rows 9, 11, 13) keeps i ≤ ⌊(13 − 10)/2⌋ = 1."""
    model = cc.compile(pool_net(cnn), input_shape=(2, 13, 11), backend="numpy")
    assert model.graph_ir.shape("1.out")[2:] == (6, 5)
    (stage,) = [s for s in model.prog.forward if s.layer == "1"]
    _, uppers = var_bounds(stage)["i"]

    def last_i(x):  # the loop's upper bound on i, each bound ⌊(num at x)/div⌋
        return min(floor((num.const + num.coeff("x") * x) / div) for num, div in uppers)

    assert [last_i(x) for x in range(6)] == [2, 2, 2, 2, 2, 1]
    text = model.explain("1")
    assert re.search(r"max_\{i=max\(0, [^}]*\)\.\.min\(2, [^}]*13[^}]*\)\}", text), text


def bn_net(nn):
    class Net(nn.Module):
        """A cumulative-average batch norm called twice per step, and one without running statistics
        and without β (PyTorch 2.13's keyword-only bias=False)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3, 1e-5, None)
            self.act = nn.Tanh()
            self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
            self.free = nn.BatchNorm2d(3, track_running_stats=False, bias=False)
            self.head = nn.Linear(3 * 6 * 5, 5)

        def forward(self, x):
            h = self.act(self.bn(self.conv(x)))
            h = self.free(self.bn(self.conv2(h)))
            return self.head(h.flatten(1))

    return Net()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_options_train_like_pytorch(backend):
    model, ref = twins(bn_net, (2, 6, 5), backend, optimizer=cc.optim.SGD(lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    assert "free.running_mean" not in model.state_dict() and "free.bias" not in model.state_dict()
    assert list(model.state_dict()) == list(ref.state_dict())
    for step in range(3):
        x, y = data((2, 6, 5), n=4 + step, seed=step)
        loss = model.train_step(x, y)
        opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
        ref_loss.backward()
        opt.step()
        assert relative(loss, ref_loss.item()) < TOL
    ours, theirs = model.state_dict(), ref.state_dict()
    assert int(ours["bn.num_batches_tracked"]) == int(theirs["bn.num_batches_tracked"]) == 6  # two calls a step
    for name, value in ours.items():
        assert relative(value, theirs[name].numpy()) < 1e-9, name
    model.eval(), ref.eval()  # eval: running statistics for bn, batch statistics for free
    x, y = data((2, 6, 5), n=3, seed=9)
    assert_grads_match_params(model, ref, x, y)
    np.testing.assert_allclose(model.predict(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


def assert_grads_match_params(model, ref, x, y):
    loss, grads = model.loss_and_grads(x, y)
    ref.zero_grad()
    ref_loss = torch.nn.functional.cross_entropy(ref(torch.tensor(x)), torch.tensor(y))
    ref_loss.backward()
    assert relative(loss, ref_loss.item()) < TOL
    for name, p in ref.named_parameters():  # (a bias before batch norm has a zero gradient: rounding only)
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def test_batch_norm_counter_loads_from_pytorch():
    """A PyTorch state_dict's num_batches_tracked continues the cumulative average where it left off."""
    model, ref = twins(bn_net, (2, 6, 5), "numpy", optimizer=cc.optim.SGD(lr=0.01))
    for seed in range(2):
        x, _ = data((2, 6, 5), n=4, seed=seed)
        ref(torch.tensor(x))  # two steps in training mode: bn counts 4, its statistics average 4 batches
    model.load_state_dict(torch_state_of(ref))
    assert int(model.state_dict()["bn.num_batches_tracked"]) == 4
    x, y = data((2, 6, 5), n=4, seed=5)
    model.train_step(x, y)  # the running statistics come from the forward pass, before the update
    ref(torch.tensor(x))
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert relative(model.state_dict()[name], ref.state_dict()[name].numpy()) < 1e-9, name


def torch_state_of(ref):
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout2d_drops_whole_channels(backend):
    """Training: the same mask as torch's x·mask[b, c] gives the same loss and gradients; each
    (example, channel) is kept whole (1/(1−p)) or dropped whole; eval is the identity."""
    def net(nn, drop):
        return nn.Sequential(nn.Conv2d(2, 6, 3), drop, nn.Flatten(), nn.Linear(6 * 4 * 3, 5))

    model = cc.compile(net(cnn, cnn.Dropout2d(0.5)), input_shape=(2, 6, 5), loss=cnn.CrossEntropyLoss(),
                       backend=backend, dtype="float64", seed=2)
    x, y = data((2, 6, 5), n=4)
    (mask,) = model.noise(len(x), draw=model.noise_draws).values()
    assert mask.shape == (4, 6) and set(np.unique(mask)) <= {0.0, 2.0} and 0 < (mask == 0).sum() < mask.size

    class ChannelMask(torch.nn.Module):
        def forward(self, h):
            return h * torch.tensor(mask)[:, :, None, None]

    ref = net(torch.nn, ChannelMask()).double()
    ref.load_state_dict(torch_state(model))
    assert_grads_match_params(model, ref, x, y)
    model.eval()
    ref = net(torch.nn, torch.nn.Dropout2d(0.5)).double().eval()
    ref.load_state_dict(torch_state(model))
    np.testing.assert_allclose(model.predict(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_avg_pool_positional_order_is_pytorchs():
    """AvgPool2d(3, 1, 1, False) is ceil_mode=False (count_include_pad stays True), as in PyTorch."""
    layer = cnn.AvgPool2d(3, 1, 1, False)
    assert layer.ceil_mode is False and layer.count_include_pad is True
    assert cnn.AvgPool2d(3, 1, 1, False, False).count_include_pad is False


def compile_one(layer, input_shape=(2, 5, 5)):
    return cc.compile(cnn.Sequential(layer), input_shape=input_shape, backend="numpy", dtype="float64")


@pytest.mark.parametrize("make,message", [
    (lambda: cnn.MaxPool2d(2, return_indices=True), r"MaxPool2d: return_indices=True is not supported"),
    (lambda: cnn.AdaptiveMaxPool2d(2, True), r"AdaptiveMaxPool2d: return_indices=True is not supported"),
    (lambda: cnn.Conv2d(1, 2, 3, paddin=1), r"Conv2d: .*'paddin'.*Conv2d takes \(in_channels, .*padding_mode"),
    (lambda: cnn.AvgPool2d(2, 2, 0, False, True, None, 7), r"AvgPool2d: .*too many positional.*divisor_override"),
    (lambda: cnn.BatchNorm2d(), r"BatchNorm2d: .*num_features"),
    (lambda: cnn.Conv2d(1, 2, 3, padding_mode="mirror"), r"Conv2d: padding_mode='mirror' is not one of 'zeros'"),
    (lambda: cnn.Conv2d(1, 2, 3, padding="full"), r"Conv2d: padding='full' is not one of 'same', 'valid'"),
    (lambda: cnn.Conv2d(1, 2, 3, dtype="float16"), r"Conv2d: dtype='float16' is not supported.*cc.compile"),
    (lambda: cnn.BatchNorm2d(3, momentum=2.0), r"BatchNorm2d: momentum=2.0 is not supported"),
    (lambda: cnn.Flatten(0), r"Flatten: start_dim=0 is not supported; the batch axis stays first"),
    (lambda: cnn.Sigmoid(True), r"Sigmoid: .*positional.*Sigmoid takes \(\)"),
    (lambda: cnn.Dropout2d(p=1.5), r"Dropout2d: p must be a probability"),
    (lambda: cnn.functional.max_pool2d(None, 2, return_indices=True), r"max_pool2d: return_indices=True"),
    (lambda: cnn.functional.avg_pool2d(None, 2, 2, 0, False, True, None, 1), r"functional.avg_pool2d: too many"),
    (lambda: cnn.functional.flatten(None, start=1), r"functional.flatten: .*'start'.*start_dim=1"),
    (lambda: cnn.AvgPool2d(2, divisor_override=0), r"AvgPool2d: divisor_override=0 is not supported"),
])
def test_refused_options_name_layer_and_option(make, message):
    with pytest.raises(cc.CompileError, match=message):
        make()


@pytest.mark.parametrize("layer,shape,message", [
    (cnn.Conv2d(2, 2, 3, stride=2, padding="same"), (2, 5, 5), r"padding='same' is not supported for strided"),
    (cnn.Conv2d(2, 2, 3, padding=5, padding_mode="reflect"), (2, 5, 5), r"padding_mode='reflect' needs the"),
    (cnn.Conv2d(2, 2, 3, padding=6, padding_mode="circular"), (2, 5, 5), r"padding_mode='circular' needs the"),
    (cnn.Flatten(2, 1), (2, 5, 5), r"end_dim=1 comes before start_dim=2"),
    (cnn.Flatten(-4), (2, 5, 5), r"start_dim=-4 would merge the batch axis"),
    (cnn.Flatten(1, 4), (2, 5, 5), r"not axes of the input"),
    (cnn.MaxPool2d(3, padding=2), (2, 5, 5), r"padding 2 must be at most half the kernel size"),
])
def test_refused_geometries_name_layer_and_option(layer, shape, message):
    with pytest.raises(cc.CompileError, match=message):
        compile_one(layer, shape)


def test_flatten_inner_axes_keep_batch_first():
    """Flatten(2), Flatten(1, -2) and Flatten(-2) give PyTorch's shapes and values."""
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5))
    for args in [(2,), (1, -2), (-2,), (1, 1)]:
        model = compile_one(cnn.Flatten(*args), (3, 4, 5))
        np.testing.assert_array_equal(model.predict(x), torch.nn.Flatten(*args)(torch.tensor(x)).numpy())

    class Inner(cnn.Module):
        def forward(self, h):
            return cnn.functional.flatten(h.flatten(2), 1, 2)  # tensor method, then functional

    model = cc.compile(Inner(), input_shape=(3, 4, 5), backend="numpy", dtype="float64")
    np.testing.assert_array_equal(model.predict(x), x.reshape(2, -1))


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
@pytest.mark.parametrize("pool,size", [("avg", (2, 4, 5)), ("max", (2, 3, 4))])
def test_adaptive_pools_larger_than_their_input(backend, pool, size):
    """An output larger than the input (AlexNet's and VGG's (6, 6)/(7, 7) pools on small images):
    windows of one or two rows that overlap, as PyTorch; forward, gradients and input gradient."""
    def build(nn):
        layer = nn.AdaptiveAvgPool2d((6, 7)) if pool == "avg" else nn.AdaptiveMaxPool2d((5, 7))
        return nn.Sequential(nn.Conv2d(2, 3, 1), layer, nn.Flatten())

    model = cc.compile(build(cnn), input_shape=size, loss=cnn.MSELoss(), dtype="float64", backend=backend,
                       input_grad=True)
    ref = build(torch.nn).double()
    ref.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *size))
    y = rng.standard_normal(model.predict(x).shape)
    xt = torch.tensor(x, requires_grad=True)
    out = ref(xt)
    torch.nn.functional.mse_loss(out, torch.tensor(y)).backward()
    np.testing.assert_allclose(model.predict(x), out.detach().numpy(), rtol=1e-12, atol=1e-12)
    _, grads = model.loss_and_grads(x, y)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.input_gradient(x, y), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
