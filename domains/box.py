"""Box (interval) domain: one forward pass in centre/radius form, a rule per op type.

Affine ops map (c, r) to (f(c), |L| r): two operator applications, as cheap as it gets.
Monotone ops (activations, max-pooling) map (lo, hi) to (f(lo), f(hi)). Everything is plain
torch, so bounds are differentiable (for IBP/SABR training) and run on any device.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from verikit import ir
from verikit.bounds import Box, BoundStore, _CenterRadiusBox as _CENTER_RADIUS
from verikit.errors import VerikitError
from verikit.spec import Spec, fold_spec

from .base import Domain, DomainResult, register_domain
from .box_fusion import LazyBox, fused_box, fusion_groups, signed_pair
from .guard import interval_guard
from .relaxations import round_outward


def _affine_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    center = op.forward(*(b.center for b in boxes), ctx=ctx)
    radius = op.abs_linear(*(b.radius for b in boxes), ctx=ctx)
    return Box.from_center_radius(center, radius)


def _monotone_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    (b,) = boxes
    return Box(op.forward(b.lo, ctx=ctx), op.forward(b.hi, ctx=ctx))


def _relu_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    """relu(c - r), relu(c + r). Without autograd both are formed in one pass and clamped in
    place, and the lo/hi of a centre/radius input are not kept in it (two full-size tensors fewer)."""
    (b,) = boxes
    if torch.is_grad_enabled():
        return _monotone_rule(op, boxes, ctx)
    if "lo" in b.__dict__ or not isinstance(b, _CENTER_RADIUS):
        return Box(b.lo.clamp(min=0), b.hi.clamp(min=0))
    lo, hi = signed_pair(b.center, b.radius, (-1.0, 1.0)).clamp_(min=0).unbind(0)  # c - r, c + r in one pass
    return Box(lo, hi)


def _reshape_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    """A reshape keeps the box's form: a lo/hi box (a ReLU's output before a Flatten) stays
    lo/hi, so that the Linear after it takes lo + hi and hi - lo without forming c and r."""
    (b,) = boxes
    if isinstance(b, _CENTER_RADIUS) and "lo" not in b.__dict__:
        return Box.from_center_radius(op.forward(b.center), op.forward(b.radius))
    return Box(op.forward(b.lo), op.forward(b.hi))


def _exclusive_sums(e: torch.Tensor, axis: int) -> torch.Tensor:
    """sum over j != i of e_j along `axis`, by prefix and suffix sums (no cancellation)."""
    zero = torch.zeros_like(e.narrow(axis, 0, 1))
    n = e.shape[axis]
    pre = torch.cat([zero, torch.cumsum(e, axis).narrow(axis, 0, n - 1)], axis)
    suf = torch.flip(torch.cat([zero, torch.cumsum(torch.flip(e, [axis]), axis).narrow(axis, 0, n - 1)], axis), [axis])
    return pre + suf


def _softmax_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    """softmax_i is increasing in x_i and decreasing in every other x_j: its bounds are
    e^l_i / (e^l_i + sum_(j!=i) e^u_j) and e^u_i / (e^u_i + sum_(j!=i) e^l_j), computed in float64
    (shifted by max u), widened by 1e-12 relative and rounded outward to the box's dtype."""
    (b,) = boxes
    ax = op.axis
    lo, hi = b.lo.double(), b.hi.double()
    shift = hi.amax(ax, keepdim=True)
    el, eu = torch.exp(lo - shift), torch.exp(hi - shift)
    den_lo = el + _exclusive_sums(eu, ax)
    den_hi = eu + _exclusive_sums(el, ax)
    low = torch.where(den_lo > 0, el / torch.where(den_lo > 0, den_lo, torch.ones_like(den_lo)), torch.zeros_like(el))
    up = torch.where(den_hi > 0, eu / torch.where(den_hi > 0, den_hi, torch.ones_like(den_hi)), torch.ones_like(eu))
    rel = max(1e-12, (lo.shape[ax] + 4) * 2.0 ** -50)  # the float64 sums' rounding, with room
    low = (low * (1 - rel)).clamp(0.0, 1.0)
    up = torch.where(up > 0, up * (1 + rel), torch.full_like(up, 2.0 ** -1000)).clamp(0.0, 1.0)  # never 0
    return Box(*round_outward(low, up, b.lo.dtype))


def _product_rule(op: ir.Op, boxes: list[Box], ctx) -> Box:
    """x * y is bilinear: its extremes over a box are at corners, so the interval is exact."""
    a, b = boxes
    corners = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    return Box(corners.amin(0), corners.amax(0))


# the rule table: every IR op type must appear here (a test checks it)
BOX_RULES: dict[type, Callable] = {
    **{t: _affine_rule for t in ir.ALL_OP_TYPES if t.is_affine},
    **{t: _monotone_rule for t in ir.ALL_OP_TYPES if t.is_activation},
    ir.ReLU: _relu_rule,
    ir.Reshape: _reshape_rule,
    ir.MaxPool2d: _monotone_rule,
    ir.Softmax: _softmax_rule,
    ir.Mul: _product_rule,
}


def _rule_for(op: ir.Op) -> Callable:
    for t in type(op).__mro__:
        if t in BOX_RULES:
            return BOX_RULES[t]
    raise VerikitError(f"box domain has no rule for {op.op_type}")


def propagate_box(graph: ir.Graph, inputs: Box, store: Optional[BoundStore] = None, ctx=None,
                  widen: Union[None, dict, Callable] = None, after: Optional[str] = None,
                  fuse: bool = True, until: Optional[str] = None) -> BoundStore:
    """Interval bounds for every node of `graph`; intersected with (and written into) `store`.

    `widen` (the float-sound mode) enlarges each node's interval by a radius: a dict node ->
    radius, or a function (node, input boxes, output box) -> radius or None. `after`: only the
    nodes after this one (in graph order) are recomputed, from the store's bounds of the
    others (the same result when only that node's bounds changed since the last pass); `until`:
    none after this one. `fuse=False` runs every node's own rule (the reference the fused groups
    are tested against)."""
    graph.check_input(inputs.lo)
    fresh = store is None or len(store) == 0
    store = store if store is not None else BoundStore()
    boxes = {graph.input_name: store.update(graph.input_name, inputs) if after is None else store[graph.input_name]}
    nodes = graph.nodes
    if after is not None:
        start = next(i for i, n in enumerate(nodes) if n.name == after) + 1
        nodes = nodes[start:]
    if until is not None:
        nodes = nodes[:next(i for i, n in enumerate(nodes) if n.name == until) + 1]
    # fused affine groups (box_fusion.py): only on a full pass into an empty store, where no
    # stored bound of an inner node would have tightened the result, and without autograd, so
    # that training (IBP/SABR) keeps its arithmetic and reproduces bit for bit
    use = fuse and fresh and widen is None and after is None and until is None and not torch.is_grad_enabled()
    groups = fusion_groups(graph, ctx) if use else {}
    inner = {n.name for g in groups.values() for n in g.nodes[:-1]}
    for node in nodes:
        if node.name in inner:  # computed from its inputs only if something reads it
            ins = [boxes[i] for i in node.inputs]
            boxes[node.name] = store.update(node.name, LazyBox(lambda n=node, ins=ins: _rule_for(n.op)(n.op, ins, ctx)))
            continue
        if node.name in groups:
            group = groups[node.name]
            boxes[node.name] = store.update(node.name, fused_box(group, graph, boxes[group.nodes[0].inputs[0]], ctx))
            continue
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
