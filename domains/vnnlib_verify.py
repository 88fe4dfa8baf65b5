"""Decide a whole VNN-LIB property (all its input boxes) with the milp domain.

The property holds iff every case holds on its box; one confirmed counterexample in any case
violates it. The time limit covers the whole property; what is left is handed to each case.
Incomplete domains named in `pre` (e.g. "crown") run first only to tighten the bound store.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from verikit.bounds import Box, BoundStore

from .base import FALSIFIED, VERIFIED, available_domains, get_domain

HOLDS, VIOLATED, UNKNOWN_ANSWER = "holds", "violated", "unknown"


@dataclass
class VnnlibAnswer:
    answer: str  # holds | violated | unknown
    counterexample: Optional[torch.Tensor] = None  # (input_shape) when violated
    case: Optional[int] = None  # index of the violated case
    seconds: float = 0.0
    solvers: set = field(default_factory=set)


def case_box(graph, case) -> Box:
    shape = (1,) + tuple(graph.input_shape)
    lo = torch.tensor(np.asarray(case.lo), dtype=graph.dtype).reshape(shape)
    hi = torch.tensor(np.asarray(case.hi), dtype=graph.dtype).reshape(shape)
    return Box(lo, hi)


def verify_vnnlib(graph, prop, time_limit: float = 60.0, pre: tuple = (), **milp_options) -> VnnlibAnswer:
    t0 = time.perf_counter()
    out = VnnlibAnswer(HOLDS)
    known = available_domains()
    for k, case in enumerate(prop.cases):
        left = time_limit - (time.perf_counter() - t0)
        if left <= 0:
            out.answer = UNKNOWN_ANSWER
            break
        box = case_box(graph, case)
        spec = case.spec.to(dtype=graph.dtype)
        store = BoundStore()
        for name in pre:
            if name in known:
                res = get_domain(name).bound(graph, box, spec, store)
                if bool(spec.holds_given_lower(res.lower)[0]):
                    break
        else:
            res = get_domain("milp", time_limit=max(left, 1e-3), **milp_options).bound(graph, box, spec, store)
            out.solvers.update(s for s in res.info.get("solver", "").split(",") if s and s != "none")
            if res.status[0] == FALSIFIED:
                out.answer, out.counterexample, out.case = VIOLATED, res.counterexamples[0], k
                break
            if res.status[0] != VERIFIED:
                out.answer = UNKNOWN_ANSWER  # keep looking for a counterexample in other cases
    out.seconds = time.perf_counter() - t0
    return out
