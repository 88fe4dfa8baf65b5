"""Branch and bound over the input box, for low-dimensional inputs (ACAS-Xu: 5 inputs).

The input box is cut into sub-boxes, and many sub-boxes are bounded in one batched CROWN
(optionally alpha-CROWN) pass of the shared back-substitution engine: the batch dimension is
the sub-box. Per sub-box the search keeps which spec groups are already proven on it (a group
proven on a box is proven on every part of it), so children only have to prove the rest.

- proof: a group is proven on a sub-box when one of its rows has a lower bound above the
  rounding guard of that bound (`verikit.domains.guard`, the same guard every verdict
  faces); the property holds when every sub-box has every group proven;
- branching: an unproven sub-box is halved along the input with the largest
  width x |input coefficient| summed over the rows of its unproven groups (the coefficients
  the engine's bound already has); the queue is ordered by the sub-box's margin (lowest
  first), so the sub-boxes most likely to hold a counterexample are searched first;
- falsification: the centre of every new sub-box and the input corner that minimises its
  linear lower bound are evaluated, and a short PGD runs inside the worst sub-boxes; every
  candidate is re-checked concretely (graph.forward and, for ONNX models, onnxruntime) against
  the exact float64 property before it counts;
- limits: the deadline, `max_domains` pending sub-boxes, or a sub-box too small to split give
  "unknown", never "verified".
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from verikit.bounds import Box
from verikit.progress import set_active_info
from verikit.spec import Spec, float_guard, fold_spec

from .base import FALSIFIED, UNKNOWN, VERIFIED
from .guard import engine_guard
from .linear_bounds import output_bounds, prepare

MIN_WIDTH = 1e-7  # relative to the root box: narrower sub-box sides are not halved again
# bab's input_split="auto" splits the input box for inputs of at most this many elements (ACAS-Xu
# has 5): beyond a few dozen, halving one input at a time shrinks the relaxations too slowly
AUTO_MAX_INPUTS = 16


@dataclass
class InputSplitOptions:
    batch_size: int = 512  # sub-boxes popped per step (each gives two children, bounded together)
    alpha_steps: int = 0  # alpha-CROWN steps per batch (0: plain CROWN, usually best per second here)
    alpha_lr: float = 0.1
    max_domains: int = 200_000  # pending sub-boxes (memory): beyond it the answer is unknown
    pgd_steps: int = 5  # short PGD inside the worst sub-boxes of every batch
    pgd_boxes: int = 16  # how many of them
    max_rows_per_chunk: int = 1 << 16


@dataclass
class InputSplitResult:
    status: str  # verified | falsified | unknown
    counterexample: Optional[Tensor] = None  # (*input_shape) when falsified
    visited: int = 0  # sub-boxes bounded
    depth: int = 0  # the most halvings of any sub-box
    pending: int = 0  # sub-boxes left undecided when the search stopped
    seconds: float = 0.0
    reason: str = ""  # why unknown: timeout, max_domains, min_width
    lower: Optional[Tensor] = None  # (m,) valid lower bounds of the rows on the whole box (the root's)
    info: dict = field(default_factory=dict)


class _InputOverride:
    """A view of a bound store whose input box is a centre/radius box that records gradients:
    the gradient of a bound w.r.t. the centre is its coefficient on the input."""

    def __init__(self, store, input_name: str, box: Box):
        self.store, self.input_name, self.box = store, input_name, box

    def __getitem__(self, name):
        return self.box if name == self.input_name else self.store[name]


def _bound(folded, lo: Tensor, hi: Tensor, opts: InputSplitOptions, ctx):
    """Lower bounds (N, m) of the spec rows on N sub-boxes, with their rounding guard (N, m),
    and the rows' coefficients on the input (N, m, n_in) from the plain-slope bound."""
    shape = (lo.shape[0],) + tuple(folded.input_shape)
    box = Box(lo.reshape(shape), hi.reshape(shape))
    with torch.no_grad():
        engine = prepare(folded, box, None, ctx, "crown", opts.max_rows_per_chunk)
        plain, _ = output_bounds(engine, upper=False)
    centre = box.center.detach().clone().requires_grad_(True)
    store = engine.store
    engine.store = _InputOverride(store, folded.input_name, Box.from_center_radius(centre, box.radius))
    m = plain.shape[1]
    with torch.enable_grad():
        lam = torch.eye(m, dtype=plain.dtype, device=plain.device).expand(shape[0], m, m)
        redo = engine.lower_bound(folded.output, lam)
        coeffs = torch.stack([torch.autograd.grad(redo[:, i].sum(), centre, retain_graph=i + 1 < m)[0]
                              .reshape(shape[0], -1) for i in range(m)], 1)
    engine.store = store
    own = plain
    if opts.alpha_steps > 0:
        from .crown import optimise_alpha

        own = optimise_alpha(engine, plain, opts.alpha_steps, float(opts.alpha_lr))
    stored = store[folded.output].lo.reshape(shape[0], -1)
    final = torch.maximum(own, stored)
    guard = engine_guard(engine, False, plain, own, final)()
    return final.detach(), guard.detach(), coeffs.detach()


def _pgd(graph, spec: Spec, lo: Tensor, hi: Tensor, steps: int) -> Tensor:
    """A short signed-gradient descent on the spec margin inside each box (from its centre)."""
    shape = (lo.shape[0],) + tuple(graph.input_shape)
    lo, hi = lo.reshape(shape), hi.reshape(shape)
    x = (lo + hi) / 2
    for k in range(steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            margin = spec.margin(spec.values(graph.forward(x)))
            (g,) = torch.autograd.grad(margin.sum(), x)
        x = torch.maximum(torch.minimum(x - (hi - lo) * (0.5 / (k + 2)) * g.sign(), hi), lo)
    return x.detach().reshape(lo.shape[0], -1)


def input_split_search(graph, spec: Spec, inputs: Box, *, deadline: float, options: Optional[InputSplitOptions] = None,
                       progress=None, ctx=None, confirm: Optional[Callable] = None) -> InputSplitResult:
    """Decide `spec` on the input box `inputs` (batch 1) by splitting the box.

    `deadline`: a time.perf_counter() value. `confirm(x)` (x of shape (1, *input_shape)) returns
    the counterexample to report (e.g. x moved into a VNN-LIB property's own box) or None; the
    default re-checks x with the graph and onnxruntime (`milp.confirm_counterexample`).
    `progress`: a verikit.progress.Progress, told the sub-boxes visited and the pending ones."""
    from .milp import confirm_counterexample

    opts = options or InputSplitOptions()
    t0 = time.perf_counter()
    spec = spec.for_sample(0).to(device=inputs.lo.device, dtype=graph.dtype)
    if confirm is None:
        def confirm(x):
            return x[0] if confirm_counterexample(graph, spec, x) else None
    folded = fold_spec(graph, spec)
    groups = spec.group_list
    device = inputs.lo.device  # every tensor of the search lives with the inputs (cuda too)
    member = torch.zeros(len(groups), spec.num_rows, dtype=torch.bool, device=device)
    for k, g in enumerate(groups):
        member[k, list(g)] = True
    res = InputSplitResult(UNKNOWN)
    root_lo, root_hi = inputs.lo.detach().reshape(1, -1), inputs.hi.detach().reshape(1, -1)
    min_width = MIN_WIDTH * (root_hi - root_lo).clamp(min=1.0)
    in_shape = (1,) + tuple(graph.input_shape)

    def falsify(lo, hi, coeffs, margins) -> Optional[Tensor]:
        """Centres, bound minimisers (per row) and PGD points of the worst boxes; the first
        that survives the concrete re-check."""
        c, r = (lo + hi) / 2, (hi - lo) / 2
        cands = [c, (c.unsqueeze(1) - coeffs.sign() * r.unsqueeze(1)).reshape(-1, c.shape[1])]
        if opts.pgd_steps > 0:
            worst = torch.argsort(margins)[: opts.pgd_boxes]
            cands.append(_pgd(graph, spec, lo[worst], hi[worst], opts.pgd_steps))
        x = torch.cat(cands)
        x = torch.maximum(torch.minimum(x, root_hi), root_lo)
        with torch.no_grad():
            bad = spec.violated_by(graph.forward(x.reshape((-1,) + in_shape[1:])))
        for i in torch.nonzero(bad).reshape(-1).tolist()[:8]:
            found = confirm(x[i].reshape(in_shape))
            if found is not None:
                return found
        return None

    def finish(status, reason="", cex=None, pending=0):
        res.status, res.reason, res.counterexample, res.pending = status, reason, cex, pending
        res.seconds = time.perf_counter() - t0
        return res

    # the pending sub-boxes, as batched tensors: bounds, proven groups, depth, margin (queue key)
    lo, hi = root_lo, root_hi
    done = torch.zeros(1, len(groups), dtype=torch.bool, device=device)
    depth = torch.zeros(1, dtype=torch.long, device=device)
    fresh = True  # lo/hi are not bounded yet
    q_lo = q_hi = q_done = q_depth = q_margin = q_coef = None
    stuck = False
    while True:
        if time.perf_counter() >= deadline:
            return finish(UNKNOWN, "timeout", pending=0 if q_lo is None else q_lo.shape[0])
        if fresh:
            lower, guard, coeffs = _bound(folded, lo, hi, opts, ctx)
            if res.lower is None:
                res.lower = lower[0].clone()
            res.visited += lo.shape[0]
            rows_ok = lower > torch.maximum(float_guard(lower), guard)
            done = done | (rows_ok.unsqueeze(1) & member.unsqueeze(0)).any(2)
            # margin of a box: over unproven groups, the best row's lower bound (min over groups)
            per_group = torch.where(member.unsqueeze(0), lower.unsqueeze(1), torch.tensor(-math.inf, dtype=lower.dtype, device=lower.device))
            best = per_group.max(2).values.masked_fill(done, math.inf)
            margins = best.min(1).values
            cex = falsify(lo, hi, coeffs, margins)
            if cex is not None:
                return finish(FALSIFIED, cex=cex)
            keep = ~done.all(1)
            res.depth = max(res.depth, int(depth.max()))
            parts = (lo[keep], hi[keep], done[keep], depth[keep], margins[keep], coeffs[keep])
            if q_lo is None:
                q_lo, q_hi, q_done, q_depth, q_margin, q_coef = parts
            else:
                q_lo, q_hi, q_done, q_depth, q_margin, q_coef = (torch.cat([a, b]) for a, b in zip(
                    (q_lo, q_hi, q_done, q_depth, q_margin, q_coef), parts))
        lowest = float(q_margin.min()) if q_margin.numel() else math.inf
        text = f"input split: {q_lo.shape[0]} sub-boxes left, lowest margin {lowest:.4g}"
        if progress is not None:
            progress.update(lo.shape[0], info=text)
        else:
            set_active_info(text)
        if q_lo.shape[0] == 0:
            return finish(UNKNOWN, "min_width") if stuck else finish(VERIFIED)
        if q_lo.shape[0] > opts.max_domains:
            return finish(UNKNOWN, "max_domains", pending=q_lo.shape[0])
        # pop the lowest-margin sub-boxes and halve each along its best input
        order = torch.argsort(q_margin, stable=True)
        take, rest = order[: opts.batch_size], order[opts.batch_size:]
        p_lo, p_hi, p_done, p_depth, p_coef = q_lo[take], q_hi[take], q_done[take], q_depth[take], q_coef[take]
        q_lo, q_hi, q_done, q_depth, q_margin, q_coef = (t[rest] for t in (q_lo, q_hi, q_done, q_depth, q_margin, q_coef))
        width = p_hi - p_lo
        open_rows = (member.unsqueeze(0) & ~p_done.unsqueeze(2)).any(1)  # (N, m) rows still needed
        score = width * (p_coef.abs() * open_rows.unsqueeze(2)).sum(1)
        splittable = width > min_width
        score = torch.where(splittable, score + 1e-30 * width, torch.full_like(score, -1.0))
        ok = splittable.any(1)
        if not bool(ok.all()):
            stuck = True  # a sub-box too small to split stays undecided; the rest may still falsify
            p_lo, p_hi, p_done, p_depth, score, width = (t[ok] for t in (p_lo, p_hi, p_done, p_depth, score, width))
        dim = score.argmax(1)
        rows = torch.arange(p_lo.shape[0], device=p_lo.device)
        mid = p_lo[rows, dim] + width[rows, dim] / 2
        left_hi, right_lo = p_hi.clone(), p_lo.clone()
        left_hi[rows, dim] = mid
        right_lo[rows, dim] = mid
        lo, hi = torch.cat([p_lo, right_lo]), torch.cat([left_hi, p_hi])
        done, depth = p_done.repeat(2, 1), (p_depth + 1).repeat(2)
        fresh = lo.shape[0] > 0


def uses_input_split(setting, graph) -> bool:
    """bab's `input_split` option: True / False, or "auto" (inputs of at most AUTO_MAX_INPUTS)."""
    return setting is True or (setting == "auto" and math.prod(graph.input_shape) <= AUTO_MAX_INPUTS)


def search_for_bab(graph, box: Box, spec: Spec, ctx, deadline: float, config: dict):
    """One sample of the bab domain searched by input splitting, as bab's SearchResult. bab's
    `max_domains`, `batch_size` (when set) and `pgd_steps` (0 turns PGD off) apply; its alpha
    and beta options do not (plain CROWN per sub-box decides ACAS-Xu fastest)."""
    from .bab import SearchResult

    opts = InputSplitOptions(max_domains=int(config["max_domains"]))
    if config.get("batch_size"):
        opts.batch_size = int(config["batch_size"])
    if not config.get("pgd_steps"):
        opts.pgd_steps = 0
    res = input_split_search(graph, spec, box, deadline=deadline, options=opts, ctx=ctx)
    lower = res.lower if res.lower is not None else \
        torch.full((spec.num_rows,), -math.inf, dtype=graph.dtype, device=box.lo.device)
    return SearchResult(res.status, lower, res.counterexample, visited=res.visited, depth=res.depth,
                        reason=res.reason, seconds=res.seconds)


def verify_vnnlib_by_input_split(graph, prop, time_limit: float, options: Optional[InputSplitOptions] = None):
    """A whole VNN-LIB property (all its cases) decided by input splitting alone (no MILP):
    holds iff every case is verified; a counterexample is moved into the case's own float64
    box and re-checked (graph and onnxruntime) before it is reported."""
    from .vnnlib_verify import HOLDS, UNKNOWN_ANSWER, VIOLATED, VnnlibAnswer, _inside_property_box, case_box

    t0 = time.perf_counter()
    out = VnnlibAnswer(HOLDS)
    out.by.add("input_split")
    visited = depth = 0
    for k, case in enumerate(prop.cases):
        spec = case.spec.to(dtype=graph.dtype)
        res = input_split_search(graph, spec, case_box(graph, case), deadline=t0 + time_limit, options=options,
                                 confirm=lambda x, case=case, spec=spec: _inside_property_box(graph, case, spec, x))
        visited, depth = visited + res.visited, max(depth, res.depth)
        if res.status == FALSIFIED:
            out.answer, out.counterexample, out.case = VIOLATED, res.counterexample, k
            break
        if res.status != VERIFIED:
            out.answer = UNKNOWN_ANSWER  # other cases may still hold a counterexample
    out.seconds = time.perf_counter() - t0
    out.visited, out.depth = visited, depth
    return out
