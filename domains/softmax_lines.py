"""Linear bounds through Softmax for the back-substitution engine.

softmax_i(x) = 1 / s_i with s_i = sum_j exp(x_j - x_i) = 1 + sum_(j != i) e_ij: an exact
decomposition into differences (affine), exp (convex) and a reciprocal (convex, decreasing on
s >= 1). Each piece gets the lines of the shared relaxation table on its own interval:
d_ij = x_j - x_i in [l_j - u_i, u_j - l_i], e_ij in [exp(.), exp(.)], s_i in [1 + sum exp(lower),
1 + sum exp(upper)]; a coefficient on softmax_i becomes one on s_i (the reciprocal's line for
its sign), then on every e_ij, then on x_j (+) and x_i (-). Output i falls back to its interval
constants (the exact Box rule, in the store) where some d_ij may exceed `MAX_DIFFERENCE`: there
exp's chord is so steep that the constants are tighter, and exp's lines would overflow.
"""
from __future__ import annotations

import torch
from torch import Tensor

from verikit import ir

from .relaxations import exp_relaxation, reciprocal_relaxation, round_outward

MAX_DIFFERENCE = 10.0


def _lines(x_lo: Tensor, x_hi: Tensor):
    """Per (..., i, j): the exp lines of e_ij on d_ij; per (..., i): the reciprocal lines of
    s_i and whether output i uses lines. x_lo, x_hi: (B, ..., n), softmax over the last axis."""
    n, dtype = x_lo.shape[-1], x_lo.dtype
    lo64, hi64 = x_lo.double(), x_hi.double()
    off = ~torch.eye(n, dtype=torch.bool, device=x_lo.device)
    d_lo = torch.where(off, lo64.unsqueeze(-2) - hi64.unsqueeze(-1), 0.0)  # [..., i, j] = l_j - u_i
    d_hi = torch.where(off, hi64.unsqueeze(-2) - lo64.unsqueeze(-1), 0.0)
    use = (d_hi <= MAX_DIFFERENCE).all(-1)  # (..., i)
    d_lo, d_hi = round_outward(d_lo.clamp(max=MAX_DIFFERENCE), d_hi.clamp(max=MAX_DIFFERENCE), dtype)
    exp_lines = exp_relaxation(d_lo, d_hi)
    # s_i's interval in float64 (widened for the sums' rounding); the diagonal term is exactly 1
    s_lo = (torch.exp(d_lo.double()) * off).sum(-1) + 1.0
    s_hi = (torch.exp(d_hi.double()) * off).sum(-1) + 1.0
    rel = (n + 4) * 2.0 ** -50
    s_lo, s_hi = round_outward((s_lo * (1 - rel)).clamp(min=1.0), s_hi * (1 + rel), dtype)
    return exp_lines, reciprocal_relaxation(s_lo, s_hi), use, off


def softmax_backward(engine, node: ir.Node, lam: Tensor):
    """(coefficients on the softmax input, constant) for coefficients lam (B, m, *out)."""
    ax = node.op.axis  # batched coordinates of the node; lam has the extra row dimension
    box_in, box_out = engine.store[node.inputs[0]], engine.store[node.name]
    x_lo, x_hi = box_in.lo.movedim(ax, -1), box_in.hi.movedim(ax, -1)
    y_lo, y_hi = box_out.lo.movedim(ax, -1).unsqueeze(1), box_out.hi.movedim(ax, -1).unsqueeze(1)
    lam_t = lam.movedim(ax + 1, -1)  # (B, m, ..., n)
    exp_lines, recip, use, off = _lines(x_lo, x_hi)
    use = use.unsqueeze(1)
    pos, neg = lam_t.clamp(min=0), lam_t.clamp(max=0)
    sq = lambda t: t.unsqueeze(1)  # per-sample line tensors against the row dimension
    # constants where the lines are not used
    const = torch.where(use, torch.zeros_like(lam_t), pos * y_lo + neg * y_hi)
    # y_i >= / <= slope * s_i + bias, by the sign of the coefficient
    mu = torch.where(use, pos * sq(recip.lower_slope) + neg * sq(recip.upper_slope), torch.zeros_like(lam_t))
    const = const + torch.where(use, pos * sq(recip.lower_bias) + neg * sq(recip.upper_bias), torch.zeros_like(lam_t))
    const = const + mu  # s_i = 1 + sum_(j != i) e_ij
    mu_ij = mu.unsqueeze(-1) * off  # (B, m, ..., i, j), zero on the diagonal
    p2, n2 = mu_ij.clamp(min=0), mu_ij.clamp(max=0)
    nu = p2 * sq(exp_lines.lower_slope) + n2 * sq(exp_lines.upper_slope)
    c_ij = p2 * sq(exp_lines.lower_bias) + n2 * sq(exp_lines.upper_bias)
    total = const.flatten(2).sum(-1) + c_ij.flatten(2).sum(-1)
    grad = nu.sum(-2) - nu.sum(-1)  # d_ij = x_j - x_i
    return (grad.movedim(-1, ax + 1),), total
