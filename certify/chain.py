"""The domain chain: attack first, then each domain in order, sharing one BoundStore.

`Chain.run(box, spec)` decides a batch of properties (one input box and one spec per sample)
and returns one `Outcome` per sample:
- the PGD attack runs first; a point it finds is re-checked concretely (verikit's own
  forward pass AND onnxruntime for ONNX models) and only then ends the sample as falsified;
- then every domain in the given order bounds the samples still undecided, reusing the bound
  store left by the previous domains (bounds only tighten); the first domain whose bounds
  prove the spec settles the sample, and its certified margin is recorded;
- complete domains (MILP) may also falsify; their counterexamples are re-checked the same way;
- whatever is left is unknown (also when the per-sample time budget runs out).
Domains that declare a `time_limit` option run one sample at a time with the budget left.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from verikit.bounds import Box, BoundStore
from verikit.errors import UnsupportedOpsError, VerikitError
from verikit.ir import Graph
from verikit.spec import Spec

from verikit.domains.base import check_domain_result

from .attack import pgd_attack

VERIFIED, FALSIFIED, UNKNOWN, MISCLASSIFIED = "verified", "falsified", "unknown", "misclassified"


@dataclass
class Outcome:
    status: str = UNKNOWN
    by: Optional[str] = None  # the stage that settled the sample: "attack" or a domain name
    margin: Optional[float] = None  # certified margin (> 0) when verified; attack margin when falsified
    counterexample: Optional[Tensor] = None  # input (sample shape) when falsified
    output: Optional[np.ndarray] = None  # model output at the counterexample (onnxruntime when available)
    times: dict = field(default_factory=dict)  # stage -> seconds spent on this sample
    note: str = ""
    # complete search domains (bab): per domain {"visited": sub-domains bounded, "depth": most splits}
    search: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return float(sum(self.times.values()))


@dataclass
class ChainConfig:
    domains: list  # domain names, cheap to exact
    domain_options: dict = field(default_factory=dict)  # name -> {option: value} (only declared options are used)
    attack: bool = True
    attack_steps: int = 20
    attack_restarts: int = 2
    timeout: Optional[float] = None  # seconds per sample
    onnx_path: Optional[str] = None  # re-check counterexamples with onnxruntime on this file
    onnx_input: Optional[Callable[[Tensor], Tensor]] = None  # chain input -> ONNX model input
    sound: bool = False  # float-sound mode: every domain must support it (Domain.float_sound)


class Chain:
    def __init__(self, graph: Graph, config: ChainConfig):
        from verikit.domains import get_domain_class, parse_domain_list

        if config.domains:  # unknown names: one error listing the available ones
            parse_domain_list(",".join(config.domains))
        self.graph = graph
        self.config = config
        self.stages = []  # (name, class, options)
        if config.sound:
            check_sound_domains(config.domains)
        for name in config.domains:
            cls = get_domain_class(name)
            given = config.domain_options.get(name, {})
            opts = {k: v for k, v in given.items() if k in cls.options and v is not None}
            if config.sound:
                opts["sound"] = True
            self.stages.append((name, cls, opts))

    # ------------------------------------------------------------------ public
    def run(self, box: Box, spec: Spec, on_outcome: Optional[Callable[[int, Outcome], None]] = None) -> list[Outcome]:
        """One Outcome per sample. `on_outcome(i, outcome)` is called once per sample as soon as
        its outcome is final (not at the end of the batch), so callers can save it at once."""
        B = box.lo.shape[0]
        dtype = self.graph.dtype
        box = box.to(device=self.graph.device, dtype=dtype)
        spec = spec.to(device=self.graph.device, dtype=dtype).expand(B)
        out = [Outcome() for _ in range(B)]
        reported: set = set()

        def report(idx, still_active=()):
            for i in idx:
                if i not in reported and i not in still_active and on_outcome is not None:
                    reported.add(i)
                    on_outcome(i, out[i])

        active = list(range(B))
        if self.config.attack and B:
            active = self._attack(box, spec, out, active)
            report(range(B), set(active))
        store = BoundStore()
        store_idx = list(range(B))  # which samples the rows of `store` belong to
        for k, (name, cls, opts) in enumerate(self.stages):
            last = k == len(self.stages) - 1
            before, active = active, self._drop_timed_out(out, active)
            report(before, set(active))
            if not active:
                break
            if "time_limit" in cls.options:
                for i in list(active):  # one sample at a time, each with its own time budget
                    if self._drop_timed_out(out, [i]):
                        # hand over the bounds the earlier domains found (tighter big-M constants)
                        sub_store = store.select(_positions(store_idx, [i])) if len(store) and i in store_idx else None
                        self._run_domain(name, cls, opts, box, spec, out, [i], sub_store)
                    if last or out[i].status != UNKNOWN:
                        self._drop_timed_out(out, [i])
                        report([i])
            else:
                sub_store = store.select(_positions(store_idx, active)) if len(store) else None
                new_store = self._run_domain(name, cls, opts, box, spec, out, active, sub_store)
                if new_store is not None:
                    store, store_idx = new_store, list(active)
            before, active = active, [i for i in active if out[i].status == UNKNOWN]
            report(before, set(active))
        self._drop_timed_out(out, active)  # over budget after the last stage: say so
        report(range(B))
        return out

    # ------------------------------------------------------------------ stages
    def _attack(self, box: Box, spec: Spec, out: list, active: list) -> list:
        t0 = time.perf_counter()
        res = pgd_attack(self.graph, box, spec, steps=self.config.attack_steps,
                         restarts=self.config.attack_restarts)
        with torch.no_grad():  # the exact property may be violated where its rounded copy is not
            exact = spec.violated_by(self.graph.forward(res.x)).cpu()
        cand = [i for i in active if bool(res.found[i]) or bool(exact[i])]
        confirmed = self.recheck(res.x[cand], box[cand], spec.select(cand)) if cand else []
        share = (time.perf_counter() - t0) / max(len(active), 1)
        for i in active:
            out[i].times["attack"] = share
        for i, (ok, y) in zip(cand, confirmed):
            if ok:
                out[i].status, out[i].by = FALSIFIED, "attack"
                out[i].margin = float(res.margin[i])
                out[i].counterexample, out[i].output = res.x[i].detach().cpu(), y
        return [i for i in active if out[i].status == UNKNOWN]

    def _run_domain(self, name, cls, opts, box: Box, spec: Spec, out: list, idx: list,
                    store: Optional[BoundStore]) -> Optional[BoundStore]:
        opts = dict(opts)
        if "time_limit" in cls.options and self.config.timeout is not None:
            left = self.config.timeout - out[idx[0]].seconds
            opts["time_limit"] = max(left, 0.01)
        t0 = time.perf_counter()
        sub_spec = spec.select(idx)
        try:
            domain = cls(**opts)  # (no torch.no_grad here: domains may use autograd internally)
            res = domain.bound(self.graph, box[idx], sub_spec, store=store)
            res = check_domain_result(cls, res, sub_spec, len(idx))  # plug-ins: shapes, unbacked "verified"
        except (KeyboardInterrupt, MemoryError):
            raise
        except UnsupportedOpsError as e:
            # a domain that cannot handle this network (milp on a Sigmoid net) is skipped: the
            # samples stay undecided for the later domains, and what earlier ones found is kept
            for i in idx:
                out[i].note = "; ".join(filter(None, [out[i].note, f"{name} skipped: {e}"]))
            return None
        except VerikitError as e:
            raise VerikitError(f"domain {name!r} failed on this model: {e}") from None
        except Exception as e:  # a domain bug or unsupported case must not end in a traceback
            raise VerikitError(f"domain {name!r} failed on this model ({type(e).__name__}: {e})") from None
        share = (time.perf_counter() - t0) / len(idx)
        res.ensure_guard(self.graph, sub_spec, box[idx], cls.complete)  # plug-ins face the same rounding guard
        verified = res.verified(sub_spec)
        margins = sub_spec.margin(res.lower.detach()).cpu() if res.lower is not None else None
        samples = res.info.get("samples") if isinstance(res.info, dict) else None
        for k, i in enumerate(idx):
            out[i].times[name] = out[i].times.get(name, 0.0) + share
            if isinstance(samples, list) and len(samples) == len(idx) and isinstance(samples[k], dict) \
                    and "visited" in samples[k]:
                out[i].search[name] = {"visited": int(samples[k]["visited"]), "depth": int(samples[k].get("depth", 0))}
            if bool(verified[k]):
                out[i].status, out[i].by = VERIFIED, name
                out[i].margin = float(margins[k]) if margins is not None else None
            elif res.status is not None and res.status[k] == FALSIFIED:
                cex = res.counterexamples[k] if res.counterexamples is not None else None
                if cex is None:
                    out[i].note = f"{name} reported a violation without a counterexample"
                    continue
                x = torch.as_tensor(cex, dtype=box.lo.dtype, device=box.lo.device).reshape((1,) + tuple(box.lo.shape[1:]))
                x = torch.minimum(torch.maximum(x, box.lo[i:i + 1]), box.hi[i:i + 1])  # solver tolerance
                ((ok, y),) = self.recheck(x, box[[i]], spec.select([i]))
                if ok:
                    out[i].status, out[i].by = FALSIFIED, name
                    out[i].counterexample, out[i].output = x[0].detach().cpu(), y
                else:
                    out[i].note = f"{name} counterexample did not re-check"
        return res.store

    def _drop_timed_out(self, out: list, idx: list) -> list:
        if self.config.timeout is None:
            return idx
        keep = []
        for i in idx:
            if out[i].seconds >= self.config.timeout:
                out[i].note = "timeout"
            else:
                keep.append(i)
        return keep

    # ------------------------------------------------------------------ re-check
    def recheck(self, x: Tensor, box: Box, spec: Spec) -> list:
        """[(confirmed, output)] per candidate: inside the box, and the property is violated
        by verikit's forward pass AND by onnxruntime on the original model file."""
        with torch.no_grad():
            inside = box.contains(x).cpu()
            y = self.graph.forward(x)
            ours = spec.violated_by(y).cpu()
        outputs = y.detach().double().reshape(y.shape[0], -1).cpu().numpy()
        theirs = torch.ones_like(ours)
        if self.config.onnx_path:
            from verikit.onnx_check import evaluate_with_onnxruntime

            feed = self.config.onnx_input(x) if self.config.onnx_input is not None else x
            outputs = evaluate_with_onnxruntime(self.config.onnx_path, feed.detach().cpu())
            spec64 = spec.to(device="cpu", dtype=torch.float64)
            theirs = spec64.violated_by(torch.from_numpy(outputs.astype(np.float64)))
        return [(bool(inside[k] and ours[k] and theirs[k]), outputs[k]) for k in range(x.shape[0])]


def check_sound_domains(names: list) -> None:
    """The float-sound mode needs every domain of the chain to support it: refuse the others."""
    from verikit.domains import available_domains

    domains = available_domains()
    lacking = [n for n in names if n in domains and not domains[n].float_sound]
    if lacking:
        able = ", ".join(n for n, c in domains.items() if c.float_sound)
        raise VerikitError(f"--sound: domain(s) {', '.join(lacking)} have no float-sound mode (domains that do: {able})")


def _positions(order: list, wanted: list) -> list:
    where = {v: k for k, v in enumerate(order)}
    return [where[v] for v in wanted]
