"""Branching on the inputs of Sigmoid/Tanh neurons (GenBaB-style, Shi et al. 2024) for `bab`.

A sub-domain may narrow the pre-activation interval [l, u] of an S-shaped neuron: one child
keeps [l, t], the other [t, u]. The two children cover the parent (every point of the parent
has its pre-activation on one side of t). Each child's interval enters the sub-domain's
stored pre-activation bounds, which the engine intersects with what it computes, so the
neuron's linear relaxation is built for the narrower interval and layers downstream see it.

Why this is sound without a multiplier for the constraint z <= t (or z >= t): the child's
linear bound is valid for every input of the child (there z lies in the child's interval,
where the relaxation holds); minimising that linear bound over the whole input box, a superset
of the child, can only give a smaller number, so it is still a lower bound over the child.
When the engine's own bound for z leaves the child's interval, the intersection is empty and
the child is closed as void (`alpha_beta._empty`) - that is where the constraint shows.

Score of a candidate (the bound's loss on it): sum over the unproven rows of |lam| times the
relaxation's gap, max over the interval's ends of upper line - lower line (both lines are
linear, so the largest gap is at an end). Split point: 0 when the interval crosses 0 with at
least a fifth of its width on each side (each child is then convex or concave, where one of
the two lines is the chord and tight), otherwise the midpoint.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from verikit import ir

from .relaxations import relaxation_for

S_SHAPED_OPS = (ir.Sigmoid, ir.Tanh)
# intervals narrower than this are not split again (their relaxation is already tight)
MIN_WIDTH = 1e-4
# an interval around 0 is split at 0 when each side has at least this share of its width
ZERO_SHARE = 0.2


def s_shaped_nodes(graph: ir.Graph) -> list:
    return [n.name for n in graph.nodes if isinstance(n.op, S_SHAPED_OPS)]


def split_point(lo: Tensor, hi: Tensor) -> Tensor:
    """Where each interval [lo, hi] is cut (element-wise)."""
    width = hi - lo
    around_zero = (lo < 0) & (hi > 0) & (torch.minimum(-lo, hi) >= ZERO_SHARE * width)
    return torch.where(around_zero, torch.zeros_like(lo), lo + width / 2)


def activation_scores(graph: ir.Graph, nodes: list, pre_of: dict, bounds: dict, coefficients: dict,
                      rows: Tensor) -> tuple[Tensor, list]:
    """Best S-shaped candidate per sub-domain: (score (D,), [(node, flat index) or None]).
    A score of -1 means no candidate (every interval narrower than MIN_WIDTH)."""
    D = rows.shape[0]
    best = torch.full((D,), -1.0, dtype=torch.float64, device=rows.device)
    picks: list = [None] * D
    for name in nodes:
        lam = coefficients.get(name)
        if lam is None:
            continue
        lo, hi = bounds[pre_of[name]]
        rel = relaxation_for(graph.node(name).op, lo, hi, "crown")
        gap_lo = (rel.upper_slope - rel.lower_slope) * lo + rel.upper_bias - rel.lower_bias
        gap_hi = (rel.upper_slope - rel.lower_slope) * hi + rel.upper_bias - rel.lower_bias
        gap = torch.maximum(gap_lo, gap_hi).reshape(D, -1).double()
        lam = lam.reshape(D, lam.shape[1], -1) * rows.unsqueeze(-1).to(lam.dtype)
        score = lam.abs().sum(1).double() * gap.clamp(min=0)
        free = ((hi - lo).reshape(D, -1) > MIN_WIDTH) & torch.isfinite(score)
        score = torch.where(free, score, torch.full_like(score, -1.0))
        s, idx = score.max(1)
        for k in range(D):
            if float(s[k]) > float(best[k]):
                best[k], picks[k] = s[k], (name, int(idx[k]))
    return best, picks


def narrowed(lo: Tensor, hi: Tensor, index: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The two children's bounds of one pre-activation node (one sub-domain's (*shape) tensors)
    split at the flat `index`: ([lo, t], [t, hi]) at that neuron, unchanged elsewhere."""
    t = split_point(lo.reshape(-1)[index], hi.reshape(-1)[index])
    left_hi, right_lo = hi.clone(), lo.clone()
    left_hi.view(-1)[index] = t
    right_lo.view(-1)[index] = t
    return (lo, left_hi), (right_lo, hi)


def merge_picks(relu_scores: Optional[Tensor], relu_picks: list, s_scores: Tensor, s_picks: list) -> list:
    """Per sub-domain: ("relu", node, index) or ("s", node, index), the higher score winning;
    None when neither has a candidate."""
    out = []
    for k, s_pick in enumerate(s_picks):
        r_pick = relu_picks[k] if relu_picks else None
        r = float(relu_scores[k]) if relu_scores is not None and r_pick is not None else -1.0
        s = float(s_scores[k]) if s_pick is not None else -1.0
        if r_pick is None and s_pick is None:
            out.append(None)
        elif s_pick is None or (r_pick is not None and r >= s):
            out.append(("relu",) + tuple(r_pick))
        else:
            out.append(("s",) + tuple(s_pick))
    return out


# ---------------------------------------------------------------- interval multipliers
# A split shows in the bound only through the narrowed relaxation unless the constraint
# lo <= z <= hi itself enters the back-substitution. For any real gamma, on every point of the
# sub-domain (where z lies in its stored interval [lo, hi]):
#     f >= f - gamma * z + min(gamma * lo, gamma * hi),
# (gamma >= 0 is the multiplier of z - lo >= 0, gamma < 0 that of hi - z >= 0), so the term
# -gamma on z's coefficients plus that constant gives a valid bound for ANY gamma, optimised
# or not. gamma = 0 is the bound without it.

def interval_nodes(graph: ir.Graph) -> list:
    """The S-shaped nodes whose input interval can be split (not fed by the graph input)."""
    return [n for n in s_shaped_nodes(graph) if graph.node(n).inputs[0] != graph.input_name]


def interval_multipliers(graph: ir.Graph, store, batch: int, m: int, init: Optional[dict], device, dtype) -> dict:
    """gamma (D, m, *shape) leaf tensors per S-shaped node with finite input bounds: a
    parent's, else 0."""
    out = {}
    for name in interval_nodes(graph):
        box = store[graph.node(name).inputs[0]]
        if not (torch.isfinite(box.lo).all() and torch.isfinite(box.hi).all()):
            continue
        shape = (batch, m) + tuple(graph.shapes[graph.node(name).inputs[0]])
        start = init.get(name) if init else None
        start = torch.zeros(shape, device=device, dtype=dtype) if start is None or tuple(start.shape) != shape else start
        out[name] = start.detach().clone().requires_grad_(True)
    return out


def interval_terms(gammas: dict) -> dict:
    """The split terms for the engine: -gamma added to the coefficients of each node's input."""
    return {name: -g for name, g in gammas.items()}


def interval_constant(graph: ir.Graph, store, gammas: dict, lower: Tensor) -> Tensor:
    """`lower` (D, m) plus sum of min(gamma lo, gamma hi), rounded down: float32 products are
    exact in float64, the float64 sum's error is bounded by n 2^-52 sum|terms| and subtracted,
    and the float64 total is rounded down to `lower`'s dtype (gradients flow through the sum)."""
    if not gammas:
        return lower
    total = lower.double()
    bound = torch.zeros_like(total)
    n = 1
    for name, g in gammas.items():
        box = store[graph.node(name).inputs[0]]
        lo, hi = box.lo.unsqueeze(1).double(), box.hi.unsqueeze(1).double()
        g = g.double()
        terms = torch.minimum(g * lo, g * hi).flatten(2)
        total = total + terms.sum(-1)
        bound = bound + terms.detach().abs().sum(-1)
        n += terms.shape[-1]
    with torch.no_grad():
        margin = (n * 2.0 ** -52) * (bound + total.abs())
    total = total - margin
    out = total.to(lower.dtype)
    with torch.no_grad():
        above = out.double() > total
        fix = torch.where(above, torch.nextafter(out, torch.full_like(out, -math.inf)), out) - out
    return out + fix
