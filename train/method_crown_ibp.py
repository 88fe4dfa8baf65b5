"""CROWN-IBP training (Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh: Towards Stable and
Efficient Training of Verifiably Robust Neural Networks, ICLR 2020).

The worst-case margins are a mix of CROWN-IBP's and IBP's lower bounds,
    z = β · z_CROWN-IBP + (1 - β) · z_IBP,
and the loss mixes the clean and the worst-case cross-entropy,
    L = κ · CE(clean logits) + (1 - κ) · CE(-z).
β and κ move linearly from their start to their end value while ε ramps up (with ε_t / ε), as
in the paper. The paper's values (Section 4 and Appendix C): β from 1 to 0; κ from 1 to 0
(κ_end = 0.5 in some CIFAR settings). β = 0 everywhere is IBP with Gowal et al.'s κ mixing.
The IBP part uses the run's --domain (box); the CROWN part the `crown-ibp` domain.
"""
from __future__ import annotations

import torch.nn.functional as F

from verikit.bounds import Box

from .losses import certified_loss, margin_spec
from .methods import MethodOption, StepInputs, StepLoss, TrainingMethod, register_method

PAPER = "Zhang et al. 2020, Sec. 4 / App. C"


@register_method
class CrownIbpMethod(TrainingMethod):
    name = "crown-ibp"
    description = "CROWN-IBP: β·CROWN-IBP + (1-β)·IBP margin bounds, κ·clean loss, both ramped with ε"
    paper = ("Zhang et al.: Towards Stable and Efficient Training of Verifiably Robust Neural Networks, "
             "ICLR 2020")
    options = {"beta_start": MethodOption(1.0, "weight of the CROWN-IBP bound at the ramp's start", f"1 ({PAPER})"),
               "beta_end": MethodOption(0.0, "... at its end (and after)", f"0 ({PAPER})"),
               "kappa_start": MethodOption(1.0, "weight of the clean loss at the ramp's start", f"1 ({PAPER})"),
               "kappa_end": MethodOption(0.0, "... at its end (and after)", f"0, or 0.5 on some CIFAR runs ({PAPER})")}

    def check(self):
        self.check_fraction("beta_start", "beta_end", "kappa_start", "kappa_end")

    def weights(self, progress: float) -> tuple[float, float]:
        c = self.config
        beta = c["beta_start"] + (c["beta_end"] - c["beta_start"]) * progress
        kappa = c["kappa_start"] + (c["kappa_end"] - c["kappa_start"]) * progress
        return beta, kappa

    def loss(self, step: StepInputs) -> StepLoss:
        from verikit.domains import get_domain

        t = step.trainer
        beta, kappa = self.weights(step.progress)
        ball = Box.linf_ball(step.x, step.eps, t.cfg.data_range)
        ball = Box(ball.lo.detach(), ball.hi.detach())
        ctx = t.batch_norm_context(step.x, step.shard)
        ibp = certified_loss(t.train_graph, t.domain, ball, step.y, t.num_classes, ctx)
        lower = ibp.lower
        if beta > 0:
            spec = margin_spec(step.y, t.num_classes, dtype=ball.lo.dtype)
            crown = get_domain("crown-ibp").bound(t.train_graph, ball, spec, ctx=ctx).info["crown_ibp_lower"]
            lower = beta * crown + (1 - beta) * ibp.lower
        robust = F.cross_entropy(-lower, step.y)
        loss = robust
        if kappa > 0:
            clean = t.graph.forward(step.x, ctx=ctx) if ctx is not None else t.model(step.x)
            loss = kappa * F.cross_entropy(clean, step.y) + (1 - kappa) * robust
        return StepLoss(loss, lower, ibp.store, ball)
