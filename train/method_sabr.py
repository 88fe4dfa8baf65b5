"""The SABR family as registry methods: `sabr` (Müller et al., ICLR 2023), its end points `ibp`
(λ = 1: the whole ε-ball) and `pgd` (λ = 0: the PGD point, adversarial training), and
`standard` training. They run exactly the code the trainer ran before the registry existed,
so the shipped models' recipes reproduce bit for bit."""
from __future__ import annotations

import torch.nn.functional as F

from .losses import certified_loss
from .methods import MethodOption, StepInputs, StepLoss, TrainingMethod, register_method
from .sabr import select_region


@register_method
class StandardMethod(TrainingMethod):
    name = "standard"
    description = "plain cross-entropy training (--eps is only the evaluation radius)"
    uses_domain = False

    def loss(self, step: StepInputs) -> StepLoss:
        return StepLoss(F.cross_entropy(step.trainer.model(step.x), step.y))


def small_box_loss(step: StepInputs, lam: float) -> StepLoss:
    """SABR's loss: the worst-case cross-entropy of the λ·ε box placed at the PGD point."""
    t = step.trainer
    region = select_region(t.model, step.x, step.y, step.eps, lam, t.cfg.data_range, step.generator, step.shard)
    ctx = t.batch_norm_context(step.x, step.shard)
    cl = certified_loss(t.train_graph, t.domain, region, step.y, t.num_classes, ctx)
    return StepLoss(cl.loss, cl.lower, cl.store, region)


@register_method
class SabrMethod(TrainingMethod):
    name = "sabr"
    description = "SABR: worst-case loss of a small box (radius λ·ε) around the PGD point"
    paper = "Müller, Eckert, Fischer, Vechev: Certified Training: Small Boxes are All You Need, ICLR 2023"
    options = {"lambda": MethodOption(0.4, "small-box size λ in [0, 1] (1: IBP, 0: PGD training); "
                                      "also --sabr-lambda",
                                      "Table 6: MNIST ε=0.1: 0.4, ε=0.3: 0.6; CIFAR-10 2/255: 0.1, 8/255: 0.7")}

    @classmethod
    def paper_defaults(cls, dataset, eps):
        from .config import paper_lambda

        return {"lambda": paper_lambda(dataset, eps)}

    def check(self):
        self.check_fraction("lambda")

    def loss(self, step: StepInputs) -> StepLoss:
        return small_box_loss(step, self.config["lambda"])


@register_method
class IbpMethod(TrainingMethod):
    name = "ibp"
    description = "IBP training: worst-case loss of the whole ε-ball (SABR with λ = 1)"
    paper = "Gowal et al.: On the Effectiveness of Interval Bound Propagation, 2018 (Shi et al.'s init, 2021)"

    def loss(self, step: StepInputs) -> StepLoss:
        return small_box_loss(step, 1.0)


@register_method
class PgdMethod(TrainingMethod):
    name = "pgd"
    description = "PGD adversarial training: loss at the attack's point (SABR with λ = 0)"
    paper = "Madry et al.: Towards Deep Learning Models Resistant to Adversarial Attacks, ICLR 2018"

    def loss(self, step: StepInputs) -> StepLoss:
        return small_box_loss(step, 0.0)
