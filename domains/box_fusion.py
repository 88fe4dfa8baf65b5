"""Fused affine groups for the Box pass: fewer full-size temporaries, the same intervals.

Interval arithmetic maps an affine op to (f(c), |L| r), so a chain of affine ops costs one
pass over the data per op for the centre and one for the radius. Two chains are common and
worth fusing into the Linear/Conv they surround, because the element-wise ops between them
cost as much as the matrix products on CPU (each allocates a full-size tensor):

- input normalisation: ElementwiseAffine ops (x * s + t) and Reshapes before a Linear or Conv
  go into its weights and bias: W diag(s) and W t + b (a bias map for a padded Conv);
- BatchNorm (or a per-channel ElementwiseAffine) after a Linear or Conv: the per-channel
  scale and shift go into the rows and bias of W.

|W diag(s)| = |W| diag(|s|), so the fused group computes the same interval as the nodes one
after the other, up to float rounding. Every other Linear or Conv is a group of its own, for
one more saving: a box given by lo and hi (the input, a ReLU's output) enters as lo + hi and
hi - lo with halved weights, (W / 2)(lo + hi) = W c and (|W| / 2)(hi - lo) = |W| r, which skips
the two halvings of forming c and r (halving is exact in floating point: the same products
and sums, bit for bit, barring subnormal weights). (MLP box pass at batch 1024: 2 of its ~16
element-wise passes over a layer.) Both are formed in one pass (`signed_pair`), and a Linear
takes them stacked through one bmm with its two weights stacked in memory order.

The folded spec (C W, C b - d, the graph's output) is a group too when the batch has one spec
matrix or a few distinct ones (robustness: one per label): C W is formed once per matrix and
cached, each distinct row of |C W| once (|W_y - W_j| = |W_j - W_y|), and each sample picks its
own rows; the op's own rule forms C W per sample. The nodes inside a group still get boxes in the store,
computed from their inputs only if something reads them (`LazyBox`), so later domains and the
rounding guard see every node. The pass fuses only without autograd (certification, attacks'
bounds), so training keeps its exact arithmetic; the fused weights are then cached between
calls while the tensors they come from are unchanged (their version counters say so).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir
from verikit.bounds import Box
from verikit.spec import FoldedSpecLinear, distinct_matrices


HALVED_WEIGHTS = True  # lo/hi boxes enter as lo + hi, hi - lo (off: only to compare)


@dataclass
class Group:
    """Nodes fused into one affine map: `pre` element-wise affines/reshapes, the `core`
    Linear or Conv, and `post` per-channel affines (BatchNorm)."""

    pre: list
    core: ir.Node
    post: list

    @property
    def nodes(self) -> list:
        return self.pre + [self.core] + self.post


_SIGNS: dict = {}  # (signs, dtype, device, dims) -> the (2, 1, ..., 1) tensor of the two signs


def signed_pair(a: Tensor, b: Tensor, signs: tuple) -> Tensor:
    """(2, *shape): a + signs[0] * b and a + signs[1] * b in one element-wise pass (one
    allocation and one kernel instead of two). With signs of +-1 the products are exact, so
    each half is bit for bit a + b or a - b."""
    key = (signs, a.dtype, a.device, a.dim())
    s = _SIGNS.get(key)
    if s is None:
        s = _SIGNS[key] = torch.tensor(signs, dtype=a.dtype, device=a.device).reshape((2,) + (1,) * a.dim())
    return torch.addcmul(a, s, b)


def _sum_and_width(box: Box) -> Tensor:
    """(lo + hi, hi - lo) of a lo/hi box as one (2, ...) tensor: 2c and 2r, for halved weights."""
    return signed_pair(box.hi, box.lo, (1.0, -1.0))


def _core_ok(node: ir.Node, graph: ir.Graph) -> bool:
    op = node.op
    if type(op) is ir.Linear:  # not other subclasses (per-sample weights)
        return op.weight.dim() == 2 and len(graph.shapes[node.inputs[0]]) == 1
    if type(op) is FoldedSpecLinear:
        return _spec_ok(op) and len(graph.shapes[node.inputs[0]]) == 1
    return type(op) is ir.Conv2d and len(graph.shapes[node.inputs[0]]) == 3


def _spec_ok(op: FoldedSpecLinear) -> bool:
    """The spec's rows are one matrix for the batch, or a few distinct ones (robustness: one per
    label), so that C W is formed once per matrix rather than per sample."""
    return op.inner_weight.dim() == 2 and (op.C.dim() == 2 or distinct_matrices(op.C) is not None)


def _fits(t: Optional[Tensor], shape: tuple) -> bool:
    """t broadcasts to the batched shape (1, *shape) without enlarging it."""
    if t is None:
        return True
    target = (1,) + tuple(shape)  # compared by hand: torch.broadcast_shapes costs ~60 us a call
    return t.dim() <= len(target) and all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(target)))


def _per_channel(t: Optional[Tensor], shape: tuple) -> bool:
    """t is constant over every axis but the channel axis (dim 1 of the batched tensor)."""
    if t is None:
        return True
    return t.numel() == 1 or (len(shape) >= 1 and t.dim() == len(shape) + 1 and all(
        s == 1 for i, s in enumerate(t.shape) if i != 1))


def fusion_groups(graph: ir.Graph, ctx) -> dict[str, Group]:
    """Groups keyed by their last node. A node joins a group only when the group's next node
    is its sole consumer and it is not the graph's output. Without batch statistics (which
    decide which BatchNorms may join) the groups are kept on the graph for its next pass."""
    if ctx is not None and ctx.bn_mode == "batch":
        return _fusion_groups(graph, ctx)
    cached = graph.__dict__.get("_fusion_groups")
    last = graph.nodes[-1] if graph.nodes else None
    key = (len(graph.nodes), graph.output)
    if cached is None or cached[0] != key or cached[1] is not last or cached[2] is not graph.nodes:
        cached = graph.__dict__["_fusion_groups"] = (key, last, graph.nodes, _fusion_groups(graph, None))
    return cached[3]


def _fusion_groups(graph: ir.Graph, ctx) -> dict[str, Group]:
    users = graph.consumers()
    by_name = {n.name: n for n in graph.nodes}
    sole = lambda name: (len(users.get(name, [])) == 1 and name != graph.output)
    groups: dict[str, Group] = {}
    taken: set = set()
    for node in graph.nodes:
        if node.name in taken or not _core_ok(node, graph):
            continue
        pre, src = [], node.inputs[0]
        spec = type(node.op) is FoldedSpecLinear  # the graph's output: a group of its own
        allow_scale = type(node.op) is ir.Linear or spec or node.op.groups == 1
        while not spec and src in by_name and src not in taken and sole(src):
            p = by_name[src]
            shape = graph.shapes[p.inputs[0]]
            if isinstance(p.op, ir.Reshape) and type(node.op) is ir.Linear:
                pass
            elif type(p.op) is ir.ElementwiseAffine and _fits(p.op.scale, shape) and _fits(p.op.shift, shape) and (
                    type(node.op) is ir.Linear or (_per_channel(p.op.scale, shape) and allow_scale)):
                pass
            else:
                break
            pre.insert(0, p)
            src = p.inputs[0]
        while pre and isinstance(pre[0].op, ir.Reshape):  # a leading reshape fuses nothing
            pre.pop(0)
        post, last = [], node
        while sole(last.name):
            nxt = by_name[users[last.name][0]]
            shape = graph.shapes[last.name]
            if isinstance(nxt.op, ir.BatchNorm) and (
                    ctx is None or ctx.bn_mode != "batch" or nxt.op.key in ctx.bn_stats):
                pass
            elif type(nxt.op) is ir.ElementwiseAffine and all(
                    _fits(t, shape) and _per_channel(t, shape) for t in (nxt.op.scale, nxt.op.shift)):
                pass
            else:
                break
            post.append(nxt)
            last = nxt
        group = Group(pre, node, post)  # a lone Linear/Conv too: it takes lo/hi boxes as they are
        groups[last.name] = group
        taken.update(n.name for n in group.nodes)
    return groups


def _channel_vector(t: Optional[Tensor], shape: tuple, default: float, like: Tensor) -> Tensor:
    """A per-channel constant as a (C,) vector (C = shape[0]) of `like`'s dtype and device."""
    if t is None:
        return torch.full((shape[0],), default, dtype=like.dtype, device=like.device)
    return torch.broadcast_to(t, (1,) + shape).reshape(1, shape[0], -1)[0, :, 0].to(like.dtype)


def _fused_weights(group: Group, graph: ir.Graph, ctx):
    """(weight, bias, |weight|) of the group's affine map; bias is (out,) for a Linear and
    (out,) or a map (1, out, h, w) for a Conv."""
    core = group.core.op
    W, b = core.weight, core.bias
    conv = type(core) is ir.Conv2d
    if group.pre:
        first_in = graph.shapes[group.pre[0].inputs[0]]
        s = torch.ones((1,) + first_in, dtype=W.dtype, device=W.device)
        t = torch.zeros_like(s)
        for p in group.pre:  # compose x -> x * s + t through the chain
            if isinstance(p.op, ir.Reshape):
                s, t = p.op.forward(s), p.op.forward(t)
                continue
            if p.op.scale is not None:
                s, t = s * p.op.scale, t * p.op.scale
            if p.op.shift is not None:
                t = t + p.op.shift
        if conv:
            shape = tuple(s.shape[1:])
            sc = _channel_vector(s, shape, 1.0, W)
            bias_map = F.conv2d(t, W, b, core.stride, core.padding, core.dilation, core.groups)
            W = W * sc.reshape(1, -1, 1, 1)
            b = bias_map if bool((t != 0).any()) else b
        else:
            sf, tf = s.reshape(-1), t.reshape(-1)
            b = W @ tf + (b if b is not None else 0)
            W = W * sf
    for p in group.post:
        shape = graph.shapes[p.inputs[0]]
        if isinstance(p.op, ir.BatchNorm):
            probe = torch.zeros((1,) + shape, dtype=W.dtype, device=W.device)
            scale, shift = p.op.scale_shift(probe, ctx, record=False)
            sc, sh = scale.reshape(-1), shift.reshape(-1)
        else:
            sc = _channel_vector(p.op.scale, shape, 1.0, W)
            sh = _channel_vector(p.op.shift, shape, 0.0, W)
        W = W * sc.reshape((-1,) + (1,) * (W.dim() - 1))
        if b is None:
            b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        per_channel = (1, -1, 1, 1) if b.dim() == 4 else (-1,)  # a conv's bias map, or a bias vector
        b = b * sc.reshape(per_channel) + sh.reshape(per_channel)
    return W, b, W.abs()


def _sources(group: Group, ctx) -> list:
    ts = []
    for n in group.nodes:
        op = n.op
        for name in ("weight", "bias", "scale", "shift", "running_mean", "running_var"):
            t = getattr(op, name, None)
            if isinstance(t, Tensor):
                ts.append(t)
        if isinstance(op, ir.BatchNorm) and ctx is not None and ctx.bn_mode == "batch":
            ts.extend(ctx.bn_stats[op.key])
    return ts


def _weights(group: Group, graph: ir.Graph, ctx, halved: bool):
    """(weight, bias, |weight|) of the group, the two weights halved where `halved`."""
    batch_stats = ctx is not None and ctx.bn_mode == "batch"
    sources = group.__dict__.get("_sources") if not batch_stats else None
    if sources is None:
        sources = _sources(group, ctx)
        if not batch_stats:  # which tensors a group reads is fixed (its parameters)
            group.__dict__["_sources"] = sources
    key = tuple((t.data_ptr(), t._version, t.shape, t.dtype, t.device) for t in sources)
    cache = group.core.op.__dict__.setdefault("_box_fusion_cache", {})
    entry = (tuple(n.name for n in group.nodes), halved)
    if cache.get(entry, (None,))[0] != key:
        for k in [k for k, v in cache.items() if v[0] != key]:  # only weights of the current parameters
            del cache[k]
        W, b, Wabs = _fused_weights(group, graph, ctx)
        if halved:
            W, Wabs = W * 0.5, Wabs * 0.5
        cache[entry] = (key, _stacked(W, b, Wabs) if W.dim() == 2 else (W, b, Wabs, None))
    return cache[entry][1]


def _stacked(W: Tensor, b: Optional[Tensor], Wabs: Tensor) -> tuple:
    """A Linear's two maps as one batched product: (W^T, |W|^T) as a contiguous (2, in, out)
    tensor and the bias (b, 0) as (2, 1, out) (None without a bias). One bmm of the stacked
    centre and radius is ~10-15% faster than two F.linear calls at batch 128 on CPU (transposed
    weights in memory order, one dispatch) and the same at batch 1024. W and |W| are returned
    as views of it, so the weights are held once."""
    stacked = torch.stack((W.t(), Wabs.t())).contiguous()
    bias = None if b is None else torch.stack((b, torch.zeros_like(b))).unsqueeze(1)
    return stacked[0].t(), b, stacked[1].t(), (stacked, bias)


class SpecRows(NamedTuple):
    """What the folded spec's box needs (see _spec_rows)."""

    weight: Tensor  # the inner W (halved where the box enters halved)
    bias: Optional[Tensor]  # the inner b
    stacked: Tensor  # the distinct spec matrices stacked, (k*m, o)
    shift: Optional[Tensor]  # -d where one threshold vector serves the batch
    abs_rows: Tensor  # the distinct rows of |C W| (halved too)
    center_index: Optional[Tensor]  # (B, m): each sample's rows of the k*m (None: the identity)
    radius_index: Optional[Tensor]  # (B or 1, m): each margin's row of abs_rows (None: the identity)
    per_sample_d: Optional[Tensor]  # (B, m) to subtract (None: 0 or in `shift`)


def _spec_rows(op: FoldedSpecLinear, halved: bool) -> Optional[SpecRows]:
    """The folded spec's rows, cached on the op while C, W, b and d are unchanged (fold_spec
    keeps the folded graph, and with it the op, for the same spec); None where C has too many
    distinct matrices (changed since the groups were formed).

    The centre is C (W c + b) - d as the op computes it, but with each distinct matrix once
    (a (k*m, o) product instead of a per-sample one); the radius needs |C W| r, formed once
    per distinct row: robustness specs have rows W_y - W_j and W_j - W_y, whose absolute values
    agree bit for bit (negation is exact), so half of them go."""
    sources = tuple(t for t in (op.C, op.inner_weight, op.inner_bias, op.d) if t is not None)
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cache = op.__dict__.setdefault("_box_spec_rows", {})
    entry = cache.get(halved)
    if entry is None or entry[0] != key:
        C, W, d = op.C, op.inner_weight, op.d
        index = torch.zeros(1, dtype=torch.long, device=C.device)
        if C.dim() == 3:
            groups = distinct_matrices(C)
            if groups is None:
                return None
            C, index = groups
        m = C.shape[-2]
        stacked = C.reshape(-1, C.shape[-1])  # (k*m, o)
        abs_rows, abs_index = torch.unique((stacked @ W).abs(), dim=0, return_inverse=True)
        margin_rows = index.view(-1, 1) * m + torch.arange(m, device=C.device)  # (B or 1, m)
        radius_index = abs_index[margin_rows]
        if C.dim() == 2 and torch.equal(abs_index, torch.arange(m, device=C.device)):
            radius_index = None
        w = 0.5 if halved else 1.0
        rows = SpecRows(W * w, op.inner_bias, stacked, -d if d.dim() == 1 else None, abs_rows * w,
                        None if C.dim() == 2 else margin_rows, radius_index,
                        None if d.dim() == 1 or not bool((d != 0).any()) else d)
        entry = cache[halved] = (key, rows)
    return entry[1]


def _spec_box(core: FoldedSpecLinear, box: Box, halved: bool) -> Box:
    rows = _spec_rows(core, halved)
    if rows is None or (rows.center_index is not None and rows.center_index.shape[0] != box.shape[0]):
        return Box.from_center_radius(core.forward(box.center), core.abs_linear(box.radius))  # the op's own rule
    c, r = _sum_and_width(box).unbind(0) if halved else (box.center, box.radius)
    B = c.shape[0]
    if c.dim() != 2:
        c, r = c.reshape(B, -1), r.reshape(B, -1)
    center = F.linear(F.linear(c, rows.weight, rows.bias), rows.stacked, rows.shift)
    radius = F.linear(r, rows.abs_rows)
    if rows.center_index is not None:  # each sample's own matrix's rows
        center = center.gather(1, rows.center_index)
    if rows.radius_index is not None:
        radius = radius.gather(1, rows.radius_index.expand(B, -1))
    if rows.per_sample_d is not None:
        center = center - rows.per_sample_d
    return Box.from_center_radius(center, radius)


def fused_box(group: Group, graph: ir.Graph, box: Box, ctx) -> Box:
    """The interval of the group's last node from the box of its first input."""
    core = group.core.op
    # a lo/hi box whose centre nobody formed yet: lo + hi and hi - lo with halved weights
    halved = HALVED_WEIGHTS and type(box) is Box and "_center" not in box.__dict__ and "_radius" not in box.__dict__
    if type(core) is FoldedSpecLinear:
        return _spec_box(core, box, halved)
    W, b, Wabs, stacked = _weights(group, graph, ctx, halved)
    if stacked is not None:  # a Linear: centre and radius through one bmm
        pair = _sum_and_width(box) if halved else torch.stack((box.center, box.radius))
        if pair.dim() != 3:
            pair = pair.reshape(2, pair.shape[1], -1)
        Wt, bias = stacked
        out = torch.bmm(pair, Wt) if bias is None else torch.baddbmm(bias, pair, Wt)
        return Box.from_center_radius(*out.unbind(0))
    c, r = _sum_and_width(box).unbind(0) if halved else (box.center, box.radius)
    args = (core.stride, core.padding, core.dilation, core.groups)  # a Conv2d
    center = F.conv2d(c, W, b if b is None or b.dim() == 1 else None, *args)
    if b is not None and b.dim() == 4:
        center = center.add_(b)
    radius = F.conv2d(r, Wabs, None, *args)
    return Box.from_center_radius(center, radius)


class LazyBox(Box):
    """A node's box computed from its inputs' boxes on first access (a node inside a fused
    group, which the pass itself never needs)."""

    def __init__(self, compute: Callable[[], Box]):
        self._compute = compute

    def _box(self) -> Box:
        box = self.__dict__.get("_value")
        if box is None:
            box = self.__dict__["_value"] = self._compute()
        return box

    def __getattr__(self, name):  # lo, hi (the dataclass fields) live in the computed box
        if name in ("lo", "hi"):
            return getattr(self._box(), name)
        raise AttributeError(name)

    @property
    def center(self) -> Tensor:
        return self._box().center

    @property
    def radius(self) -> Tensor:
        return self._box().radius

    @property
    def shape(self):
        return self._box().shape
