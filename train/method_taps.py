"""TAPS and STAPS (Mao, Müller, Fischer, Vechev: TAPS: Connecting Certified and Adversarial
Training, NeurIPS 2023) as registry methods.

The network is cut in two. Interval bounds (the run's --domain) through the first part, the
feature extractor, give a latent box per sample; in the second part, the classifier, a PGD
search per margin y_label - y_j looks for the point of the latent box where that margin is
smallest. The margins at those points estimate the worst case over the latent box far more
tightly than the IBP bound, but from above (an estimate, not a bound: TAPS is an unsound
training objective; what the run reports as certified stays the sound IBP bound).

Gradients reach the latent box through a rectified linear connector: a coordinate of a point
within c·(u - l) of the upper bound u passes the gradient to u with weight
(x - (u - c(u - l))) / (c(u - l)) (1 on u itself), likewise for the lower bound l; a coordinate
farther inside passes none; where l = u both get half. The loss is L_TAPS · L_IBP with the
gradient of L_TAPS scaled by α (the IBP factor regularises). STAPS uses SABR's small box
(radius λ·ε at the PGD point) as the input region.

The paper's MNIST recipe (its scripts/train_mnist) uses the CNN7 split before the last two
linear layers, 20 PGD steps, c = 0.5, α = 5, STAPS λ = 0.4 (ε = 0.1) and 0.6 (ε = 0.3), and
trains at twice the test ε (0.2 for 0.1, 0.4 for 0.3): pass that as --eps yourself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.domains.box import propagate_box
from verikit.errors import VerikitError

from .losses import certified_loss
from .methods import MethodOption, StepInputs, StepLoss, TrainingMethod, register_method
from .sabr import select_region

PAPER = "Mao et al. 2023, scripts/train_mnist of their code"
TOL = 1e-5  # latent widths below this count as l = u in the connector


def split_graph(graph: ir.Graph, pgd_layers: int) -> tuple[ir.Graph, ir.Graph]:
    """(feature extractor, classifier): the cut is the input of the `pgd_layers`-th Linear/Conv
    from the end. The classifier must read nothing from before the cut but the cut tensor."""
    cores = [i for i, n in enumerate(graph.nodes) if isinstance(n.op, (ir.Linear, ir.Conv2d))]
    if pgd_layers < 1 or pgd_layers >= len(cores):
        raise VerikitError(f"taps: pgd_layers must be between 1 and {len(cores) - 1} for this model "
                           f"({len(cores)} Linear/Conv layers; the IBP part needs at least one), got {pgd_layers}")
    cut = graph.nodes[cores[-pgd_layers]].inputs[0]
    k = next(i for i, n in enumerate(graph.nodes) if n.name == cut)
    head_names = {graph.input_name} | {n.name for n in graph.nodes[:k + 1]}
    tail = graph.nodes[k + 1:]
    leaks = sorted({i for n in tail for i in n.inputs if i in head_names and i != cut})
    if leaks:
        raise VerikitError(f"taps: the classifier part after {cut!r} also reads {', '.join(leaks)} "
                           f"(a skip connection across the cut); pick another pgd_layers")
    head = ir.Graph(graph.input_name, graph.input_shape, graph.nodes[:k + 1], cut, graph.shapes, graph.source, graph.meta)
    return head, ir.Graph(cut, graph.shapes[cut], tail, graph.output, graph.shapes, graph.source, graph.meta)


class _RectifiedConnector(torch.autograd.Function):
    """Forward: the points (B, k, *latent) unchanged. Backward: gradients to the latent bounds
    (B, *latent) by the rectified linear rule of the module docstring; none to the points."""

    @staticmethod
    def forward(ctx, lo, hi, points, c):
        ctx.save_for_backward(lo, hi, points)
        ctx.c = c
        return points.clone()

    @staticmethod
    def backward(ctx, grad):
        lo, hi, points = ctx.saved_tensors
        lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
        slack = ctx.c * (hi - lo)
        flat = slack <= TOL
        safe = torch.where(flat, torch.ones_like(slack), slack)
        half = torch.full_like(points, 0.5)
        w_hi = torch.where(flat, half, ((points - (hi - slack)) / safe).clamp(0, 1))
        w_lo = torch.where(flat, half, (((lo + slack) - points) / safe).clamp(0, 1))
        return (grad * w_lo).sum(1), (grad * w_hi).sum(1), None, None


def connect(lo: Tensor, hi: Tensor, points: Tensor, c: float) -> Tensor:
    return _RectifiedConnector.apply(lo, hi, points, c)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.alpha * grad, None


def _others(y: Tensor, n: int) -> Tensor:
    """(B, n - 1): the classes other than each sample's label, in increasing order."""
    idx = torch.arange(n, device=y.device).expand(y.shape[0], n)
    return idx[idx != y[:, None]].view(y.shape[0], n - 1)


def _margins(tail: ir.Graph, points: Tensor, y: Tensor, others: Tensor, ctx) -> Tensor:
    """(B, k): y_label - y_others[j] at point j of each sample."""
    B, k = points.shape[:2]
    logits = tail.forward(points.flatten(0, 1), ctx=ctx).reshape(B, k, -1)
    own = logits.gather(2, y.view(B, 1, 1).expand(B, k, 1)).squeeze(2)
    return own - logits.gather(2, others.unsqueeze(2)).squeeze(2)


def _step_sizes(steps: int) -> list:
    """PGD step size (× the latent width) per step: max(0.2, 2/steps), ×0.1 at 70% of the steps
    for 20-50 steps, at 40%/70% up to 80, at 30%/60%/80% beyond (the paper's schedule)."""
    cuts = ([0.7] if 20 <= steps <= 50 else [0.4, 0.7] if 50 < steps <= 80 else [0.3, 0.6, 0.8] if steps > 80 else [])
    marks = {int(steps * f) for f in cuts}
    size, out = max(0.2, 2.0 / steps), []
    for it in range(steps):
        out.append(size)
        if it + 1 in marks:
            size *= 0.1
    return out


def latent_pivots(tail: ir.Graph, lo: Tensor, hi: Tensor, y: Tensor, steps: int, restarts: int,
                  generator=None, ctx=None) -> Tensor:
    """(B, n - 1, *latent): per sample and other class j, the point of [lo, hi] with the smallest
    margin y_label - y_j that sign-gradient PGD found (best iterate over steps and restarts;
    gradients with respect to the points only)."""
    lo, hi = lo.detach(), hi.detach()
    B, n = y.shape[0], tail.output_shape[-1]
    others = _others(y, n)
    lo1, hi1, width = lo.unsqueeze(1), hi.unsqueeze(1), (hi - lo).unsqueeze(1)
    shape = (B, n - 1) + tuple(lo.shape[1:])
    best = torch.full((B, n - 1), float("inf"), dtype=lo.dtype, device=lo.device)
    best_pts = lo1.expand(shape).clone()
    sizes = _step_sizes(steps)
    with torch.enable_grad():
        for _ in range(restarts):
            u = torch.rand(shape, generator=generator, dtype=lo.dtype).to(lo.device)
            pts = lo1 + width * u
            for it in range(steps + 1):
                pts.requires_grad_(True)
                m = _margins(tail, pts, y, others, ctx)
                better = m.detach() < best
                best = torch.where(better, m.detach(), best)
                best_pts[better] = pts.detach()[better]
                if it == steps:
                    break
                (g,) = torch.autograd.grad(m.sum(), pts)
                pts = torch.minimum(torch.maximum(pts.detach() - sizes[it] * width * g.sign(), lo1), hi1)
    return best_pts


def checked_split(trainer, config: dict) -> tuple[ir.Graph, ir.Graph]:
    """The trainer's graph cut for TAPS, refused unless the run bounds with the box domain, which
    the feature extractor's latent box comes from (the methods' `setup` runs it at start-up)."""
    if trainer.domain.name != "box":
        raise VerikitError(f"taps/staps bound the feature extractor with the box domain, not {trainer.domain.name!r}")
    return split_graph(trainer.train_graph, config["pgd_layers"])


def taps_loss(step: StepInputs, region: Box, config: dict, parts: tuple[ir.Graph, ir.Graph]) -> StepLoss:
    t = step.trainer
    head, tail = parts
    ctx = t.batch_norm_context(step.x, step.shard)
    head_store = propagate_box(head, region, ctx=ctx)
    latent = head_store[head.output]
    ibp = certified_loss(tail, t.domain, latent, step.y, t.num_classes, ctx)
    pivots = latent_pivots(tail, latent.lo, latent.hi, step.y, config["steps"], config["restarts"], step.generator, ctx)
    others = _others(step.y, t.num_classes)
    margins = _margins(tail, connect(latent.lo, latent.hi, pivots, config["connector_c"]), step.y, others, ctx)
    estimate = margins.new_zeros(margins.shape[0], t.num_classes).scatter(1, others, margins)
    loss = F.cross_entropy(-estimate, step.y)
    if config["ibp_product"]:
        loss = _ScaleGradient.apply(loss, config["alpha"]) * ibp.loss
    store = BoundStore()
    for source in (head_store, ibp.store):
        for name, box in source.items():
            store.update(name, box)
    return StepLoss(loss, ibp.lower, store, region)


OPTIONS = {
    "pgd_layers": MethodOption(2, "Linear/Conv layers in the PGD (classifier) part, counted from the output",
                               f"2: CNN7 split before its last two linear layers ({PAPER}, block sizes 17 4)"),
    "steps": MethodOption(20, "PGD steps in the latent box per margin", f"20 ({PAPER})"),
    "restarts": MethodOption(1, "PGD restarts (best iterate kept)", "1 (the code's default)"),
    "connector_c": MethodOption(0.5, "connector width c in (0, 1]: the fraction of the latent width near a bound "
                                "that passes gradient to it", f"0.5 ({PAPER}: --soft-thre)"),
    "alpha": MethodOption(5.0, "gradient scale of the TAPS factor in L_TAPS · L_IBP", f"5 ({PAPER}: --alpha-box)"),
    "ibp_product": MethodOption(True, "multiply by the IBP loss (false: the TAPS loss alone)", "true (the code's default)"),
}


class _TapsBase(TrainingMethod):
    def check(self):
        c = self.config
        if not 0 < c["connector_c"] <= 1:
            raise VerikitError(f"method {self.name!r}: option connector_c must lie in (0, 1], got {c['connector_c']}")
        for name in ("steps", "restarts", "pgd_layers"):
            if c[name] < 1:
                raise VerikitError(f"method {self.name!r}: option {name} must be at least 1, got {c[name]}")
        if c["alpha"] <= 0:
            raise VerikitError(f"method {self.name!r}: option alpha must be positive, got {c['alpha']}")

    def setup(self, trainer):
        self.parts = checked_split(trainer, self.config)  # the cut is fixed: made once, checked at start-up


@register_method
class TapsMethod(_TapsBase):
    name = "taps"
    description = "TAPS: IBP through the feature extractor, PGD in the latent box through the classifier"
    paper = "Mao, Müller, Fischer, Vechev: TAPS: Connecting Certified and Adversarial Training, NeurIPS 2023"
    options = OPTIONS

    def loss(self, step: StepInputs) -> StepLoss:
        ball = Box.linf_ball(step.x, step.eps, step.trainer.cfg.data_range)
        return taps_loss(step, Box(ball.lo.detach(), ball.hi.detach()), self.config, self.parts)


@register_method
class StapsMethod(_TapsBase):
    name = "staps"
    description = "STAPS: TAPS on SABR's small box (radius λ·ε at the PGD point)"
    paper = TapsMethod.paper
    options = {**OPTIONS, "lambda": MethodOption(0.4, "small-box size λ in [0, 1] (1: TAPS on the whole ball)",
                                                 f"MNIST ε=0.1: 0.4, ε=0.3: 0.6 ({PAPER}: --eps-shrinkage)")}

    @classmethod
    def paper_defaults(cls, dataset, eps):
        return {"lambda": 0.6} if dataset == "mnist" and eps >= 0.2 else {}

    def check(self):
        super().check()
        self.check_fraction("lambda")

    def loss(self, step: StepInputs) -> StepLoss:
        t = step.trainer
        region = select_region(t.model, step.x, step.y, step.eps, self.config["lambda"], t.cfg.data_range,
                               step.generator, step.shard)
        return taps_loss(step, region, self.config, self.parts)
