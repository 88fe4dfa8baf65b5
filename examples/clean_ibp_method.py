"""A user-defined training method in ~25 lines: a mix of the clean and the IBP loss.

    PYTHONPATH=examples VERIKIT_PLUGINS=clean_ibp_method verikit methods
    PYTHONPATH=examples VERIKIT_PLUGINS=clean_ibp_method verikit train --method clean-ibp \
        --method-option kappa=0.3 --model cnn-small --epochs 6

The contract (README, "Training methods"): `loss(step)` gets the batch (`step.x`, `step.y`),
this step's ε (`step.eps`, > 0: the loop trains plainly during the warm-up) and the trainer
(`step.trainer`: `model`, `train_graph`, `domain`, `num_classes`, `batch_norm_context(x)`);
it returns a StepLoss: the loss, and optionally the lower margin bounds, bound store and input
region it certified (for the train-certified fraction and the warm-up regulariser).
"""
from verikit.bounds import Box
from verikit.train.losses import certified_loss
from verikit.train.methods import MethodOption, StepLoss, TrainingMethod, register_method


@register_method
class CleanIbp(TrainingMethod):
    name = "clean-ibp"
    description = "κ · clean loss + (1 - κ) · IBP loss (example plug-in)"
    options = {"kappa": MethodOption(0.5, "weight of the clean loss")}

    def loss(self, step):
        t, k = step.trainer, self.config["kappa"]
        ball = Box.linf_ball(step.x, step.eps, t.cfg.data_range)
        ctx = t.batch_norm_context(step.x, step.shard)
        ibp = certified_loss(t.train_graph, t.domain, ball, step.y, t.num_classes, ctx)
        clean = certified_loss(t.train_graph, t.domain, Box(step.x, step.x), step.y, t.num_classes, ctx).loss
        return StepLoss(k * clean + (1 - k) * ibp.loss, ibp.lower, ibp.store, ball)
