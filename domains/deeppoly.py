"""DeepPoly (Singh et al., POPL 2019; ERAN semantics) on the shared back-substitution engine.

Every pre-activation neuron is bounded by back-substitution to the input; the ReLU lower slope
follows the area heuristic (1 when u > -l, else 0), S-shaped activations use ERAN's lines.
"""
from __future__ import annotations

from typing import Optional

import torch

from verikit.spec import Spec, fold_spec

from .base import Domain, DomainResult, register_domain
from .guard import engine_guard
from .linear_bounds import finish, output_bounds, prepare, prescreen_setting

DEFAULT_MAX_ROWS = 4096


@register_domain
class DeepPolyDomain(Domain):
    name = "deeppoly"
    description = "DeepPoly back-substitution to the input for every layer (ERAN relaxations)"
    complete = False
    differentiable = False
    float_sound = True
    options = {"max_rows_per_chunk": DEFAULT_MAX_ROWS, "spatial_windows": True, "sound": False,
               "forward_prescreen": "auto"}

    def __init__(self, **options):
        super().__init__(**options)
        self.prescreen = prescreen_setting(self.config["forward_prescreen"])

    def bound(self, graph, inputs, spec: Optional[Spec] = None, store=None, ctx=None) -> DomainResult:
        errors = None
        if self.config["sound"]:  # float64 copies and per-node float32 error radii
            from .float_sound import sound_setup

            folded, inputs, store, errors = sound_setup(graph, inputs, spec, store, ctx)
        else:
            folded = fold_spec(graph, spec)
        with torch.no_grad():
            engine = prepare(folded, inputs, store, ctx, "deeppoly", self.config["max_rows_per_chunk"],
                             self.config["spatial_windows"], errors, forward_prescreen=self.prescreen)
            raw_lo, raw_hi = output_bounds(engine)
        lo, hi = finish(engine, raw_lo, raw_hi)
        info = {"backsub_lower": raw_lo, "rows_bounded": engine.rows_bounded}
        guard = engine_guard(engine, errors is not None, raw_lo, raw_lo, lo)
        return DomainResult(lo, hi, engine.store, info=info, guard_fn=guard)
