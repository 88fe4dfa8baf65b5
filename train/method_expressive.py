"""Expressive losses (De Palma, Bunel, Dvijotham, Kumar, Stanforth, Lomuscio: Expressive Losses
for Verified Robustness via Convex Combinations, ICLR 2024): three ways of mixing the
adversarial loss (at a PGD point of the ε-ball) with the IBP loss (of the whole ball) by one
weight α in [0, 1]; α = 0 is PGD training, α = 1 is IBP training.

- `mtl-ibp`: (1 - α) · L_adv + α · L_IBP (a convex combination of the losses);
- `exp-ibp`: L_adv^(1 - α) · L_IBP^α (a geometric combination);
- `cc-ibp`:  L((1 - α) · z_adv + α · z_IBP), z = the margins y_label - y_j (at the attack's
  point, and their IBP lower bounds): a convex combination of the logit differences.

The attack is the one SABR uses here (8 PGD steps on the cross-entropy, the step schedule of
verikit.train.sabr), over the whole ε-ball; CTBench's MTL-IBP scripts use a single step
(`attack_steps=1`).
"""
from __future__ import annotations

import torch.nn.functional as F

from verikit.bounds import Box

from .losses import certified_loss
from .methods import MethodOption, StepInputs, StepLoss, TrainingMethod, register_method
from .sabr import PGD_STEPS, pgd_attack

ALPHA_PAPER = ("CTBench's tuned scripts (Mao et al., 2024): MNIST ε=0.3: 0.5, CIFAR-10 8/255: 0.6; "
               "CTBench's README default 0.1; other settings: tune")


def adversarial_and_ibp(step: StepInputs, attack_steps: int):
    """(logits at the PGD point, IBP certified loss of the ε-ball, the ball) for one batch."""
    t = step.trainer
    ball = Box.linf_ball(step.x, step.eps, t.cfg.data_range)
    ball = Box(ball.lo.detach(), ball.hi.detach())
    x_adv = pgd_attack(t.model, step.x, step.y, ball, step.eps, steps=attack_steps, generator=step.generator,
                       shard=step.shard)
    ctx = t.batch_norm_context(step.x, step.shard)
    logits = t.graph.forward(x_adv, ctx=ctx) if ctx is not None else t.model(x_adv)
    ibp = certified_loss(t.train_graph, t.domain, ball, step.y, t.num_classes, ctx)
    return logits, ibp, ball


class _Expressive(TrainingMethod):
    options = {"alpha": MethodOption(0.5, "weight α in [0, 1] of the IBP part (0: PGD training, 1: IBP)",
                                     ALPHA_PAPER),
               "attack_steps": MethodOption(PGD_STEPS, "PGD steps of the attack (over the whole ε-ball)",
                                            "CTBench's MTL-IBP scripts: 1 (verikit default: SABR's 8)")}
    paper = ("De Palma et al.: Expressive Losses for Verified Robustness via Convex Combinations, "
             "ICLR 2024")

    @classmethod
    def paper_defaults(cls, dataset, eps):
        known = {("mnist", 0.3): 0.5, ("cifar10", 8 / 255): 0.6}
        return {"alpha": v for (d, e), v in known.items() if d == dataset and abs(e - eps) < 1e-6}

    def check(self):
        self.check_fraction("alpha")
        if self.config["attack_steps"] < 0:
            from verikit.errors import VerikitError

            raise VerikitError(f"method {self.name!r}: option attack_steps must be >= 0")


@register_method
class MtlIbpMethod(_Expressive):
    name = "mtl-ibp"
    description = "MTL-IBP: (1-α)·adversarial loss + α·IBP loss"

    def loss(self, step: StepInputs) -> StepLoss:
        a = self.config["alpha"]
        logits, ibp, ball = adversarial_and_ibp(step, self.config["attack_steps"])
        loss = (1 - a) * F.cross_entropy(logits, step.y) + a * ibp.loss
        return StepLoss(loss, ibp.lower, ibp.store, ball)


@register_method
class ExpIbpMethod(_Expressive):
    name = "exp-ibp"
    description = "EXP-IBP: adversarial loss^(1-α) · IBP loss^α"

    def loss(self, step: StepInputs) -> StepLoss:
        a = self.config["alpha"]
        logits, ibp, ball = adversarial_and_ibp(step, self.config["attack_steps"])
        adv = F.cross_entropy(logits, step.y)
        loss = adv ** (1 - a) * ibp.loss ** a
        return StepLoss(loss, ibp.lower, ibp.store, ball)


@register_method
class CcIbpMethod(_Expressive):
    name = "cc-ibp"
    description = "CC-IBP: loss of (1-α)·adversarial margins + α·IBP margin bounds"

    def loss(self, step: StepInputs) -> StepLoss:
        a = self.config["alpha"]
        logits, ibp, ball = adversarial_and_ibp(step, self.config["attack_steps"])
        margins = logits.gather(1, step.y[:, None]) - logits  # y_label - y_j, 0 at j = label
        mixed = (1 - a) * margins + a * ibp.lower
        return StepLoss(F.cross_entropy(-mixed, step.y), ibp.lower, ibp.store, ball)
