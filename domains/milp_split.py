"""Input-splitting branch and bound around the MILP, for low-dimensional inputs (ACAS-Xu).

A MILP over a wide input box has loose big-M constants and many unstable ReLUs; halving the
box along the input that matters most (width x |gradient|, the "smear" heuristic) makes both
shrink fast. Each sub-box is first bounded cheaply (CROWN or DeepPoly when registered, else
Box, all batched) and its centre evaluated concretely; a sub-box with few unstable ReLUs
goes to the MILP with a short time limit, and is split again if that times out.
The sample is verified only when every sub-box is proven; any confirmed counterexample
falsifies it; running out of time leaves it unknown.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.spec import fold_spec

from .base import FALSIFIED, UNKNOWN, VERIFIED, available_domains, get_domain
from .box import propagate_box
from .guard import interval_guard
from .milp_encoding import JacobianCache

BATCH = 32  # sub-boxes bounded together
MILP_MAX_UNSTABLE = 40  # a sub-box with at most this many unstable ReLUs goes to the MILP
LEAF_TIME = 3.0  # seconds for one sub-box MILP before it is split instead


def _cheap_domain():
    names = available_domains()
    for name in ("crown", "deeppoly"):
        if name in names:
            return get_domain(name)
    return get_domain("box")


def _unstable_counts(graph: ir.Graph, store: BoundStore, n: int) -> np.ndarray:
    counts = np.zeros(n, dtype=int)
    for node in graph.nodes:
        if isinstance(node.op, (ir.ReLU, ir.LeakyReLU)):
            bx = store[node.inputs[0]]
            counts += ((bx.lo < 0) & (bx.hi > 0)).reshape(n, -1).sum(1).cpu().numpy()
    return counts


def _split_dim(graph, spec_b, lo, hi) -> int:
    """The input whose width times |d margin / d x| at the centre is largest."""
    x = ((lo + hi) / 2).detach().clone().requires_grad_(True)
    vals = spec_b.values(graph.forward(x))
    vals.sum().backward()
    score = ((hi - lo) * (x.grad.abs() + 1e-12)).reshape(-1)
    score[(hi - lo).reshape(-1) <= 0] = -1.0
    return int(score.argmax())


def split_sample(domain, graph, folded, spec, store, b, jac, ctx, deadline):
    from .milp import PROOF_MARGIN, confirm_counterexample

    t0 = time.perf_counter()
    spec_b = spec.for_sample(b)  # one sample's spec, shared by all its sub-boxes
    folded_b = fold_spec(graph, spec_b)
    jac_b = JacobianCache(folded_b, ctx)
    cheap = _cheap_domain()
    root = store[graph.input_name][b:b + 1]
    stack = [(root.lo.detach(), root.hi.detach())]
    info = {"solvers": set(), "queries": 0, "subboxes": 0, "milp_leaves": 0, "binaries": 0}
    status, cex = VERIFIED, None
    while stack:
        if time.perf_counter() >= deadline:
            status = UNKNOWN
            break
        batch = [stack.pop() for _ in range(min(BATCH, len(stack)))]
        info["subboxes"] += len(batch)
        lo, hi = torch.cat([p[0] for p in batch]), torch.cat([p[1] for p in batch])
        # a counterexample at a centre ends the search at once
        centres = (lo + hi) / 2
        with torch.no_grad():
            bad = spec_b.violated_by(graph.forward(centres))
        for i in torch.nonzero(bad).reshape(-1).tolist():
            if confirm_counterexample(graph, spec_b, centres[i:i + 1]):
                status, cex = FALSIFIED, centres[i].clone()
                break
        if status == FALSIFIED:
            break
        sub = BoundStore()
        with torch.no_grad():
            res = cheap.bound(graph, Box(lo, hi), spec_b, sub, ctx)
            sub = propagate_box(folded_b, Box(lo, hi), sub, ctx)  # every node bounded, intersected
        proven = res.verified(spec_b)  # computes the rounding guard of these bounds (res.guard)
        guard = res.guard if res.guard is not None else interval_guard(folded_b, sub)
        proven = proven | spec_b.holds_given_lower(sub[folded_b.output].lo.reshape(len(batch), -1), guard)
        thresholds = guard.detach().double().cpu().numpy() + PROOF_MARGIN
        unstable = _unstable_counts(folded_b, sub, len(batch))
        for i in range(len(batch)):
            if bool(proven[i]):
                continue
            verdict = None
            if unstable[i] <= MILP_MAX_UNSTABLE or (hi[i] - lo[i]).max() <= 1e-6:
                leaf_deadline = min(deadline, time.perf_counter() + LEAF_TIME)
                verdict, leaf_cex, _, leaf_info = domain._sample(graph, folded_b, spec_b, sub.select([i]), 0,
                                                                 jac_b, ctx, leaf_deadline, thresholds[i])
                info["milp_leaves"] += 1
                info["queries"] += leaf_info["queries"]
                info["solvers"] |= leaf_info["solvers"]
                info["binaries"] = max(info["binaries"], leaf_info["binaries"])
                if verdict == FALSIFIED:
                    status, cex = FALSIFIED, leaf_cex
                    break
            if verdict != VERIFIED:
                if (hi[i] - lo[i]).max() <= 1e-6:
                    status = UNKNOWN  # cannot split further; keep searching the rest for a counterexample
                    continue
                d = _split_dim(graph, spec_b, lo[i:i + 1], hi[i:i + 1])
                mid = (lo[i:i + 1].reshape(-1)[d] + hi[i:i + 1].reshape(-1)[d]) / 2
                left_hi, right_lo = hi[i:i + 1].clone(), lo[i:i + 1].clone()
                left_hi.view(-1)[d] = mid
                right_lo.view(-1)[d] = mid
                stack.append((lo[i:i + 1].clone(), left_hi))
                stack.append((right_lo, hi[i:i + 1].clone()))
        if status == FALSIFIED:
            break
    if status == VERIFIED and time.perf_counter() >= deadline and stack:
        status = UNKNOWN
    out_box = store[folded.output]
    lower = out_box.lo[b].detach().double().cpu().numpy().reshape(-1)
    info["time"] = time.perf_counter() - t0
    info["status"] = status
    return status, cex, lower, info
