"""Box (interval) domain: one forward pass in centre/radius form, a rule per op type.

Affine ops map (c, r) to (f(c), |L| r): two operator applications, as cheap as it gets.
Monotone ops (activations, max-pooling) map (lo, hi) to (f(lo), f(hi)). Everything is plain
torch, so bounds are differentiable (for IBP/SABR training) and run on any device.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError
from verikit.spec import Spec, fold_spec

from .base import Domain, DomainResult, register_domain
from .guard import interval_guard


def _affine_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    center = op.forward(*(b.center for b in boxes), ctx=ctx)
    radius = op.abs_linear(*(b.radius for b in boxes), ctx=ctx)
    return Box.from_center_radius(center, radius)


def _monotone_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    (b,) = boxes
    return Box(op.forward(b.lo, ctx=ctx), op.forward(b.hi, ctx=ctx))


# the rule table: every IR op type must appear here (a test checks it)
BOX_RULES: dict[type, Callable] = {
    **{t: _affine_rule for t in ir.ALL_OP_TYPES if t.is_affine},
    **{t: _monotone_rule for t in ir.ALL_OP_TYPES if t.is_activation},
    ir.MaxPool2d: _monotone_rule,
}


def _rule_for(op: ir.Op) -> Callable:
    for t in type(op).__mro__:
        if t in BOX_RULES:
            return BOX_RULES[t]
    raise VerikitError(f"box domain has no rule for {op.op_type}")


def propagate_box(graph: ir.Graph, inputs: Box, store: Optional[BoundStore] = None, ctx=None,
                  widen: Union[None, dict, Callable] = None, after: Optional[str] = None) -> BoundStore:
    """Interval bounds for every node of `graph`; intersected with (and written into) `store`.

    `widen` (the float-sound mode) enlarges each node's interval by a radius: a dict node ->
    radius, or a function (node, input boxes, output box) -> radius or None. `after`: only the
    nodes after this one (in graph order) are recomputed, from the store's bounds of the
    others (the same result when only that node's bounds changed since the last pass)."""
    graph.check_input(inputs.lo)
    store = store if store is not None else BoundStore()
    boxes = {graph.input_name: store.update(graph.input_name, inputs) if after is None else store[graph.input_name]}
    nodes = graph.nodes
    if after is not None:
        start = next(i for i, n in enumerate(nodes) if n.name == after) + 1
        nodes = nodes[start:]
    for node in nodes:
        ins = [boxes[i] if i in boxes else store[i] for i in node.inputs]
        out = _rule_for(node.op)(node.op, ins, ctx)
        r = None if widen is None else (widen.get(node.name) if isinstance(widen, dict) else widen(node, ins, out))
        if r is not None:
            out = Box(out.lo - r, out.hi + r)
        boxes[node.name] = store.update(node.name, out)
    return store


@register_domain
class BoxDomain(Domain):
    name = "box"
    description = "interval bound propagation (IBP): fastest, loosest, differentiable"
    complete = False
    differentiable = True
    float_sound = True
    options = {"sound": False}  # float-sound mode (verikit.domains.float_sound)

    def bound(self, graph, inputs, spec: Optional[Spec] = None, store=None, ctx=None) -> DomainResult:
        errors = None
        if self.config["sound"]:  # float64 copies, widened intervals and their error radii
            from .float_sound import sound_setup

            folded, inputs, store, errors = sound_setup(graph, inputs, spec, store, ctx)
        else:
            folded = fold_spec(graph, spec)
        store = propagate_box(folded, inputs, store, ctx, widen=errors)
        out = store[folded.output]
        lo, hi = out.lo.reshape(out.lo.shape[0], -1), out.hi.reshape(out.hi.shape[0], -1)
        if errors is not None:  # float-sound: the widened intervals already contain every rounding
            return DomainResult(lo, hi, store, guard=torch.zeros_like(lo))
        return DomainResult(lo, hi, store, guard_fn=lambda: interval_guard(folded, store))
