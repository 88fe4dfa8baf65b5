"""The open sub-domains of a branch-and-bound search, ordered by lower bound.

Each sub-domain keeps what its children start from: its split signs, the pre-activation bounds
found for it, its optimised output slopes (alpha) and multipliers (beta), and its lower bounds
(which hold for every child too). `pop(k)` returns the k sub-domains with the lowest key (the
spec margin of their lower bounds: min over groups of max over rows), so the global lower
bound, which is the smallest key, rises as fast as possible (best-first search).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Subdomain:
    key: float  # spec margin of `lower`; the queue pops the smallest first
    lower: Tensor  # (m,)
    signs: dict  # ReLU node -> (*shape) int8 in {-1, 0, +1}
    pre_bounds: dict  # pre-activation node -> (lo, hi) (*shape)
    alphas: dict = field(default_factory=dict)  # ReLU node -> (m, *shape)
    betas: dict = field(default_factory=dict)
    depth: int = 0
    coefficients: dict = field(default_factory=dict)  # ReLU node -> (m, *shape): for branching

    def numbers(self) -> int:
        """How many numbers it holds (for the memory cap)."""
        parts = list(self.signs.values()) + list(self.alphas.values()) + list(self.betas.values())
        parts += list(self.coefficients.values())
        parts += [t for lo_hi in self.pre_bounds.values() for t in lo_hi]
        return sum(t.numel() for t in parts)


class SubdomainQueue:
    def __init__(self):
        self._heap: list = []
        self._count = itertools.count()  # ties: first in, first out (deterministic)
        self.numbers = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, d: Subdomain) -> None:
        heapq.heappush(self._heap, (d.key, next(self._count), d))
        self.numbers += d.numbers()

    def pop(self, k: int) -> list:
        out = []
        while self._heap and len(out) < k:
            d = heapq.heappop(self._heap)[2]
            self.numbers -= d.numbers()
            out.append(d)
        return out

    def lowest(self) -> float:
        """The smallest key (the global lower bound of the open sub-domains), +inf when empty."""
        return self._heap[0][0] if self._heap else math.inf

    def lower_rows(self) -> Tensor:
        """(m,) element-wise minimum of the open sub-domains' lower bounds (None when empty)."""
        if not self._heap:
            return None
        return torch.stack([d.lower for _, _, d in self._heap]).min(0).values

    def max_depth(self) -> int:
        return max((d.depth for _, _, d in self._heap), default=0)
