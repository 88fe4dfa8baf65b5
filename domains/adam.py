"""Adam for the slope and multiplier optimisation of α-CROWN and branch and bound.

torch.optim.Adam gives the same steps, but constructing the first one in a process imports
torch._dynamo, about 1.4 s on this machine. That is paid again by every `verikit certify`
run and every VNN-COMP instance, which runs in a process of its own. This is the same update
as torch's single-tensor Adam: the defaults betas (0.9, 0.999), eps 1e-8, no weight decay, no
amsgrad, the same operations in the same order, so the iterates are equal bit for bit
(tests/test_adam.py compares them with torch's).
"""
from __future__ import annotations

from typing import Iterable, Union

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


class Adam:
    """Adam over `params`: a list of tensors (with `lr`), or of groups {"params": [...], "lr": x}."""

    def __init__(self, params: Iterable[Union[torch.Tensor, dict]], lr: float = 1e-3):
        params = list(params)
        if params and isinstance(params[0], dict):
            self.groups = [{"params": list(g["params"]), "lr": float(g.get("lr", lr))} for g in params]
        else:
            self.groups = [{"params": params, "lr": float(lr)}]
        self.state: dict = {}  # id(param) -> (step, first moment, second moment)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = BETAS
        for g in self.groups:
            lr = g["lr"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                key = id(p)
                if key not in self.state:
                    self.state[key] = [0, torch.zeros_like(p, memory_format=torch.preserve_format),
                                       torch.zeros_like(p, memory_format=torch.preserve_format)]
                st = self.state[key]
                st[0] += 1
                m, v = st[1], st[2]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = float(st[0])  # torch keeps the step count as a float tensor
                step_size = lr / (1 - beta1 ** step)
                denom = (v.sqrt() / (1 - beta2 ** step) ** 0.5).add_(EPS)
                p.addcdiv_(m, denom, value=-step_size)
