"""PGD attack over an input box (the L-inf ball ∩ data range, or a VNN-LIB input box).

It minimises the spec margin  min over groups of max over rows of (C y - d): the property is
violated exactly where that margin is <= 0, so a robustness spec gives the usual margin
(CW-style) loss. Gradients are taken with respect to the INPUT only (`torch.autograd.grad`
on the input tensor), never the network parameters. All samples of the batch are attacked at
once; each keeps its best (lowest-margin) point, and samples that are already broken stop
moving.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from verikit.bounds import Box
from verikit.ir import Graph
from verikit.spec import Spec


@dataclass
class AttackResult:
    x: Tensor  # (B, *input_shape): the lowest-margin point found per sample (inside the box)
    margin: Tensor  # (B,) spec margin at x (<= 0: a candidate counterexample)

    @property
    def found(self) -> Tensor:
        return self.margin <= 0


def spec_margin(graph: Graph, x: Tensor, spec: Spec) -> Tensor:
    """Concrete margin per sample; <= 0 iff x violates the spec."""
    return _margin_of(spec.values(graph.forward(x)), spec)


def _margin_of(values: Tensor, spec: Spec) -> Tensor:
    if spec.groups is None:  # every row its own group (robustness): the margin is the smallest row
        return values.min(dim=1).values
    return spec.margin(values)


def _loss_of(values: Tensor, spec: Spec) -> Tensor:
    """What the descent minimises. A group is violated when ALL its rows are <= 0; the margin
    (max over its rows) moves one row at a time, so for groups of several rows descend on the
    sum of their positive parts instead (zero exactly when the group is violated)."""
    if spec.groups is None:
        return values.min(dim=1).values
    per_group = [torch.relu(values[:, list(g)]).sum(dim=1) if len(g) > 1 else values[:, g[0]]
                 for g in spec.group_list]
    return torch.stack(per_group, dim=1).min(dim=1).values


def pgd_attack(graph: Graph, box: Box, spec: Spec, steps: int = 20, restarts: int = 1,
               step_scale: float = 2.5, seed: int = 0, max_parallel: int = 4096) -> AttackResult:
    """Projected sign-gradient descent on the spec margin inside `box`.

    The first start is the box centre (the clean input for an eps-ball), the other restarts
    uniform random points. Restarts run side by side in one batch (up to `max_parallel` rows).
    Step size per coordinate = step_scale * radius / steps.
    """
    lo, hi = box.lo.detach(), box.hi.detach()
    B = lo.shape[0]
    spec = spec.to(device=lo.device, dtype=lo.dtype).expand(B)
    with torch.no_grad():
        best_x = ((lo + hi) / 2).clone()
        best_m = spec_margin(graph, best_x, spec)
    restarts = max(restarts, 1)
    per_round = max(1, min(restarts, max_parallel // max(B, 1)))
    for first in range(0, restarts, per_round):
        rs = list(range(first, min(first + per_round, restarts)))
        if not bool((best_m > 0).any()):
            break
        _descend(graph, lo, hi, spec, rs, steps, step_scale, seed, best_x, best_m)
    return AttackResult(best_x, best_m)


def _descend(graph, lo, hi, spec, rs, steps, step_scale, seed, best_x, best_m) -> None:
    """PGD from the starts of restarts `rs` (stacked restart-major along the batch)."""
    R, B = len(rs), lo.shape[0]
    tile = lambda t: t.repeat((R,) + (1,) * (t.dim() - 1))
    starts = [(lo + hi) / 2 if r == 0 else lo + _uniform_per_sample(lo, hi, seed + r) * (hi - lo) for r in rs]
    x = torch.cat(starts)
    lo_r, hi_r = tile(lo), tile(hi)
    spec_r = Spec(tile(spec.C), tile(spec.d), spec.groups)
    step = step_scale * (hi_r - lo_r) / 2 / max(steps, 1)
    for k in range(steps + 1):
        active = best_m > 0
        if not bool(active.any()):
            return
        x = x.detach().requires_grad_(k < steps)
        values = spec_r.values(graph.forward(x))
        m = _margin_of(values, spec_r)
        with torch.no_grad():
            _keep_best(best_x, best_m, x.detach().reshape((R, B) + x.shape[1:]), m.detach().reshape(R, B))
        if k == steps:
            return
        (grad,) = torch.autograd.grad(_loss_of(values, spec_r).sum(), x)
        with torch.no_grad():
            move = step * grad.sign() * tile(active).reshape((-1,) + (1,) * (x.dim() - 1))
            x = torch.minimum(torch.maximum(x - move, lo_r), hi_r)


def _uniform_per_sample(lo: Tensor, hi: Tensor, seed: int) -> Tensor:
    """Uniform [0, 1) noise seeded by each sample's own box, so a sample gets the same random
    starts whatever batch it lands in (a resumed run reproduces an uninterrupted one)."""
    out = torch.empty(lo.shape, dtype=lo.dtype)
    for b in range(lo.shape[0]):
        key = (lo[b] + hi[b]).detach().double().cpu().numpy().tobytes()
        h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") ^ seed
        g = torch.Generator(device="cpu").manual_seed(h & ((1 << 63) - 1))
        out[b] = torch.rand(lo.shape[1:], generator=g, dtype=lo.dtype)
    return out.to(lo.device)


def _keep_best(best_x: Tensor, best_m: Tensor, xs: Tensor, ms: Tensor) -> None:
    """xs (R, B, ...) and margins ms (R, B): keep, per sample, the lowest margin seen."""
    m, r = ms.min(dim=0)
    better = m < best_m
    if bool(better.any()):
        idx = torch.arange(best_m.shape[0], device=best_m.device)
        best_x[better] = xs[r, idx][better]
        best_m[better] = m[better]
