"""CROWN (Zhang et al., NeurIPS 2018) and alpha-CROWN (Xu et al., ICLR 2021).

Same back-substitution engine as DeepPoly, with CROWN's adaptive relaxations (tangent lines for
S-shaped activations). With `alpha_steps > 0`, the lower slopes of unstable ReLU/LeakyReLU
neurons (and the tangent points of Sigmoid/Tanh lines, `s_shaped.py`) become free parameters, one per output row and neuron, optimised by projected Adam
steps to maximise the output lower bounds (intermediate bounds stay those of plain CROWN).
The best bound of every row seen over the steps is kept, starting from plain CROWN's slopes,
so the result is never looser than CROWN.

CLI: the certify command maps `--alpha-steps N` to `get_domain("crown", alpha_steps=N)`
(see `CLI_OPTION_FLAGS`).
"""
from __future__ import annotations

from typing import Optional

import torch

from verikit.errors import VerikitError
from verikit.spec import Spec, fold_spec

from .adam import Adam
from .base import Domain, DomainResult, register_domain
from .deeppoly import DEFAULT_MAX_ROWS
from .guard import engine_guard
from .linear_bounds import LinearBoundEngine, finish, output_bounds, prepare, prescreen_setting
from .s_shaped import TangentParameters

# domain option -> command-line flag, for CLIs that expose this domain's options
CLI_OPTION_FLAGS = {"alpha_steps": "--alpha-steps", "alpha_lr": "--alpha-lr"}


def optimise_alpha(engine: LinearBoundEngine, start_lower: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Lower bounds (B, m) of the output rows after `steps` Adam steps on the free lower slopes;
    element-wise never below `start_lower` (plain CROWN)."""
    graph = engine.graph
    name = graph.output
    shape = tuple(graph.shapes[name])
    n = start_lower.shape[1]
    B = engine.batch
    best = start_lower.detach().clone()
    nodes = engine.alpha_nodes(name)
    tangents = TangentParameters(engine, name, n)  # Sigmoid/Tanh tangent points (s_shaped.py)
    if (not nodes and not tangents.nodes) or steps <= 0:
        return best
    alphas, ranges = {}, {}
    for node in nodes:
        rel = engine.relaxation(node)
        init = rel.lower_slope.detach().unsqueeze(1).expand((B, n) + tuple(rel.lower_slope.shape[1:]))
        alphas[node.name] = init.clone().requires_grad_(True)
        ranges[node.name] = rel.alpha_range
    opt = Adam(list(alphas.values()) + tangents.params, lr=lr)
    lam = torch.eye(n, device=engine.device, dtype=engine.dtype).expand(B, n, n).reshape((B, n) + shape)
    params = list(alphas.values()) + tangents.params
    for step in range(steps + 1):
        with torch.enable_grad():
            lower = engine.lower_bound(name, lam, {**alphas, **tangents.lines()})
            best = torch.maximum(best, lower.detach())
            if step == steps:
                break
            grads = torch.autograd.grad(-lower.sum(), params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        with torch.no_grad():
            for key, p in alphas.items():
                p.clamp_(*ranges[key])
        tangents.clamp_()
    return best


@register_domain
class CrownDomain(Domain):
    name = "crown"
    description = "CROWN linear bounds; alpha_steps>0 optimises ReLU slopes and Sigmoid/Tanh tangents (alpha-CROWN)"
    complete = False
    differentiable = False
    float_sound = True
    options = {"alpha_steps": 0, "alpha_lr": 0.1, "max_rows_per_chunk": DEFAULT_MAX_ROWS, "spatial_windows": True,
               "sound": False, "forward_prescreen": "auto"}

    def __init__(self, **options):
        super().__init__(**options)
        steps, lr = self.config["alpha_steps"], self.config["alpha_lr"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise VerikitError(f"alpha_steps must be a non-negative integer, got {steps!r}")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise VerikitError(f"alpha_lr must be a positive number, got {lr!r}")
        self.prescreen = prescreen_setting(self.config["forward_prescreen"])

    def bound(self, graph, inputs, spec: Optional[Spec] = None, store=None, ctx=None) -> DomainResult:
        errors = None
        if self.config["sound"]:  # float64 copies and per-node float32 error radii
            from .float_sound import sound_setup

            folded, inputs, store, errors = sound_setup(graph, inputs, spec, store, ctx)
        else:
            folded = fold_spec(graph, spec)
        with torch.no_grad():
            engine = prepare(folded, inputs, store, ctx, "crown", self.config["max_rows_per_chunk"],
                             self.config["spatial_windows"], errors, forward_prescreen=self.prescreen)
            raw_lo, raw_hi = output_bounds(engine)
        info = {"crown_lower": raw_lo, "rows_bounded": engine.rows_bounded}
        if self.config["alpha_steps"] > 0:
            raw_lo = optimise_alpha(engine, raw_lo, self.config["alpha_steps"], float(self.config["alpha_lr"]))
        info["backsub_lower"] = raw_lo
        lo, hi = finish(engine, raw_lo, raw_hi)
        guard = engine_guard(engine, errors is not None, info["crown_lower"], raw_lo, lo)
        return DomainResult(lo, hi, engine.store, info=info, guard_fn=guard)
