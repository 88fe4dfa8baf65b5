"""`bab` domain: complete verification by branch and bound over ReLU splits (beta-CROWN style).

Per sample, the search keeps open sub-domains (the input box plus split constraints z >= 0 /
z <= 0 on some ReLU inputs) in a queue ordered by lower bound (`bab_queue.py`). Each round
pops a batch of the lowest, splits each on the ReLU its branching score picks
(`bab_branching.py`) and bounds all children in one batched engine pass with optimised alpha
and beta (`alpha_beta.py`; children start from their parent's alpha and beta and keep their
parent's bounds as a floor). A sub-domain is closed when its lower bounds prove the spec or
when its split constraints leave no point. Falsification runs alongside: the inputs that
minimise each child's bounds are evaluated, and a short PGD starts from the most promising;
a candidate is re-checked (`milp.confirm_counterexample`: graph and onnxruntime) before the
sample is reported falsified. Open sub-domains with at most `leaf_milp` unstable ReLUs left go
to the MILP (HiGHS by default) on the sub-domain's bounds instead of being split further.

Verdicts: verified when no open sub-domain is left (every bound has the rounding guard's node
errors subtracted, see alpha_beta.py, and must clear the spec's relative floor);
falsified with a re-checked counterexample; unknown when the timeout, `max_domains` or the
memory cap (`memory_mb`) is reached first, or when a sub-domain has no neuron left to split.

`bound()` decides the search strategy in one place (`_strategy`): input splitting
(`bab_input.py`) for inputs of at most 16 elements (option `input_split`: auto / true /
false), whatever the activations (Sigmoid/Tanh too); otherwise neuron splitting: ReLU splits
and, for Sigmoid/Tanh neurons, splits of their input intervals (`bab_activation_split.py`,
GenBaB), the candidate with the highest score winning; a network with neither is bounded at
the root only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError
from verikit.spec import Spec, fold_spec

from .alpha_beta import BatchBounds, SubdomainBatch, bound_subdomains, relu_nodes
from .bab_activation_split import activation_scores, merge_picks, narrowed, s_shaped_nodes
from .bab_branching import check_branching, choose_splits
from .bab_queue import Subdomain, SubdomainQueue
from .base import FALSIFIED, UNKNOWN, VERIFIED, Domain, DomainResult, register_domain
from .box import propagate_box

BYTES = 4
MAX_BATCH = 256  # sub-domains per engine pass at most, when the batch size comes from memory_mb


@dataclass
class SearchResult:
    status: str
    lower: Tensor  # (m,) valid lower bounds of the rows on the whole input box
    counterexample: Optional[Tensor] = None
    visited: int = 0  # sub-domains bounded (the root included)
    depth: int = 0  # the most splits on one sub-domain
    rounds: int = 0
    reason: str = ""  # why unknown
    leaf_milp: int = 0  # sub-domains handed to the MILP
    seconds: float = 0.0

    def info(self) -> dict:
        return {"status": self.status, "visited": self.visited, "depth": self.depth, "rounds": self.rounds,
                "reason": self.reason, "leaf_milp": self.leaf_milp, "time": self.seconds}


def _deterministic(mode: bool, warn_only: bool = False) -> None:
    """torch.use_deterministic_algorithms without its import of torch._inductor.config (1.3 s
    on this machine, paid by every `verikit certify` and VNN-COMP instance that reaches bab):
    the flag itself lives in torch._C; the inductor copy matters only to compiled code, which
    verikit does not run."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # another torch: the public call
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@register_domain
class BabDomain(Domain):
    name = "bab"
    description = "branch and bound over ReLU splits with optimised alpha/beta bounds (beta-CROWN): complete"
    complete = True
    differentiable = False
    options = {
        "timeout": 60.0,  # seconds per sample (the chain's budget, when smaller, wins)
        "max_domains": 200_000,  # open sub-domains at most; more: unknown
        "batch_size": 0,  # sub-domains per engine pass; 0: from memory_mb and the network size
        "memory_mb": 1024.0,  # budget for one batch's tensors and for the open queue
        "branching": "babsr",  # babsr | widest (bab_branching.py)
        "alpha_steps": 20,  # alpha/beta steps at the root
        "beta_steps": 10,  # alpha/beta steps per batch of children
        "alpha_lr": 0.1,
        "beta_lr": 0.05,
        "intermediate": "root",  # alphas/betas of intermediate bounds optimised jointly: root | all | off
        "pgd_steps": 10,  # PGD steps from the most promising minimisers each round (0: off)
        "leaf_milp": 0,  # open sub-domains with at most this many unstable ReLUs go to the MILP (0: never)
        "leaf_milp_time": 10.0,  # seconds per leaf MILP (within the sample's budget)
        "leaf_solver": "highs",  # the leaf MILP's solver (milp option `solver`)
        "deterministic": False,  # deterministic kernels; same search every run unless the timeout cuts it
        "time_limit": None,  # set by the chain: the sample's remaining budget
        "input_split": "auto",  # split the input box instead (bab_input.py): auto = inputs of <= 16 elements
    }

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        for key in ("timeout", "memory_mb", "alpha_lr", "beta_lr", "leaf_milp_time"):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key != "timeout" and v == 0):
                raise VerikitError(f"bab option {key} must be a {'non-negative' if key == 'timeout' else 'positive'} "
                                   f"number, got {v!r}")
        for key in ("max_domains", "batch_size", "alpha_steps", "beta_steps", "pgd_steps", "leaf_milp"):
            v = c[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise VerikitError(f"bab option {key} must be a non-negative integer, got {v!r}")
        check_branching(c["branching"])
        if c["leaf_solver"] not in ("auto", "highs", "gurobi"):
            raise VerikitError(f"bab option leaf_solver must be auto, highs or gurobi, got {c['leaf_solver']!r}")
        if c["intermediate"] not in ("root", "all", "off"):
            raise VerikitError(f"bab option intermediate must be root, all or off, got {c['intermediate']!r}")
        if c["input_split"] not in ("auto", True, False):
            raise VerikitError(f"bab option input_split must be auto, true or false, got {c['input_split']!r}")
        if c["time_limit"] is not None and (not isinstance(c["time_limit"], (int, float)) or c["time_limit"] < 0):
            raise VerikitError(f"bab option time_limit must be a non-negative number, got {c['time_limit']!r}")

    def budget(self) -> float:
        t = float(self.config["timeout"])
        return t if self.config["time_limit"] is None else min(t, float(self.config["time_limit"]))

    def bound(self, graph, inputs: Box, spec: Optional[Spec] = None, store: Optional[BoundStore] = None,
              ctx=None) -> DomainResult:
        if spec is None:
            raise VerikitError("the bab domain needs a spec (the property to decide)")
        spec = spec.to(device=inputs.lo.device, dtype=graph.dtype)
        B = inputs.lo.shape[0]
        statuses, cexs, lowers, infos = [], [], [], []
        old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        if self.config["deterministic"]:
            _deterministic(True, warn_only=True)
        try:
            for b in range(B):
                spec_b = spec.for_sample(b) if spec.C.dim() == 3 else spec
                res = self._strategy(graph, inputs[[b]], spec_b, _sample_store(store, b, B), ctx)
                statuses.append(res.status)
                cexs.append(res.counterexample)
                lowers.append(res.lower)
                infos.append(res.info())
        finally:
            _deterministic(*old)
        lower = torch.stack(lowers).to(inputs.lo.dtype)
        out_store = propagate_box(graph, inputs.detach(), None, ctx) if store is None else store
        info = {"samples": infos, "visited": sum(i["visited"] for i in infos),
                "depth": max((i["depth"] for i in infos), default=0)}
        return DomainResult(lower, None, out_store, status=statuses, counterexamples=cexs, info=info)

    # ------------------------------------------------------------ strategy
    def _strategy(self, graph, box: Box, spec: Spec, store: Optional[BoundStore], ctx) -> SearchResult:
        """The one place that decides how a sample is searched: input splitting for
        low-dimensional inputs (option input_split, bab_input.py); else ReLU splitting, at the root for the whole
        spec, then one search per spec group still open (a group's rows alone need far fewer
        splits than all rows together), the most likely violated group first."""
        deadline = time.perf_counter() + self.budget()
        from .bab_input import search_for_bab, uses_input_split

        if uses_input_split(self.config["input_split"], graph):  # low-dimensional inputs (ACAS-Xu)
            return search_for_bab(graph, box, spec, ctx, deadline, self.config)
        pre_bounds = _given_bounds(graph, store)
        whole = ReluSearch(self.config, graph, box, spec, pre_bounds, ctx, deadline)
        root = whole.root()
        groups = spec.group_list
        if root is None or len(groups) == 1:
            return whole.run_from_root() if root is not None else whole.result
        result = whole.result
        lower_root = result.lower.clone()
        open_groups = [g for g in groups if not bool(whole.proven_rows(lower_root, g))]
        open_groups.sort(key=lambda g: float(lower_root[list(g)].max()))
        status = VERIFIED
        for g in open_groups:
            rows = list(g)
            part = ReluSearch(self.config, graph, box, _rows_spec(spec, rows), whole.root_bounds.pre_bounds, ctx, deadline)
            alphas = {n: a[:, rows] for n, a in whole.root_bounds.alphas.items()}
            betas = {n: b[:, rows] for n, b in whole.root_bounds.betas.items()}
            res = part.run(alphas, betas, self.config["beta_steps"], floor=lower_root[rows][None])
            result.visited += res.visited
            result.rounds += res.rounds
            result.leaf_milp += res.leaf_milp
            result.depth = max(result.depth, res.depth)
            result.lower[rows] = torch.maximum(result.lower[rows], res.lower)
            if res.status == FALSIFIED:
                result.status, result.counterexample, result.reason = FALSIFIED, res.counterexample, ""
                break
            if res.status == UNKNOWN:
                status, result.reason = UNKNOWN, res.reason
                if time.perf_counter() >= deadline:
                    break  # (with time left, the other groups may still hold a counterexample)
        else:
            result.status = status
        result.seconds = time.perf_counter() - whole.t0
        return result


def _rows_spec(spec: Spec, rows: list) -> Spec:
    """The spec of one group: its rows, as one group."""
    exact = None if spec.exact is None else (spec.exact[0][rows], spec.exact[1][rows])
    strict = None if spec.strict is None else spec.strict[rows]
    return Spec(spec.C[rows], spec.d[rows], (tuple(range(len(rows))),), strict, exact)


def _given_bounds(graph, store: Optional[BoundStore]) -> dict:
    """Pre-activation bounds from earlier domains of the chain (they only tighten)."""
    out = {}
    if store is not None:
        for node in graph.nodes:
            if not node.op.is_affine and node.inputs[0] in store:
                box = store[node.inputs[0]]
                out[node.inputs[0]] = (box.lo.detach(), box.hi.detach())
    return out


def _sample_store(store: Optional[BoundStore], b: int, B: int) -> Optional[BoundStore]:
    if store is None or not len(store):
        return None
    first = next(iter(store.items()))[1]
    return store.select([b]) if first.lo.shape[0] == B else None


class ReluSearch:
    """Branch and bound over neuron splits (ReLU signs, Sigmoid/Tanh input intervals) for one
    sample (box (1, *in), spec shared)."""

    def __init__(self, config: dict, graph, box: Box, spec: Spec, pre_bounds: dict, ctx, deadline: float):
        self.cfg, self.graph, self.box, self.spec, self.ctx = config, graph, box.detach(), spec, ctx
        self.t0 = time.perf_counter()
        self.deadline = deadline
        self.folded = fold_spec(graph, spec)
        self.relus = [n.name for n in relu_nodes(self.folded)]
        # Sigmoid/Tanh neurons are split on their input intervals (GenBaB; not those fed by the
        # graph input directly: that is input splitting)
        self.s_shaped = [n for n in s_shaped_nodes(self.folded) if self.folded.node(n).inputs[0] != graph.input_name]
        self.pre_of = {n: self.folded.node(n).inputs[0] for n in self.relus + self.s_shaped}
        self.m = spec.num_rows
        self.given = pre_bounds
        self.root_bounds: Optional[BatchBounds] = None
        self.result = SearchResult(UNKNOWN, torch.full((self.m,), -math.inf, dtype=graph.dtype, device=box.lo.device))
        self.closed_lower = torch.full((self.m,), math.inf, dtype=graph.dtype, device=box.lo.device)

    # ------------------------------------------------------------ helpers
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def proven(self, lower: Tensor) -> Tensor:
        """(D,) bool: lower bounds (guard already subtracted) above the spec's relative floor."""
        return self.spec.holds_given_lower(lower)

    def proven_rows(self, lower: Tensor, group) -> bool:
        """Is this group proven by the (m,) lower bounds (through the spec's relative floor)?"""
        g = list(group)
        return bool(Spec(self.spec.C[g], self.spec.d[g], (tuple(range(len(g))),)).holds_given_lower(lower[g][None])[0])

    def unproven_rows(self, lower: Tensor) -> Tensor:
        """(D, m) bool: rows of groups that are not proven yet (the ones worth improving)."""
        ok = lower > 0
        rows = torch.zeros_like(ok)
        for g in self.spec.group_list:
            open_g = ~ok[:, list(g)].any(1, keepdim=True)
            rows[:, list(g)] = open_g
        return rows

    def batch_size(self) -> int:
        if self.cfg["batch_size"]:
            return self.cfg["batch_size"]
        shapes = self.folded.shapes
        relu_total = sum(math.prod(shapes[n]) for n in self.relus)
        widest = max(math.prod(s) for s in shapes.values())
        if self.cfg["intermediate"] == "all":  # every intermediate row optimised with its own alphas
            rows = self.m + 2 * max((math.prod(shapes[self.pre_of[n]]) for n in self.relus), default=0)
            per_domain, cap = 4 * rows * (relu_total + widest), 1024  # coefficients, gradients, Adam's moments
        else:
            # the steps optimise the output rows only (intermediate rows: no autograd, fixed chunks);
            # 16 = four tensors per row x what chunks, store and queue add (cnn-small: 256 sub-domains,
            # 0.97 GB peak). More than 256 gave no more sub-domains per second (README, bab)
            per_domain, cap = 16 * self.m * (relu_total + widest), MAX_BATCH
        return int(max(1, min(cap, self.cfg["memory_mb"] * 2 ** 20 / (BYTES * per_domain))))

    def _finish(self, status: str, reason: str = "", queue: Optional[SubdomainQueue] = None) -> SearchResult:
        r = self.result
        r.status, r.reason = status, reason
        open_rows = queue.lower_rows() if queue is not None else None
        lower = self.closed_lower if open_rows is None else torch.minimum(self.closed_lower, open_rows)
        if status == FALSIFIED or not torch.isfinite(lower).all():
            lower = torch.where(torch.isfinite(lower), lower, r.lower)
        r.lower = torch.maximum(r.lower, lower) if status != FALSIFIED else r.lower
        if queue is not None:
            r.depth = max(r.depth, queue.max_depth())
        r.seconds = time.perf_counter() - self.t0
        return r

    # ------------------------------------------------------------ the search
    def root(self, alpha_init=None, beta_init=None, steps=None, floor=None) -> Optional[BatchBounds]:
        """Bound the whole box; None when that already decides the sample (or time is out)."""
        r = self.result
        if self.left() <= 0:
            self._finish(UNKNOWN, "timeout")
            return None
        pre_bounds = {k: v for k, v in self.given.items() if k in set(self.pre_of.values())}
        signs = {n: torch.zeros((1,) + tuple(self.folded.shapes[n]), dtype=torch.int8, device=self.box.lo.device)
                 for n in self.relus}
        steps = self.cfg["alpha_steps"] if steps is None else steps
        root = bound_subdomains(self.folded, SubdomainBatch(self.box, signs, pre_bounds), self.ctx, steps,
                                self.cfg["alpha_lr"], self.cfg["beta_lr"], alpha_init, beta_init,
                                intermediate=self.cfg["intermediate"] != "off" and alpha_init is None, floor=floor,
                                proven=self.proven)
        self.root_bounds, self.root_signs = root, signs
        r.visited, r.rounds = 1, 1
        r.lower = root.lower[0].detach().clone()
        if bool(root.empty[0]) or bool(self.proven(root.lower)[0]):
            self.closed_lower = r.lower.clone()
            self._finish(VERIFIED)
            return None
        if self._falsify(root, [0]):
            self._finish(FALSIFIED)
            return None
        return root

    def run_from_root(self) -> SearchResult:
        queue = SubdomainQueue()
        for d in self._subdomains(self.root_bounds, self.root_signs, [0], [0]):
            queue.push(d)
        return self._loop(queue)

    def run(self, alpha_init=None, beta_init=None, steps=None, floor=None) -> SearchResult:
        if self.root(alpha_init, beta_init, steps, floor) is None:
            return self.result
        return self.run_from_root()

    def _loop(self, queue: SubdomainQueue) -> SearchResult:
        from verikit.progress import set_active_info

        r = self.result
        size = self.batch_size()
        cap_numbers = self.cfg["memory_mb"] * 2 ** 20 / BYTES
        while len(queue):
            if self.left() <= 0:
                return self._finish(UNKNOWN, "timeout", queue)
            if len(queue) > self.cfg["max_domains"]:
                return self._finish(UNKNOWN, "max_domains", queue)
            if queue.numbers > cap_numbers:
                return self._finish(UNKNOWN, "memory", queue)
            set_active_info(f"bab: {len(queue)} domains left, global lower bound {queue.lowest():.4g}")
            parents = queue.pop(max(1, size // 2))
            children = self._branch(parents, queue)
            if children is None:
                return self._finish(UNKNOWN, "no neuron left to split", queue)
            batch, parent_of, floors = children
            bounds = bound_subdomains(self.folded, batch, self.ctx, self.cfg["beta_steps"], self.cfg["alpha_lr"],
                                      self.cfg["beta_lr"], _stack(parents, parent_of, "alphas"),
                                      _stack(parents, parent_of, "betas"), self.cfg["intermediate"] == "all",
                                      floor=floors, proven=self.proven)
            r.visited += len(parent_of)
            r.rounds += 1
            done = self.proven(bounds.lower) | bounds.empty
            for k in range(len(parent_of)):
                if bool(done[k]):
                    if not bool(bounds.empty[k]):
                        self.closed_lower = torch.minimum(self.closed_lower, bounds.lower[k].detach())
            open_idx = [k for k in range(len(parent_of)) if not bool(done[k])]
            depth = [parents[parent_of[k]].depth + 1 for k in range(len(parent_of))]
            r.depth = max([r.depth] + depth)
            if open_idx and self.cfg["leaf_milp"] > 0 and not self.s_shaped:  # no MILP for Sigmoid/Tanh
                open_idx = self._leaves(batch, bounds, open_idx)
                if open_idx is None:
                    return self._finish(FALSIFIED, queue=queue)
            if open_idx and self._falsify(bounds, open_idx):
                return self._finish(FALSIFIED, queue=queue)
            for d in self._subdomains(bounds, batch.signs, open_idx, [depth[k] for k in open_idx]):
                queue.push(d)
        return self._finish(VERIFIED)

    def _branch(self, parents: list, queue: SubdomainQueue):
        """Two children per parent, split on the neuron the branching rule picks, as one batch."""
        D = len(parents)
        bounds = {p: (torch.stack([d.pre_bounds[p][0] for d in parents]), torch.stack([d.pre_bounds[p][1] for d in parents]))
                  for p in parents[0].pre_bounds}
        signs = {n: torch.stack([d.signs[n] for d in parents]) for n in self.relus}
        coeffs = {n: torch.stack([d.coefficients[n] for d in parents]) for n in self.relus + self.s_shaped
                  if all(d.coefficients.get(n) is not None for d in parents)}
        lower = torch.stack([d.lower for d in parents])
        rows = self.unproven_rows(lower)
        relu_picks, relu_scores = choose_splits(self.cfg["branching"], self.relus, self.pre_of, bounds, coeffs, signs,
                                                rows, with_scores=True)
        s_scores, s_picks = activation_scores(self.folded, self.s_shaped, self.pre_of, bounds, coeffs, rows)
        picks = merge_picks(relu_scores, relu_picks, s_scores, s_picks)
        keep = [k for k, p in enumerate(picks) if p is not None]
        if len(keep) < D:
            return None
        parent_of, child_signs = [], {n: [] for n in self.relus}
        child_bounds = {p: ([], []) for p in bounds}
        for k, (kind, name, idx) in enumerate(picks):
            halves = narrowed(bounds[self.pre_of[name]][0][k], bounds[self.pre_of[name]][1][k], idx) \
                if kind == "s" else None
            for c, s in enumerate((1, -1)):
                parent_of.append(k)
                for n in self.relus:
                    t = signs[n][k].clone()
                    if kind == "relu" and n == name:
                        t.view(-1)[idx] = s
                    child_signs[n].append(t)
                for p in bounds:
                    lo, hi = halves[c] if halves is not None and p == self.pre_of[name] else \
                        (bounds[p][0][k], bounds[p][1][k])
                    child_bounds[p][0].append(lo)
                    child_bounds[p][1].append(hi)
        inputs = Box(self.box.lo.expand((2 * D,) + self.box.lo.shape[1:]), self.box.hi.expand((2 * D,) + self.box.hi.shape[1:]))
        batch = SubdomainBatch(inputs, {n: torch.stack(v) for n, v in child_signs.items()},
                               {p: (torch.stack(lo), torch.stack(hi)) for p, (lo, hi) in child_bounds.items()},
                               changed=[(name,) for _, name, _ in picks for _ in (1, -1)])
        floors = lower[parent_of]
        return batch, parent_of, floors

    def _subdomains(self, bounds: BatchBounds, signs: dict, idx: list, depths: list) -> list:
        out = []
        for k, depth in zip(idx, depths):
            lower = bounds.lower[k].detach()
            d = Subdomain(float(self.spec.margin(lower[None])[0]), lower,
                          {n: signs[n][k] for n in self.relus},
                          {p: (lo[k], hi[k]) for p, (lo, hi) in bounds.pre_bounds.items()},
                          {n: a[k] for n, a in bounds.alphas.items()},
                          {n: b[k] for n, b in bounds.betas.items()}, depth,
                          {n: c[k] for n, c in bounds.coefficients.items()})
            out.append(d)
        return out

    # ------------------------------------------------------------ leaf MILP
    def _leaves(self, batch: SubdomainBatch, bounds: BatchBounds, idx: list) -> Optional[list]:
        """Hand the sub-domains with few unstable ReLUs to the MILP: the ones it proves are
        closed; None when it finds a (re-checked) counterexample; the rest stay open."""
        from .alpha_beta import split_store
        from .milp import MilpDomain

        keep = []
        for k in idx:
            unstable = 0
            for n in self.relus:
                lo, hi = bounds.pre_bounds[self.pre_of[n]]
                unstable += int(((lo[k] < 0) & (hi[k] > 0) & (batch.signs[n][k] == 0)).sum())
            if unstable > self.cfg["leaf_milp"] or self.left() <= 0:
                keep.append(k)
                continue
            one = SubdomainBatch(self.box, {n: batch.signs[n][k:k + 1] for n in self.relus},
                                 {p: (lo[k:k + 1], hi[k:k + 1]) for p, (lo, hi) in bounds.pre_bounds.items()})
            store, _ = split_store(self.folded, one, self.ctx)
            milp = MilpDomain(solver=self.cfg["leaf_solver"], bounds_from="none", input_split=False,
                              time_limit=max(0.01, min(self.left(), float(self.cfg["leaf_milp_time"]))))
            res = milp.bound(self.graph, self.box, self.spec, store=store)
            self.result.leaf_milp += 1
            if res.status[0] == VERIFIED:
                self.closed_lower = torch.minimum(self.closed_lower, bounds.lower[k].detach())
            elif res.status[0] == FALSIFIED and res.counterexamples[0] is not None:
                self.result.counterexample = res.counterexamples[0].detach()  # milp re-checked it
                return None
            else:
                keep.append(k)
        return keep

    # ------------------------------------------------------------ falsification
    def _falsify(self, bounds: BatchBounds, idx: list) -> bool:
        """Evaluate the minimisers of the open sub-domains' rows, then PGD from the most
        promising; a violation re-checked on the graph (and onnxruntime) ends the search."""
        from .milp import confirm_counterexample

        graph, spec = self.graph, self.spec
        shape = tuple(graph.input_shape)
        x = bounds.minimisers[idx].reshape((-1,) + shape)
        x = torch.minimum(torch.maximum(x, self.box.lo), self.box.hi)
        with torch.no_grad():
            margin = spec.margin(spec.values(graph.forward(x)))
        order = torch.argsort(margin)
        starts = x[order[: min(8, len(order))]]
        if self.cfg["pgd_steps"] > 0 and self.left() > 0:
            starts = torch.cat([starts, _pgd(graph, spec, self.box, starts, self.cfg["pgd_steps"])])
        with torch.no_grad():
            y = graph.forward(starts)
        for k in torch.nonzero(spec.expand(starts.shape[0]).violated_by(y)).flatten().tolist():
            if confirm_counterexample(graph, spec.expand(1), starts[k:k + 1]):
                self.result.counterexample = starts[k].detach()
                return True
        return False


def _stack(parents: list, parent_of: list, what: str) -> dict:
    """Per ReLU node: the parents' alpha or beta tensors repeated for their children (D, m, *shape)."""
    names = set.intersection(*[set(getattr(d, what)) for d in parents]) if parents else set()
    return {n: torch.stack([getattr(parents[k], what)[n] for k in parent_of]) for n in names}


def _pgd(graph, spec: Spec, box: Box, starts: Tensor, steps: int) -> Tensor:
    """Sign-gradient descent on the spec margin (min over groups of max over rows) from `starts`,
    projected onto the box."""
    lo, hi = box.lo, box.hi
    x = starts.detach().clone()
    step = (hi - lo) / 4
    for k in range(steps):
        x.requires_grad_(True)
        with torch.enable_grad():
            margin = spec.margin(spec.values(graph.forward(x)))
            (grad,) = torch.autograd.grad(margin.sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - step * (1 - k / steps) * grad.sign(), lo), hi)
    return x.detach()
