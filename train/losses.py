"""Training losses: the certified (worst-case margin) cross-entropy of a box, computed with any
differentiable registered domain, and Shi et al.'s warm-up regulariser."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError
from verikit.spec import Spec

REG_TAU = 0.5  # Shi et al.'s target value τ for both regularisers


def margin_spec(labels: Tensor, num_classes: int, dtype=torch.float32) -> Spec:
    """Rows y_label - y_j for *every* j (the j = label row is identically 0), per sample.

    Keeping the zero row makes -lower directly usable as logits: CE(-lower, label) is the
    standard IBP/SABR worst-case loss."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    C = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, n, n): row j = e_label - e_j
    return Spec(C, torch.zeros(C.shape[:2], dtype=dtype, device=labels.device))


def get_training_domain(name: str, **options):
    """A registered domain usable for training (its bounds must be differentiable)."""
    from verikit.domains import get_domain

    domain = get_domain(name, **options)
    if not type(domain).differentiable:
        raise VerikitError(f"domain {name!r} is not differentiable and cannot be used for training "
                           f"(pick one marked differentiable in `verikit domains`)")
    return domain


@dataclass
class CertifiedLoss:
    loss: Tensor  # scalar: mean worst-case cross-entropy
    lower: Tensor  # (B, n) lower bounds of y_label - y_j
    store: Optional[BoundStore]


def certified_loss(graph: ir.Graph, domain, region: Box, labels: Tensor, num_classes: int,
                   ctx: Optional[ir.EvalContext] = None) -> CertifiedLoss:
    """Cross-entropy on the worst-case logits -lower(y_label - y_j) over `region`."""
    spec = margin_spec(labels, num_classes, dtype=region.lo.dtype)
    res = domain.bound(graph, region, spec, ctx=ctx)
    lower = res.lower
    return CertifiedLoss(F.cross_entropy(-lower, labels), lower, res.store)


def relu_input_boxes(graph: ir.Graph, store: Optional[BoundStore]) -> list[Box]:
    """The bounds of every ReLU's input that the domain left in the store."""
    if store is None:
        return []
    return [store[n.inputs[0]] for n in graph.nodes if isinstance(n.op, ir.ReLU) and n.inputs[0] in store]


def warmup_regularizer(graph: ir.Graph, store: Optional[BoundStore], input_box: Box, tau: float = REG_TAU) -> Tensor:
    """Shi et al. (2021)'s two warm-up regularisers, as described in their paper:

    - tightness: per ReLU layer, t = mean input radius / mean pre-activation radius; penalise
      ReLU(τ - t)/τ, i.e. bounds growing much faster than the input box;
    - ReLU balance: per layer, a = min(E[relu(u)], E[relu(-l)]) / (E[relu(u)] + E[relu(-l)])
      in [0, 1/2]; penalise ReLU(τ - 2a)/τ, i.e. layers that are mostly dead or mostly active.
    Averaged over ReLU layers; 0 if the domain left no intermediate bounds.
    """
    boxes = relu_input_boxes(graph, store)
    if not boxes:
        return input_box.lo.new_zeros(())
    r0 = input_box.radius.mean()
    total = 0.0
    for b in boxes:
        t = r0 / (b.radius.mean() + 1e-12)
        pos, neg = F.relu(b.hi).mean(), F.relu(-b.lo).mean()
        a = torch.minimum(pos, neg) / (pos + neg + 1e-12)
        total = total + F.relu(tau - t) / tau + F.relu(tau - 2 * a) / tau
    return total / len(boxes)


def l1_penalty(model: torch.nn.Module) -> Tensor:
    """Sum of |w| over the weights of Linear and Conv2d layers (not biases, not BatchNorm)."""
    terms = [m.weight.abs().sum() for m in model.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.requires_grad]
    return torch.stack(terms).sum() if terms else torch.zeros(())
