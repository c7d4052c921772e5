"""Optimizers as update stages (PyTorch's rules), so a backend can fuse them like any stage.

The learning rate and Adam's bias corrections are runtime scalars: schedules change them
without recompiling. Momentum, betas and weight decay are constants of the compiled code.
"""
from __future__ import annotations

import math

from cnncompile.ir.lazy import sympy

from cnncompile.ir.affine import Affine
from cnncompile.ir.expr import grad_name
from cnncompile.ir.expr import Program, Stage, TensorSpec, read
from cnncompile.ir.ops.base import elementwise_domain


class Optimizer:
    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float):
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.lr = float(lr)

    def stages(self, prog: Program) -> list[Stage]:
        out = []
        for p in prog.params:
            shape = prog.tensors[p].shape
            for local in self.state_names:
                prog.add_tensor(TensorSpec(f"{p}.{local}", shape, "state"))
            domain, syms = elementwise_domain(shape)
            at = {name: read(name, *syms) for name in [p, grad_name(p)] + [f"{p}.{s}" for s in self.state_names]}
            index = tuple(Affine.var(s.name) for s in syms)
            for target, body in self.rules(p, at):
                out.append(Stage(out=target, out_index=index, domain=domain, body=body, layer=p, role="update",
                                 note=type(self).__name__))
        return out

    def hyper(self) -> dict:
        return {"lr": self.lr}

    def scalars(self, step: int) -> dict:
        """Runtime values for the update of step ``step`` (counted from 1)."""
        return {"lr": self.lr}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.hyper().items())})"


class SGD(Optimizer):
    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError("SGD: momentum and weight_decay must be ≥ 0")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov momentum requires momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), nesterov
        self.state_names = ("momentum_buffer",) if momentum else ()

    def hyper(self):
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}

    def rules(self, p, at):
        lr, mu = sympy.Symbol("lr"), sympy.Float(self.momentum)
        g = at[grad_name(p)] + sympy.Float(self.weight_decay) * at[p] if self.weight_decay else at[grad_name(p)]
        if not self.momentum:
            return [(p, at[p] - lr * g)]
        buf = at[f"{p}.momentum_buffer"]
        step = g + mu * buf if self.nesterov else buf
        return [(f"{p}.momentum_buffer", mu * buf + g), (p, at[p] - lr * step)]


class Adam(Optimizer):
    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam: betas must be in [0, 1), got {betas}")
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.state_names = ("exp_avg", "exp_avg_sq")

    def hyper(self):
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def scalars(self, step):
        b1, b2 = self.betas
        return {"lr": self.lr, "step_size": self.lr / (1 - b1 ** step), "bc2_sqrt": math.sqrt(1 - b2 ** step)}

    def rules(self, p, at):
        b1, b2 = (sympy.Float(b) for b in self.betas)
        g = at[grad_name(p)] + sympy.Float(self.weight_decay) * at[p] if self.weight_decay else at[grad_name(p)]
        m, v = at[f"{p}.exp_avg"], at[f"{p}.exp_avg_sq"]
        denom = sympy.sqrt(v) / sympy.Symbol("bc2_sqrt") + sympy.Float(self.eps)
        return [(f"{p}.exp_avg", b1 * m + (1 - b1) * g), (f"{p}.exp_avg_sq", b2 * v + (1 - b2) * g ** 2),
                (p, at[p] - sympy.Symbol("step_size") * m / denom)]
