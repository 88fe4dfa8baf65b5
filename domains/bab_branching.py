"""Which ReLU a sub-domain is split on: scores from the coefficients the engine already has.

`branching` option of the bab domain:
- "babsr" (default; BaBSR, Bunel et al. 2020, in the form used by alpha,beta-CROWN): for an
  unstable ReLU with input bounds l < 0 < u, the upper relaxation line adds the intercept
  -l u / (u - l) wherever the bound's coefficient lam on the ReLU's output is negative; the
  score is that loss, sum over the unproven rows of max(-lam, 0) * (-l u / (u - l)), plus a
  small term |lam| (u - l) that ranks neurons the bound uses only through their lower line.
  Splitting the highest-scoring neuron removes the largest intercept from the bound.
- "widest": |lam| (u - l) only (the width the bound sees; a simple baseline).
Only unstable neurons that are not split yet are candidates.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from verikit.errors import VerikitError

BRANCHING = ("babsr", "widest")


def check_branching(name: str) -> str:
    if name not in BRANCHING:
        raise VerikitError(f"bab option branching must be one of {', '.join(BRANCHING)}, got {name!r}")
    return name


def choose_splits(rule: str, relus: list, pre_of: dict, bounds: dict, coefficients: dict, signs: dict,
                  rows: Tensor, with_scores: bool = False):
    """Per sub-domain: (ReLU node name, flat neuron index) to split, or None when no unstable
    unsplit neuron is left. `bounds`: pre-activation node -> (lo, hi) (D, *shape);
    `coefficients`: ReLU node -> (D, m, *shape); `rows` (D, m) bool: the rows still unproven.
    `with_scores`: return (picks, scores (D,)) so other candidates can be compared with them."""
    best_score: Optional[Tensor] = None
    best_node: Optional[Tensor] = None
    best_index: Optional[Tensor] = None
    for k, name in enumerate(relus):
        lam = coefficients.get(name)
        if lam is None:
            continue
        lo, hi = bounds[pre_of[name]]
        D = lo.shape[0]
        lo, hi = lo.reshape(D, -1), hi.reshape(D, -1)
        lam = lam.reshape(D, lam.shape[1], -1) * rows.unsqueeze(-1).to(lam.dtype)
        free = (lo < 0) & (hi > 0) & (signs[name].reshape(D, -1) == 0)
        width = torch.where(free, hi - lo, torch.ones_like(lo))
        size = lam.abs().sum(1) * (hi - lo)
        if rule == "babsr":
            intercept = torch.where(free, -lo * hi / width, torch.zeros_like(lo))
            score = (-lam).clamp(min=0).sum(1) * intercept + 1e-4 * size
        else:
            score = size
        score = torch.where(free, score, torch.full_like(score, -1.0))
        s, idx = score.max(1)
        if best_score is None:
            best_score, best_index = s, idx
            best_node = torch.zeros_like(idx)
        else:
            better = s > best_score
            best_score = torch.where(better, s, best_score)
            best_index = torch.where(better, idx, best_index)
            best_node = torch.where(better, torch.full_like(idx, k), best_node)
    if best_score is None:
        none = [None] * rows.shape[0]
        return (none, None) if with_scores else none
    picks = [None if float(s) < 0 else (relus[int(n)], int(i))
             for s, n, i in zip(best_score.tolist(), best_node.tolist(), best_index.tolist())]
    return (picks, best_score) if with_scores else picks
