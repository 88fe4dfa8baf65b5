"""Decide a whole VNN-LIB property (all its input boxes) with the milp domain.

The property holds iff every case holds on its box; one confirmed counterexample in any case
violates it. The time limit covers the whole property; what is left is handed to each case.
Incomplete domains named in `pre` (e.g. "crown") run first to tighten the bound store (or to
prove a case outright), and a short PGD search looks for a counterexample before any MILP.
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
    by: set = field(default_factory=set)  # what decided the cases: attack, a `pre` domain, milp


def _round(values, dtype, direction: str) -> torch.Tensor:
    """float64 values in `dtype`, rounded down or up (never to the nearest on the wrong side)."""
    v64 = torch.as_tensor(np.asarray(values, dtype=np.float64))
    v = v64.to(dtype)
    step = torch.full_like(v, -np.inf if direction == "down" else np.inf)
    wrong = v.double() > v64 if direction == "down" else v.double() < v64
    return torch.where(wrong, torch.nextafter(v, step), v)


def case_box(graph, case, inward: bool = False) -> Box:
    """The case's input box in the graph's dtype, rounded outward (sound for proofs) or inward
    (every point of it satisfies the property's input constraints, for counterexamples)."""
    shape = (1,) + tuple(graph.input_shape)
    lo = _round(case.inner_lo if inward else case.lo, graph.dtype, "up" if inward else "down").reshape(shape)
    hi = _round(case.inner_hi if inward else case.hi, graph.dtype, "down" if inward else "up").reshape(shape)
    return Box(lo, hi)


def _inside_property_box(graph, case, spec, x: torch.Tensor) -> Optional[torch.Tensor]:
    """x moved (by at most rounding) into the property's own float64 box and re-confirmed."""
    from .milp import confirm_counterexample

    inner = case_box(graph, case, inward=True)
    if bool((inner.lo > inner.hi).any()):
        return None  # no representable input satisfies the constraints
    x = torch.maximum(torch.minimum(x.reshape(inner.lo.shape), inner.hi), inner.lo)
    if not case.contains(x.detach().double().cpu().numpy()):
        return None
    return x[0] if confirm_counterexample(graph, spec, x) else None


def _pgd(graph, box: Box, spec, deadline: float, steps: int = 50, restarts: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs (restarts, *shape) in the box that minimise the spec margin (min over groups of
    max over rows): a cheap search for counterexamples before the MILP."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = box.lo.expand((restarts,) + box.lo.shape[1:]), box.hi.expand((restarts,) + box.hi.shape[1:])
    x = lo + torch.rand(lo.shape, generator=gen, dtype=lo.dtype) * (hi - lo)
    x[0] = (box.lo[0] + box.hi[0]) / 2
    spec_r = spec.expand(1).select([0] * restarts) if spec.C.dim() == 3 else spec
    for k in range(steps):
        if time.perf_counter() >= deadline:
            break
        x = x.detach().requires_grad_(True)
        margin = spec_r.margin(spec_r.values(graph.forward(x)))
        (grad,) = torch.autograd.grad(margin.sum(), x)
        step = (hi - lo) * (0.25 * (1 - k / steps) + 0.01)
        x = torch.maximum(torch.minimum(x - step * grad.sign(), hi), lo)
    return x.detach()


def verify_vnnlib(graph, prop, time_limit: float = 60.0, pre: tuple = (), attack: bool = True,
                  **milp_options) -> VnnlibAnswer:
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
        if attack:
            found = None
            # at most a fifth of the time that is left goes to the attack
            for x in _pgd(graph, case_box(graph, case, inward=True), spec, time.perf_counter() + 0.2 * left):
                found = _inside_property_box(graph, case, spec, x[None])
                if found is not None:
                    break
            if found is not None:
                out.answer, out.counterexample, out.case = VIOLATED, found, k
                out.by.add("attack")
                break
        store = BoundStore()
        for name in pre:
            if name in known:
                res = get_domain(name).bound(graph, box, spec, store)
                if bool(res.verified(spec)[0]):  # through the rounding guard, like every verdict
                    out.by.add(name)
                    break
        else:
            res = get_domain("milp", time_limit=max(left, 1e-3), **milp_options).bound(graph, box, spec, store)
            out.by.add("milp")
            out.solvers.update(s for s in res.info.get("solver", "").split(",") if s and s != "none")
            cex = None
            if res.status[0] == FALSIFIED:
                cex = _inside_property_box(graph, case, spec, res.counterexamples[0])
            if cex is not None:
                out.answer, out.counterexample, out.case = VIOLATED, cex, k
                break
            if res.status[0] != VERIFIED:
                out.answer = UNKNOWN_ANSWER  # keep looking for a counterexample in other cases
    out.seconds = time.perf_counter() - t0
    return out
