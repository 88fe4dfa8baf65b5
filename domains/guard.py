"""The verdict guard: how far a lower bound computed in floating point may sit above the truth.

A spec row counts as proven only when its computed lower bound exceeds the rounding error of
the computation that produced it, estimated from the magnitudes it combines: every node's own
rounding error gamma_n (|W| |x| + |b|) (`verikit.rounding`, from the node's interval bounds),
carried to the spec rows
- by the bound's own coefficients for back-substitution domains (`backsub_guard`: the sum
  over nodes of <|lambda_n|, err_n>, the same term the float-sound mode subtracts), and for
  milp (whose bounds come from the same relaxation),
- by |W| for interval bounds (`interval_guard`, also used for plug-in domains),
plus the rounding of the spec's working copy against the property as written (float64).
A bound that rounding alone could have produced — e.g. from cancelling large magnitudes — is
no proof. Every built-in verdict goes through it: `DomainResult.verified`, the milp domain's
proof checks, input splitting and the VNN-LIB driver.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.rounding import U32, U64, local_error, propagate_errors


def unit_of(dtype: torch.dtype) -> float:
    return U64 if dtype == torch.float64 else U32


def _store_for(folded: ir.Graph, store: Optional[BoundStore], inputs: Optional[Box]) -> BoundStore:
    from .box import propagate_box

    if store is None or folded.input_name not in store or any(n.name not in store for n in folded.nodes):
        start = inputs if inputs is not None else store[folded.input_name]
        store = propagate_box(folded, start.detach(), None)
    return store


def interval_guard(folded: ir.Graph, store: Optional[BoundStore], inputs: Optional[Box] = None) -> Tensor:
    """(B, m) guard for interval bounds of the spec-folded graph: node errors carried by |W|."""
    with torch.no_grad():
        store = _store_for(folded, store, inputs)
        first = store[folded.input_name].lo
        errs = propagate_errors(folded, lambda name: store[name].detach(), unit_of(first.dtype), executed=False)
        out = errs[folded.output]
        if out is None:
            return torch.zeros(first.shape[0], math.prod(folded.output_shape), dtype=first.dtype, device=first.device)
        return out.reshape(out.shape[0], -1).expand(first.shape[0], -1)


def node_errors(folded: ir.Graph, store: BoundStore) -> dict:
    """node -> its own rounding error radius (B, *shape), at the unit of the store's dtype."""
    unit = unit_of(store[folded.input_name].lo.dtype)
    out = {}
    for node in folded.nodes:
        r = local_error(folded, node, [store[i].detach() for i in node.inputs], unit, executed=False)
        if r is not None:
            out[node.name] = r
    return out


def backsub_guard(engine, plain: Optional[Tensor] = None) -> Tensor:
    """(B, m) guard for the output rows of a `LinearBoundEngine`: sum over nodes of
    <|lambda_n|, err_n> for the rows' own back-substitution coefficients (plain slopes). The
    rows' plain lower bounds, when known, save one of the two passes (the difference is what
    the error hook subtracts; its own rounding is far below the relative floor of the verdict)."""
    name = engine.graph.output
    n = math.prod(engine.graph.shapes[name])
    lam = torch.eye(n, device=engine.device, dtype=engine.dtype).expand(engine.batch, n, n)
    lam = lam.reshape((engine.batch, n) + tuple(engine.graph.shapes[name]))
    saved = engine.errors
    with torch.no_grad():
        try:
            if plain is None:
                engine.errors = {}
                plain = engine.lower_bound(name, lam)
            engine.errors = node_errors(engine.graph, engine.store)
            loosened = engine.lower_bound(name, lam)
        finally:
            engine.errors = saved
    return (plain.detach() - loosened).clamp(min=0)


def engine_guard(engine, sound: bool, plain: Optional[Tensor] = None, own: Optional[Tensor] = None,
                 final: Optional[Tensor] = None):
    """The guard function a back-substitution domain hands to its `DomainResult`. `plain`: the
    plain-slope lower bounds of the output rows, if computed; `own` / `final`: the domain's own
    lower bounds and those it returns after intersecting with the store. A row whose returned
    bound came from the store (an earlier domain, typically box) faces the larger of this
    guard and the interval guard, which bounds the rounding of any bound computed from these
    intervals. In the float-sound mode the bounds already contain every rounding."""
    def guard():
        g = torch.zeros(engine.batch, math.prod(engine.graph.output_shape), dtype=engine.dtype,
                        device=engine.device) if sound else backsub_guard(engine, plain)
        if not sound and own is not None and final is not None:
            borrowed = final.detach() > own.detach()
            if bool(borrowed.any()):
                g = torch.where(borrowed, torch.maximum(g, interval_guard(engine.graph, engine.store)), g)
        return g

    return guard
