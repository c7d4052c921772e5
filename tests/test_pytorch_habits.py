"""What a PyTorch user types works: model(x), parameters()/named_parameters(), F.softmax and
F.log_softmax inside a forward, x.mean((2, 3))."""
import numpy as np
import torch

import cnncompile as cc
from cnncompile import nn
from cnncompile.nn import functional as F


def Net(nn):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))
    return Net()


def test_call_parameters_and_named_parameters():
    model = cc.compile(Net(nn), input_shape=(1, 6, 6), loss=nn.CrossEntropyLoss(), backend="numpy",
                       optimizer=cc.optim.SGD(lr=0.1))
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(model(x), model.predict(x))
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in Net(torch.nn).named_parameters()]
    assert [p.shape for p in model.parameters()] == [p.shape for _, p in model.named_parameters()]
    before = model.parameters()[0].copy()
    model.train_step(x, np.array([0, 2]))
    assert not np.array_equal(model.parameters()[0], before)  # live arrays: they see the update
    ref = Net(torch.nn)
    ref.load_state_dict(model.to_torch_state_dict())
    np.testing.assert_allclose(model(x), ref(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_functional_softmax_and_log_softmax_match_pytorch():
    def build(nn, F):
        class Heads(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(5, 4)

            def forward(self, x):
                z = self.fc(x)
                return F.log_softmax(z, dim=1), F.softmax(z, dim=1)
        return Heads()

    model = cc.compile(build(nn, F), input_shape=(5,), loss=(nn.NLLLoss(), nn.MSELoss()), dtype="float64",
                       backend="numpy")
    ref = build(torch.nn, torch.nn.functional).double()
    ref.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    rng = np.random.default_rng(1)
    x, y, t = rng.standard_normal((3, 5)), np.array([0, 3, 1]), rng.random((3, 4))
    loss, grads = model.loss_and_grads(x, (y, t))
    a, b = ref(torch.tensor(x))
    ref_loss = torch.nn.functional.nll_loss(a, torch.tensor(y)) + torch.nn.functional.mse_loss(b, torch.tensor(t))
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < 1e-12
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(grads[name], p.grad.numpy(), rtol=1e-10, atol=1e-12)
