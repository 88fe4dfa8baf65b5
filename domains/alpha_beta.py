"""Optimised linear bounds for sub-domains of branch and bound (alpha-CROWN + beta-CROWN).

A sub-domain is the input box plus split constraints on some ReLU inputs: sign +1 means
z >= 0, sign -1 means z <= 0. A batch of sub-domains is bounded in one pass of the shared
back-substitution engine (`LinearBoundEngine`), the batch dimension being the sub-domain:

- the splits clip the stored pre-activation bounds (z >= 0: lower bound 0; z <= 0: upper
  bound 0), so split ReLUs get exact (stable) relaxations, and interval bounds downstream are
  refreshed from the clipped ones;
- beta-CROWN: every split constraint sign * z >= 0 enters the back-substitution with a
  Lagrange multiplier beta >= 0, as the term -beta * sign added to the coefficients of z
  (`LinearBoundEngine.lower_bound(splits=...)`). On the sub-domain sign * z >= 0, so
  subtracting beta * sign * z can only lower the objective: any beta >= 0 gives a valid
  lower bound, and beta = 0 is plain CROWN with the clipped relaxations;
- alpha for every layer: the free lower slopes of unstable ReLUs are parameters per bounded
  row, for the output rows and (option `intermediate`) for the rows of every intermediate
  pre-activation bound, all optimised jointly by projected Adam steps on the sum of the output
  lower bounds (plus a small weight on the intermediate rows' own bounds); intermediate
  bounds feed the relaxations of later layers within each step.
  Any alpha in [0, 1] is valid, so soundness never depends on the optimiser.

The best bound of every row over the steps is kept (each step's bound is valid). Rounding:
the engine runs with the per-node rounding errors of the verdict guard (`guard.node_errors`),
so every returned bound already has the guard subtracted (see `bound_subdomains(guard=...)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from verikit import ir
from verikit.bounds import Box, BoundStore

from .adam import Adam
from .bab_activation_split import interval_constant, interval_multipliers, interval_terms, s_shaped_nodes
from .box import propagate_box
from .linear_bounds import LinearBoundEngine
from .relaxations import relaxation_for

# sub-domains whose bounds cross by more than this (relative) are empty
_EMPTY_TOL = 1e-6
# intermediate alpha only where its dense coefficients stay below this many numbers per batch
INTERMEDIATE_ALPHA_MAX_NUMBERS = 40_000_000
# the intermediate rows' own bounds enter the objective with this weight: they matter through
# later relaxations (the output objective's gradient) and by showing sub-domains empty
INTERMEDIATE_WEIGHT = 0.1


@dataclass
class SubdomainBatch:
    """D sub-domains: input boxes (D, *in), split signs per ReLU node (D, *shape) in
    {-1, 0, +1} (int8), and optionally tighter pre-activation bounds inherited from parents."""

    inputs: Box
    signs: dict
    pre_bounds: dict = field(default_factory=dict)  # pre-activation node -> (lo, hi) (D, *shape)
    # per sub-domain, the activation nodes whose relaxation may differ from the ones that gave
    # `pre_bounds` (the nodes split since): only pre-activation nodes downstream of them are
    # back-substituted again (the others would get the same bounds). None: all may have changed
    changed: Optional[list] = None


@dataclass
class BatchBounds:
    lower: Tensor  # (D, m) lower bounds of the output rows (guard already subtracted)
    empty: Tensor  # (D,) bool: the split constraints leave no point (the sub-domain is void)
    pre_bounds: dict  # pre-activation node -> (lo, hi) (D, *shape), the tightest found
    alphas: dict  # ReLU node -> (D, m, *shape): output rows' slopes of the best step
    betas: dict  # ReLU node -> (D, m, *shape): output rows' multipliers of the best step
    coefficients: dict  # ReLU node -> (D, m, *shape): coefficients on its output (branching)
    minimisers: Tensor  # (D, m, *in): input minimising each row's final linear bound
    steps: int = 0


def relu_nodes(graph: ir.Graph) -> list:
    return [n for n in graph.nodes if isinstance(n.op, ir.ReLU)]


def split_store(folded: ir.Graph, batch: SubdomainBatch, ctx=None) -> tuple[BoundStore, Tensor]:
    """Interval bounds of the sub-domains (parents' bounds, then the clipped split
    pre-activations, then a box pass downstream) and which sub-domains are empty."""
    store = propagate_box(folded, batch.inputs, None, ctx)
    for name, (lo, hi) in batch.pre_bounds.items():
        store.update(name, Box(lo, hi))
    for name, sign in batch.signs.items():
        pre = folded.node(name).inputs[0]
        box = store[pre]
        zero = torch.zeros_like(box.lo)
        lo = torch.where(sign > 0, torch.maximum(box.lo, zero), box.lo)
        hi = torch.where(sign < 0, torch.minimum(box.hi, zero), box.hi)
        store.update(pre, Box(lo, hi))
    store = propagate_box(folded, batch.inputs, store, ctx)
    return store, _empty(store, batch.inputs.lo.shape[0])


def downstream(graph: ir.Graph, names: Optional[tuple]) -> Optional[set]:
    """Every node that reads (directly or through others) one of `names`; None for None."""
    if names is None:
        return None
    users, seen, todo = graph.consumers(), set(), list(names)
    while todo:
        for user in users.get(todo.pop(), []):
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return seen


DOWNSTREAM_ONLY = True  # children refined only below their new split (off: only to compare)


def refinement_groups(graph: ir.Graph, changed: Optional[list]) -> Optional[list]:
    """The sub-domains grouped by the nodes downstream of their new splits: [(index tensor,
    nodes)], or None where every node may have changed."""
    if changed is None:
        return None
    by_names: dict = {}  # children of one parent share their split: one graph walk per split
    for k, names in enumerate(changed):
        by_names.setdefault(tuple(names), []).append(k)
    groups: dict = {}
    for names, idx in by_names.items():
        groups.setdefault(frozenset(downstream(graph, names)), []).extend(idx)
    return [(torch.tensor(sorted(idx)), set(nodes)) for nodes, idx in groups.items()]


def _empty(store: BoundStore, D: int, boxes: Optional[dict] = None) -> Tensor:
    out = torch.zeros(D, dtype=torch.bool, device=next(iter(store.items()))[1].lo.device)
    for _, box in (boxes or dict(store.items())).items():
        lo, hi = (box.lo, box.hi) if isinstance(box, Box) else box
        lo, hi = lo.reshape(D, -1), hi.reshape(D, -1)
        out |= (lo - hi > _EMPTY_TOL * (1 + lo.abs() + hi.abs())).any(1)
    return out


def _relu_relaxation(op, lo: Tensor, hi: Tensor):
    """The shared (sound, outward-rounded) ReLU relaxation of [lo, hi], with gradients of the
    chord w.r.t. lo and hi attached straight through (the values are exactly the sound ones):
    intermediate alphas learn from how their bounds move later layers' relaxations."""
    rel = relaxation_for(op, lo.detach(), hi.detach(), "crown")
    if lo.requires_grad or hi.requires_grad:
        unstable = rel.alpha_mask
        width = torch.where(unstable, hi - lo, torch.ones_like(lo))
        slope = torch.where(unstable, hi / width, torch.zeros_like(lo))
        bias = torch.where(unstable, -lo * hi / width, torch.zeros_like(lo))
        rel.upper_slope = rel.upper_slope + (slope - slope.detach())
        rel.upper_bias = rel.upper_bias + (bias - bias.detach())
    return rel


class _Plan:
    """Which rows of which pre-activation nodes get bounds, and the ReLUs they feed."""

    def __init__(self, engine: LinearBoundEngine, intermediate: bool, signs: dict):
        graph = engine.graph
        consumers = graph.consumers()
        self.nodes = []  # (pre name, rows (k,), [ReLU node names fed by it])
        if not intermediate:
            return
        D = engine.batch
        numbers = 0
        for pre in engine.preactivation_nodes():
            feeds = [u for u in consumers[pre] if isinstance(graph.node(u).op, ir.ReLU)]
            if not feeds or engine.box_is_exact(pre):
                continue
            box = engine.store[pre]
            lo, hi = box.lo.reshape(D, -1), box.hi.reshape(D, -1)
            # unstable rows, and split ones (their bounds can show that a sub-domain is empty)
            split = torch.zeros_like(lo, dtype=torch.bool)
            for u in feeds:
                if u in signs:
                    split |= signs[u].reshape(D, -1) != 0
            rows = (((lo < 0) & (hi > 0)) | split).any(0).nonzero().flatten()
            if rows.numel() == 0:
                continue
            before = [n for n in relu_nodes(graph) if engine.position[n.name] < engine.position[pre]]
            numbers += D * 2 * rows.numel() * (math.prod(graph.shapes[pre])
                                               + sum(2 * math.prod(graph.shapes[n.name]) for n in before))
            self.nodes.append((pre, rows, feeds))
        if numbers > INTERMEDIATE_ALPHA_MAX_NUMBERS:  # too big: intermediate bounds stay plain CROWN
            self.nodes = []


def _one_hot(engine: LinearBoundEngine, name: str, rows: Tensor) -> Tensor:
    shape = tuple(engine.graph.shapes[name])
    D, k = engine.batch, rows.numel()
    lam = torch.zeros(D, 2 * k, math.prod(shape), device=engine.device, dtype=engine.dtype)
    ar = torch.arange(k, device=engine.device)
    lam[:, ar, rows] = 1.0
    lam[:, ar + k, rows] = -1.0
    return lam.reshape((D, 2 * k) + shape)


def _params(engine: LinearBoundEngine, start: str, m: int, signs: dict, alpha_init: Optional[dict],
            beta_init: Optional[dict]):
    """alpha (D, m, *shape) per unstable ReLU before `start` and beta (same shape) per split
    ReLU before `start`, as leaf tensors."""
    alphas, betas = {}, {}
    for node in relu_nodes(engine.graph):
        if engine.position[node.name] >= engine.position[start]:
            continue
        rel = engine.relaxation(node)
        shape = (engine.batch, m) + tuple(rel.lower_slope.shape[1:])
        if bool(rel.alpha_mask.any()):
            init = alpha_init.get(node.name) if alpha_init else None
            init = rel.lower_slope.unsqueeze(1).expand(shape) if init is None else init
            alphas[node.name] = init.detach().clone().clamp_(0.0, 1.0).requires_grad_(True)
        if node.name in signs and bool((signs[node.name] != 0).any()):
            init = beta_init.get(node.name) if beta_init else None
            init = torch.zeros(shape, device=engine.device, dtype=engine.dtype) if init is None else init
            betas[node.name] = init.detach().clone().clamp_(min=0.0).requires_grad_(True)
    return alphas, betas


def _split_terms(betas: dict, signs: dict) -> dict:
    return {name: -b * signs[name].unsqueeze(1).to(b.dtype) for name, b in betas.items() if name in signs}


def _all_terms(betas: dict, gammas: dict, signs: dict) -> dict:
    return {**_split_terms(betas, signs), **interval_terms(gammas)}


def bound_subdomains(folded: ir.Graph, batch: SubdomainBatch, ctx=None, steps: int = 20, lr_alpha: float = 0.1,
                     lr_beta: float = 0.05, alpha_init: Optional[dict] = None, beta_init: Optional[dict] = None,
                     intermediate: bool = True, guard: bool = True, max_rows_per_chunk: int = 4096,
                     floor: Optional[Tensor] = None, proven=None) -> BatchBounds:
    """Lower bounds of every output row of `folded` (the spec-folded graph) on each sub-domain.

    `alpha_init` / `beta_init`: per ReLU node (D, m, *shape) starting points (a parent's, so
    children start where their parent stopped; missing ones start at CROWN's slopes / 0).
    `guard`: run with the rounding guard's node errors (every bound already below its guard).
    `floor` (D, m): bounds known to hold (a parent's); the result is never below it.
    `proven`: (D, m) lower bounds -> (D,) bool, the caller's test; the steps stop once every
    sub-domain passes it (or is empty): more steps could not change what the caller decides."""
    from .guard import node_errors

    with torch.no_grad():
        store, empty = split_store(folded, batch, ctx)
        errors = node_errors(folded, store) if guard else None
        engine = LinearBoundEngine(folded, store, ctx, "crown", max_rows_per_chunk, True, errors)
        # plain CROWN (beta = 0) under the splits, the starting point: where the rest is inherited,
        # only downstream of the new splits (the same bounds, fewer passes)
        groups = refinement_groups(folded, batch.changed) if DOWNSTREAM_ONLY else None
        engine.refine_intermediate() if groups is None else engine.refine_groups(groups)
    empty |= _empty(store, engine.batch)
    signs = batch.signs
    out = folded.output
    m = math.prod(folded.shapes[out])
    D = engine.batch
    eye = torch.eye(m, device=engine.device, dtype=engine.dtype).expand(D, m, m).reshape((D, m) + tuple(folded.shapes[out]))
    with torch.no_grad():  # caches every op's backward form outside autograd (live torch parameters)
        plain = engine.lower_bound(out, eye)
    plan = _Plan(engine, intermediate and steps > 0, signs)
    inter = {pre: _params(engine, pre, 2 * rows.numel(), signs, None, None) for pre, rows, _ in plan.nodes}
    alphas, betas = _params(engine, out, m, signs, alpha_init, beta_init)
    # multipliers of the Sigmoid/Tanh input intervals (bab_activation_split.py), kept with the betas
    gammas = interval_multipliers(folded, store, D, m, beta_init, engine.device, engine.dtype) if steps > 0 else {}
    best_pre = {pre: (store[pre].lo.detach().clone(), store[pre].hi.detach().clone()) for pre, _, _ in plan.nodes}
    best = plain if floor is None else torch.maximum(floor, plain)
    best_alpha = {k: v.detach().clone() for k, v in alphas.items()}
    best_beta = {k: v.detach().clone() for k, v in list(betas.items()) + list(gammas.items())}
    params = list(alphas.values()) + list(betas.values()) + list(gammas.values())
    params += [p for a, b in inter.values() for p in list(a.values()) + list(b.values())]
    groups = [{"params": [p for p in params if any(p is a for a in _all_alphas(alphas, inter))], "lr": lr_alpha},
              {"params": [p for p in params if not any(p is a for a in _all_alphas(alphas, inter))], "lr": lr_beta}]
    opt = Adam([g for g in groups if g["params"]]) if params and steps > 0 else None
    done = 0
    for step in range(steps if opt is not None else 0):
        if proven is not None and bool((proven(best) | empty).all()):
            break  # (before the first step too: a parent's floor or plain CROWN may prove them all)
        with torch.enable_grad():
            lower, own = _pass(engine, plan, inter, best_pre, alphas, betas, signs, eye, gammas)
            improved = lower.detach() > best
            best = torch.where(improved, lower.detach(), best)
            for src, dst in ((alphas, best_alpha), (betas, best_beta), (gammas, best_beta)):
                for k, v in src.items():
                    mask = improved.reshape(improved.shape + (1,) * (v.dim() - 2))
                    dst[k] = torch.where(mask, v.detach(), dst[k])
            opt.zero_grad(set_to_none=True)
            (-lower.sum() - INTERMEDIATE_WEIGHT * own).backward()
        opt.step()
        with torch.no_grad():
            for p in _all_alphas(alphas, inter):
                p.clamp_(0.0, 1.0)
            for b in list(betas.values()) + [p for _, bs in inter.values() for p in bs.values()]:
                b.clamp_(min=0.0)
        done += 1
    # the final pass: best slopes and multipliers, best intermediate bounds; it records the
    # coefficients for branching and the minimisers for falsification
    with torch.no_grad():
        engine._relax.clear()
        for pre, (lo, hi) in best_pre.items():
            store.update(pre, Box(lo, hi))
        # coefficients on every neuron branching may split: ReLUs and Sigmoid/Tanh (GenBaB)
        branchable = [n.name for n in relu_nodes(folded)] + s_shaped_nodes(folded)
        engine.capture = set(branchable) | {folded.input_name}
        engine.captured = {}
        best_gamma = {k: best_beta[k] for k in gammas}
        final = engine.lower_bound(out, eye, best_alpha, _all_terms(best_beta, best_gamma, signs))
        final = interval_constant(folded, store, best_gamma, final)
        engine.capture = set()
        best = torch.maximum(best, final)
        lam_x = engine.captured[folded.input_name]
        box = store[folded.input_name]
        minimisers = box.center.unsqueeze(1) - box.radius.unsqueeze(1) * torch.sign(lam_x)
        pre_bounds = {}
        for name in engine.preactivation_nodes():
            pre_bounds[name] = (store[name].lo, store[name].hi)
        empty |= _empty(store, D)
    return BatchBounds(best, empty, pre_bounds, best_alpha, best_beta,
                       {k: engine.captured.get(k) for k in branchable if k in engine.captured}, minimisers, done)


def _all_alphas(alphas: dict, inter: dict) -> list:
    return list(alphas.values()) + [p for a, _ in inter.values() for p in a.values()]


def _pass(engine: LinearBoundEngine, plan: _Plan, inter: dict, best_pre: dict, alphas: dict, betas: dict,
          signs: dict, eye: Tensor, gammas: dict) -> tuple[Tensor, Tensor]:
    """One joint evaluation: intermediate bounds with their own alphas/betas (kept at the best
    seen, element-wise), the relaxations they give, then the output rows. Returns the output
    lower bounds and the sum of the intermediate rows' own bounds (lower - upper). The other
    relaxations are kept from pass to pass: their input bounds (the store's) do not change, and
    those fed by the optimised nodes are replaced below before anything downstream reads them
    (recomputing all of them took ~40% of a pass on a 9x200 MLP)."""
    D = engine.batch
    own = torch.zeros((), device=engine.device, dtype=engine.dtype)
    for pre, rows, feeds in plan.nodes:
        a, b = inter[pre]
        k = rows.numel()
        lb = engine.lower_bound(pre, _one_hot(engine, pre, rows), a, _split_terms(b, signs))
        own = own + lb.sum()
        old_lo, old_hi = best_pre[pre]
        shape = old_lo.shape
        lo, hi = old_lo.reshape(D, -1).clone(), old_hi.reshape(D, -1).clone()
        lo[:, rows] = torch.maximum(lo[:, rows], lb[:, :k])
        hi[:, rows] = torch.minimum(hi[:, rows], -lb[:, k:])
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        best_pre[pre] = (lo.detach(), hi.detach())
        for name in feeds:
            engine._relax[name] = _relu_relaxation(engine.graph.node(name).op, lo, hi)
    lower = engine.lower_bound(engine.graph.output, eye, alphas, _all_terms(betas, gammas, signs))
    return interval_constant(engine.graph, engine.store, gammas, lower), own
