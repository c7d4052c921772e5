"""The example networks in PyTorch: the example file run with ``torch.nn`` in place of
``cnncompile.nn`` (same names, same layers), stepped eagerly or through ``torch.compile``."""
from __future__ import annotations

import numpy as np
import torch

from netdefs import EXAMPLES


def torch_net(name):
    src = (EXAMPLES / f"{name}.py").read_text()
    src = src.replace("from cnncompile import nn, optim", "import torch.nn as nn\nfrom cnncompile import optim")
    src = src.replace("import cnncompile as cc\n", "import torch as cc\n")  # cc.cat → torch.cat
    namespace = {"__file__": str(EXAMPLES / f"{name}.py"), "__name__": "bench_torch"}
    exec(compile(src, f"{name}.py", "exec"), namespace)
    return namespace["net"]


class TorchTrainer:
    """cnncompile's weights and SGD hyper-parameters in torch.optim.SGD; ``compiled``: the module
    through torch.compile (compiled at the first step)."""

    def __init__(self, name: str, state: dict, hyper: dict, compiled: bool = False):
        self.net = torch_net(name)
        self.net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
        self.net.train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=hyper["lr"], momentum=hyper["momentum"],
                                   weight_decay=hyper["weight_decay"], nesterov=hyper.get("nesterov", False))
        self.forward = torch.compile(self.net) if compiled else self.net

    def set_batch(self, x, y):
        self.x, self.y = torch.tensor(x), torch.tensor(y)

    def step(self):
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.loss = loss
        return loss

    def sync(self) -> float:
        return float(self.loss.detach())
