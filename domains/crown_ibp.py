"""CROWN-IBP (Zhang et al., Towards Stable and Efficient Training of Verifiably Robust Neural
Networks, ICLR 2020): interval (IBP) bounds for every intermediate node, then one CROWN
back-substitution from the (spec-folded) output to the input through the ReLU relaxations
those interval bounds give. One backward pass instead of CROWN's one per layer, and
differentiable with respect to the network's parameters, so training can use it.

`bound` returns the CROWN-IBP lower bounds intersected with the interval ones (sound, never
looser than box); `info["crown_ibp_lower"]` holds the raw CROWN-IBP bounds, the ones the
`crown-ibp` training method mixes with IBP's.
"""
from __future__ import annotations

from typing import Optional

from verikit.spec import Spec, fold_spec

from .base import Domain, DomainResult, register_domain
from .box import propagate_box
from .deeppoly import DEFAULT_MAX_ROWS
from .guard import engine_guard
from .linear_bounds import LinearBoundEngine, finish, output_bounds


@register_domain
class CrownIbpDomain(Domain):
    name = "crown-ibp"
    description = "CROWN-IBP: interval intermediate bounds, one CROWN pass on the output; differentiable"
    complete = False
    differentiable = True
    options = {"max_rows_per_chunk": DEFAULT_MAX_ROWS}

    def bound(self, graph, inputs, spec: Optional[Spec] = None, store=None, ctx=None) -> DomainResult:
        folded = fold_spec(graph, spec)
        store = propagate_box(folded, inputs, store, ctx)  # IBP: differentiable interval bounds
        # no refine_intermediate(): the intermediate bounds stay IBP's (the "IBP" in CROWN-IBP)
        # fast_paths=False: the live-neuron chains take weights outside autograd
        engine = LinearBoundEngine(folded, store, ctx, "crown", self.config["max_rows_per_chunk"], False,
                                   fast_paths=False)
        engine.differentiable = True
        raw_lo, _ = output_bounds(engine, upper=False)
        lo, hi = finish(engine, raw_lo, None)
        guard = engine_guard(engine, False, raw_lo, raw_lo, lo)
        return DomainResult(lo, hi, engine.store, info={"crown_ibp_lower": raw_lo}, guard_fn=guard)
