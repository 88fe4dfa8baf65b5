"""Per-epoch evaluation on test images: standard, PGD and box-certified accuracy at the target ε."""
from __future__ import annotations

import torch
import torch.nn as nn

from verikit import ir
from verikit.bounds import Box

from .losses import margin_spec
from .sabr import pgd_attack


def evaluate(model: nn.Module, graph: ir.Graph, x: torch.Tensor, y: torch.Tensor, eps: float,
             num_classes: int, batch_size: int = 256, seed: int = 0, data_range=(0.0, 1.0)) -> dict:
    """{'test_acc', 'pgd_acc', 'box_cert_acc'} over (x, y), with the model in eval mode."""
    from verikit.domains.box import BoxDomain

    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    correct = robust = cert = 0
    box = BoxDomain()
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with torch.no_grad():
            ok = model(xb).argmax(1) == yb
        correct += int(ok.sum())
        if eps > 0:
            ball = Box.linf_ball(xb, eps, data_range)
            x_adv = pgd_attack(model, xb, yb, ball, eps, generator=gen)
            with torch.no_grad():
                ok_adv = ok & (model(x_adv).argmax(1) == yb)
                lower = box.bound(graph, ball, margin_spec(yb, num_classes, xb.dtype)).lower
            others = torch.ones_like(lower, dtype=torch.bool).scatter_(1, yb[:, None], False)
            ok_cert = ((lower > 0) | ~others).all(1)
            robust += int(ok_adv.sum())
            cert += int(ok_cert.sum())
        else:
            robust += int(ok.sum())
            cert += int(ok.sum())
    n = max(1, x.shape[0])
    return {"test_acc": correct / n, "pgd_acc": robust / n, "box_cert_acc": cert / n}
