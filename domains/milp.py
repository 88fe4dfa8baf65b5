"""`milp` domain: complete verification by an exact mixed-integer encoding of the network.

Per sample and per spec group, the group's unsafe polytope {every row <= 0} is searched by
minimising t subject to t >= row_i (or the row itself for one-row groups):
- the solver's proven dual bound > 0 proves the group (we stop as soon as it is);
- a solution with t <= 0 is a candidate counterexample, re-evaluated concretely (graph.forward
  and onnxruntime for ONNX models) before "falsified" is reported; if the re-check fails the
  sample is "unknown";
- a time limit (per sample, over all its queries) gives "unknown", never "verified".
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError
from verikit.spec import Spec, fold_spec

from .base import FALSIFIED, UNKNOWN, VERIFIED, Domain, DomainResult, available_domains, get_domain, register_domain
from .box import propagate_box
from .guard import backsub_guard
from .linear_bounds import LinearBoundEngine
from .milp_encoding import Encoding, JacobianCache, MilpModel, check_supported, encode, pad
from .milp_solvers import HighsBackend, Solver, SolverOptions

PROOF_MARGIN = 1e-6
SPLIT_AUTO_MAX_INPUTS = 16  # a dual bound must exceed this (solver tolerances) to count as a proof


@register_domain
class MilpDomain(Domain):
    name = "milp"
    description = "exact MILP encoding solved with HiGHS or Gurobi: complete, slow"
    complete = True
    differentiable = False
    options = {
        "solver": "auto",  # auto | highs | gurobi
        "time_limit": 60.0,  # seconds per sample (all its queries together)
        "threads": 1,
        "deterministic": False,
        "tighten": "off",  # off | lp | milp: per-neuron bounds before the final queries
        "tighten_time": 10.0,  # seconds per sample for tightening
        "exact_bounds": False,  # minimise every row to optimality (exact `lower`), no early stop
        "bounds_from": "crown",  # incomplete domain run first for intermediate bounds (if registered); "none"
        "input_split": "auto",  # split the input box (branch and bound) when MILPs time out;
                                # auto: for inputs of at most SPLIT_AUTO_MAX_INPUTS elements
    }

    def __init__(self, **options):
        super().__init__(**options)
        cfg = self.config
        if cfg["tighten"] in (None, False, "none"):
            cfg["tighten"] = "off"
        if cfg["tighten"] not in ("off", "lp", "milp"):
            raise VerikitError(f"milp option tighten must be off, lp or milp, got {cfg['tighten']!r}")
        for key in ("time_limit", "tighten_time"):
            if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
                raise VerikitError(f"milp option {key} must be a non-negative number of seconds, got {cfg[key]!r}")
        if cfg["bounds_from"] not in (None, "none", "crown") and cfg["bounds_from"] not in available_domains():
            raise VerikitError(f"milp option bounds_from names no registered domain: {cfg['bounds_from']!r}")
        if cfg["input_split"] not in ("auto", True, False):
            raise VerikitError(f"milp option input_split must be auto, true or false, got {cfg['input_split']!r}")
        if not isinstance(cfg["threads"], int) or cfg["threads"] < 0:
            raise VerikitError(f"milp option threads must be a non-negative integer, got {cfg['threads']!r}")
        self.solver = Solver(cfg["solver"], SolverOptions(float(cfg["time_limit"]), cfg["threads"], bool(cfg["deterministic"])))

    def bound(self, graph, inputs: Box, spec: Optional[Spec] = None, store: Optional[BoundStore] = None,
              ctx=None) -> DomainResult:
        if spec is None:
            raise VerikitError("the milp domain needs a spec (the property to decide)")
        spec = spec.to(device=inputs.lo.device, dtype=graph.dtype)
        folded = fold_spec(graph, spec)
        check_supported(folded)
        pre = self.config["bounds_from"]
        if pre not in (None, "none") and pre in available_domains():
            with torch.no_grad():  # tighter big-M constants; the store only ever tightens
                store = get_domain(pre).bound(graph, inputs, spec, store, ctx).store
        store = propagate_box(folded, inputs, store, ctx)
        # a row is proven only above its rounding guard (verikit.domains.guard) plus the
        # solver's tolerance; the same thresholds decide bound-proven groups and MILP queries
        with torch.no_grad():
            guard = backsub_guard(LinearBoundEngine(folded, store, ctx))
        thresholds = guard.detach().double().cpu().numpy() + PROOF_MARGIN
        out = store[folded.output]
        B = inputs.lo.shape[0]
        lower = out.lo.detach().reshape(B, -1).clone()
        upper = out.hi.detach().reshape(B, -1).clone()
        jac = JacobianCache(folded, ctx)
        statuses, cexs, infos = [], [], []
        split = self.config["input_split"]
        n_in = int(np.prod(graph.input_shape))
        use_split = split is True or (split == "auto" and n_in <= SPLIT_AUTO_MAX_INPUTS)
        for b in range(B):
            deadline = time.perf_counter() + float(self.config["time_limit"])
            if use_split and not self.config["exact_bounds"]:
                from .milp_split import split_sample

                st, cex, lo_b, info = split_sample(self, graph, folded, spec, store, b, jac, ctx, deadline)
            else:
                st, cex, lo_b, info = self._sample(graph, folded, spec, store, b, jac, ctx, deadline,
                                                   thresholds[b])
            lower[b] = torch.maximum(lower[b], torch.as_tensor(lo_b, dtype=lower.dtype))
            statuses.append(st)
            cexs.append(cex)
            infos.append(info)
        solvers = sorted({s for i in infos for s in i["solvers"]})
        info = {"solver": ",".join(solvers) or "none", "samples": infos,
                "time": sum(i["time"] for i in infos)}
        return DomainResult(lower, upper, store, status=statuses, counterexamples=cexs, info=info)

    # ------------------------------------------------------------ one sample
    def _sample(self, graph, folded, spec, store, b, jac, ctx, deadline, thr):
        """Decide sample b; a row counts as proven when it exceeds thr (m,) everywhere."""
        t0 = time.perf_counter()
        tightener = self._tightener(min(deadline, t0 + float(self.config["tighten_time"])))
        enc = encode(folded, store, b, jac, tightener, ctx)
        _write_back(store, enc, b)
        out_lo, out_hi = enc.output.interval(enc.model)
        box_out = store[folded.output]
        out_lo = np.maximum(out_lo, box_out.lo[b].detach().double().cpu().numpy().reshape(-1))
        out_hi = np.minimum(out_hi, box_out.hi[b].detach().double().cpu().numpy().reshape(-1))
        lower = out_lo.copy()
        info = {"solvers": set(), "queries": 0, "binaries": enc.num_binaries,
                "variables": enc.model.num_vars(), "constraints": enc.model.num_rows()}
        spec_b = spec.select([b])
        if self.config["exact_bounds"]:
            for r in range(out_lo.size):
                res = self._query(enc, (r,), out_lo, out_hi, deadline, early=False)
                info["solvers"].add(res.solver)
                info["queries"] += 1
                if res.status == "optimal" or res.bound > -math.inf:
                    lower[r] = max(lower[r], res.bound)
                info.setdefault("argmin", {})[r] = None if res.x is None else res.x[enc.input_vars].copy()
        status, cex = VERIFIED, None
        # the groups most likely violated first: a counterexample ends the sample early
        groups = sorted(spec.group_list, key=lambda g: out_lo[list(g)].max())
        for g in groups:
            rows = list(g)
            if (lower[rows] - thr[rows]).max() > 0:
                continue  # proven by the bounds already (with the same thresholds as the solver)
            if time.perf_counter() >= deadline:
                status = UNKNOWN
                break
            # minimise max over the group's rows of (row - threshold): > 0 proves the group; the
            # solver stops early once every row is <= -PROOF_MARGIN (a candidate violation)
            res = self._query(enc, g, out_lo, out_hi, deadline, early=True, shift=thr,
                              stop_below=-thr[rows].max() - PROOF_MARGIN)
            info["solvers"].add(res.solver)
            info["queries"] += 1
            if len(g) == 1 and res.bound > -math.inf:
                lower[g[0]] = max(lower[g[0]], res.bound + thr[g[0]])
            if res.bound > 0:
                continue
            x = self._confirm(graph, spec_b, enc, res.x, store, b) if res.x is not None and res.objective <= 0 else None
            if x is None and len(g) > 1 and res.status in ("optimal", "stopped") and time.perf_counter() < deadline:
                # thresholds differ per row: the point nearest to a proof need not be the most
                # violating one, so search the unshifted rows for a counterexample
                res = self._query(enc, g, out_lo, out_hi, deadline, early=True)
                info["queries"] += 1
                if res.x is not None and res.objective <= 0:
                    x = self._confirm(graph, spec_b, enc, res.x, store, b)
            if x is not None:
                status, cex = FALSIFIED, x
                break
            status = UNKNOWN  # timed out, or a candidate that did not survive the re-check
            if res.status not in ("optimal", "stopped", "infeasible"):
                break  # out of time: the remaining groups cannot be decided either
        info["time"] = time.perf_counter() - t0
        info["status"] = status
        return status, cex, lower, info

    def _query(self, enc: Encoding, rows: tuple, out_lo, out_hi, deadline, early: bool, shift=None,
               stop_below: float = -PROOF_MARGIN):
        """min over the model of max over `rows` of (row - shift[row]) (shift: 0 by default).
        `early`: stop once the bound is > 0 (proven) or a solution <= stop_below is found."""
        model, expr = enc.model, enc.output
        remaining = max(deadline - time.perf_counter(), 1e-3)
        stops = dict(stop_above=0.0, stop_below=stop_below) if early else {}
        idx = list(rows)
        c0 = expr.c[idx] - (0.0 if shift is None else np.asarray(shift)[idx])
        if len(rows) == 1:
            (r,) = rows
            c = np.asarray(pad(expr.A[r], model.num_vars()).todense()).reshape(-1)
            return self.solver.solve(model, c, float(c0[0]), time_limit=remaining, **stops)
        m = model.copy()
        lo_t = (out_lo[idx] - (0.0 if shift is None else np.asarray(shift)[idx])).max()
        hi_t = (out_hi[idx] - (0.0 if shift is None else np.asarray(shift)[idx])).max()
        (t,) = m.add_vars([lo_t], [hi_t])
        nv = m.num_vars()
        T = sp.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), np.full(len(idx), t))), shape=(len(idx), nv))
        m.add_rows(T - pad(expr.A[idx], nv), c0, np.inf)  # t >= row_i - shift_i
        c = np.zeros(nv)
        c[t] = 1.0
        return self.solver.solve(m, c, 0.0, time_limit=remaining, **stops)

    def _confirm(self, graph, spec_b: Spec, enc: Encoding, sol, store, b):
        """The solver's input, clipped into the box, if it really violates the spec; else None."""
        box = store[graph.input_name]
        lo = box.lo[b].detach().double().cpu().numpy().reshape(-1)
        hi = box.hi[b].detach().double().cpu().numpy().reshape(-1)
        x = np.clip(sol[enc.input_vars], lo, hi)
        xt = torch.tensor(x, dtype=graph.dtype).reshape((1,) + tuple(graph.input_shape)).to(box.lo.device)
        if confirm_counterexample(graph, spec_b, xt):
            return xt[0]
        if any(isinstance(n.op, ir.Sign) for n in graph.nodes):
            # the solver's optimum sits where some Sign input is 0, and there it may pick the sign
            # of the side it needs: the violating points are next to it, in that side's region
            return _near_counterexample(graph, spec_b, xt, box.lo[b:b + 1], box.hi[b:b + 1])
        return None

    def _tightener(self, deadline: float):
        mode = self.config["tighten"]
        if mode == "off":
            return None
        backend = HighsBackend()
        opts = SolverOptions(float(self.config["tighten_time"]), self.config["threads"], bool(self.config["deterministic"]))

        def tighten(model: MilpModel, z, lo, hi, name):
            unstable = np.flatnonzero((lo < 0) & (hi > 0))
            # with no constraints yet (first layer) the interval bounds are already exact
            if unstable.size == 0 or model.num_rows() == 0 or time.perf_counter() >= deadline:
                return lo, hi
            lo, hi = lo.copy(), hi.copy()
            objs = []
            for j in unstable:
                row = np.asarray(pad(z.A[j], model.num_vars()).todense()).reshape(-1)
                objs += [(j, 1.0, row), (j, -1.0, -row)]
            bounds = backend.minimize_many(model, [o[2] for o in objs], relax=(mode == "lp"), opts=opts,
                                           deadline=deadline)
            for (j, sign, _), bd in zip(objs, bounds):
                if not np.isfinite(bd):
                    continue
                if sign > 0:
                    lo[j] = max(lo[j], bd + z.c[j])
                else:
                    hi[j] = min(hi[j], -bd + z.c[j])
            return lo, np.maximum(hi, lo)

        return tighten


def _near_counterexample(graph, spec_b: Spec, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """A re-checked violating point among small random moves of x inside [lo, hi], or None."""
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-6, 1e-4, 1e-2):
        moves = (torch.rand((64,) + tuple(x.shape[1:]), generator=gen, dtype=x.dtype) * 2 - 1).to(x.device)
        pts = torch.minimum(torch.maximum(x + scale * (hi - lo) * moves, lo), hi)
        with torch.no_grad():
            bad = spec_b.to(dtype=torch.float64).expand(len(pts)).violated_by(graph.forward(pts).double())
        for k in torch.nonzero(bad).flatten().tolist():
            if confirm_counterexample(graph, spec_b, pts[k:k + 1]):
                return pts[k]
    return None


def confirm_counterexample(graph, spec_b: Spec, x: torch.Tensor) -> bool:
    """Does input x (1, *input_shape) violate spec_b, by graph.forward and (for an ONNX model)
    by onnxruntime too?"""
    with torch.no_grad():
        y = graph.forward(x).reshape(1, -1).double()
    s64 = spec_b.to(dtype=torch.float64)  # the exact property (violated_by always uses it)
    if not bool(s64.violated_by(y)[0]):
        return False
    src = str(getattr(graph, "source", "") or "")
    if src.endswith(".onnx") and os.path.exists(src):
        from verikit.onnx_check import evaluate_with_onnxruntime, onnx_feed

        # the file's own input: with --mean/--std the graph starts with the normalisation
        y_ort = torch.from_numpy(evaluate_with_onnxruntime(src, onnx_feed(graph, x), graph)).double()
        if not bool(s64.to(device="cpu").violated_by(y_ort)[0]):
            return False
    return True


def _write_back(store: BoundStore, enc: Encoding, b: int) -> None:
    """Hand the (possibly tightened) pre-activation bounds of sample b to the bound store."""
    for name, (lo, hi) in enc.pre_bounds.items():
        old = store[name]
        new_lo, new_hi = old.lo.detach().clone(), old.hi.detach().clone()
        # widen by a hair so that rounding to the store's dtype cannot cut off reachable values
        slack = 1e-6 * (1.0 + np.abs(lo)), 1e-6 * (1.0 + np.abs(hi))
        new_lo[b] = torch.as_tensor(lo - slack[0], dtype=new_lo.dtype).reshape(new_lo.shape[1:])
        new_hi[b] = torch.as_tensor(hi + slack[1], dtype=new_hi.dtype).reshape(new_hi.shape[1:])
        store.update(name, Box(new_lo, new_hi))
