"""Forward-mode linear bounds: a cheap pre-screen of intermediate neurons before back-substitution.

Back-substitution bounds one neuron per row, so a layer with n unstable neurons costs n
backward passes through everything below it. On convolutional nets at batch 1 that is the
whole cost (CNN7: ~64,000 rows, most of which turn out stable). Forward mode carries, from the
input forward, a lower and an upper linear function of the K input coordinates for every
neuron: one pass of K "coefficient images" through the network bounds every neuron of every
layer at once, a little looser than back-substitution (relaxation errors add up instead of
cancelling). The engine uses it to settle the neurons it proves stable; only the rest are
back-substituted, and every bound is intersected with the store, so no bound gets looser.

Representation, with the input x = c + r * e, e in [-1, 1]^K: for each node, a mid function
M(e) = <mc, e> + m0 and a half gap D(e) = <dc, e> + d0 (dc and d0 may be None: zero), the
lower function M - D and the upper M + D. An affine map A (linear part) with bias b maps
(M, D) to (A M + b, |A| D), since A+ U + A- L = A M + |A| D. An activation with lines
y >= a_l x + b_l, y <= a_u x + b_u (slopes >= 0, from the engine's own relaxations) maps the
lower function L to a_l L + b_l and the upper U to a_u U + b_u. Bounds of a node: the minimum
of M - D over the cube, (m0 - d0) - sum |mc - dc|, and the maximum of M + D.

Like the rest of the default engine the arithmetic is plain float (no outward rounding); the
verdict guard (guard.py) and the float-sound mode cover rounding, and the float-sound mode
does not use this pre-screen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir
from verikit.bounds import Box

from . import forward_windows as fw

# ops whose forward is already linear (no bias): their linear part is the op itself
_LINEAR_AS_IS = (ir.AvgPool2d, ir.GlobalAvgPool, ir.Reshape, ir.Transpose, ir.Concat, ir.Add)
# the pre-screen's coefficient tensors (B, K, *shape) of the largest node may use this many bytes
MEMORY_BUDGET = 512 * 2 ** 20
# hand-over: the rows of a node are back-substituted through this many activation layers,
# then the forward functions of the pre-activation node there take over (measured on CNN7:
# 2 leaves 573 of its 5th conv's 4148 rows unstable, 1 leaves all 506 of its Linear's, 3
# costs more)
STOP_BACK = 2
# ... and only to a node with at least this many pre-activation nodes below it (CNN7: the
# hand-over at its 2nd and 3rd conv layer costs as much as back-substituting to the input)
MIN_BELOW_STOP = 2
# the pre-screen runs when the interval bounds leave more unstable rows than this many times
# the input size (its cost is about that of back-substituting one row per input coordinate)
ROWS_PER_INPUT = 8


@dataclass
class _Linear:
    """Bounding functions of one node: M = <mc, e> + m0, D = <dc, e> + d0 (None: zero)."""

    mc: Tensor  # (B, K, *shape)
    m0: Tensor  # (B, *shape)
    dc: Optional[Tensor] = None
    d0: Optional[Tensor] = None


def _linear_part(op: ir.Op, xs: list, ctx) -> Optional[Tensor]:
    """The op's linear part (no bias) applied to coefficient tensors (N, *shape); None when
    the op is not one this pre-screen knows."""
    if isinstance(op, ir.Linear):
        return None if op.weight.dim() != 2 else F.linear(xs[0], op.weight)
    if isinstance(op, ir.Conv2d):
        return op._conv(xs[0], op.weight, None)
    if isinstance(op, ir.ElementwiseAffine):
        y = xs[0] if op.scale is None else xs[0] * op.scale
        if op.shift is not None and torch.broadcast_shapes(y.shape, op.shift.shape) != y.shape:
            y = y + torch.zeros_like(op.shift)
        return y
    if isinstance(op, ir.BatchNorm):
        scale, _ = op.scale_shift(xs[0], ctx, record=False)
        return xs[0] * scale
    if isinstance(op, ir.Pad):
        return F.pad(xs[0], op.pads, value=0.0)
    if isinstance(op, _LINEAR_AS_IS):
        return op.forward(*xs)
    return None


def supported(graph: ir.Graph, until: str) -> bool:
    """Can the pre-screen run through every node up to `until`?"""
    for node in graph.nodes:
        op = node.op
        if op.is_affine:
            if isinstance(op, ir.Linear) and op.weight.dim() != 2:
                return False
            if not isinstance(op, (ir.Linear, ir.Conv2d, ir.ElementwiseAffine, ir.BatchNorm, ir.Pad) + _LINEAR_AS_IS):
                return False
        elif not (op.is_activation and isinstance(op, (ir.ReLU, ir.LeakyReLU, ir.Sigmoid, ir.Tanh, ir.Exp))):
            return False
        if node.name == until:
            return True
    return True


class ForwardBounds:
    """Forward-mode bounds of the engine's graph, advanced node by node on request. Activations
    use the engine's relaxations, so they must be asked for in topological order, each after
    the bounds of its input are final (as `refine_intermediate` does)."""

    def __init__(self, engine, nodes: list):
        self.engine = engine
        self.nodes = list(nodes)  # the pre-activation nodes, in order
        graph = engine.graph
        box = engine.store[graph.input_name]
        B = box.lo.shape[0]
        shape = tuple(box.lo.shape[1:])
        self.K = K = math.prod(shape)
        tiled = fw.initial(box.center, box.radius) if any(isinstance(n.op, ir.Conv2d) for n in graph.nodes) else None
        self.used_windows = tiled is not None
        if tiled is not None:  # conv nets: coefficients in windows (forward_windows.py)
            self.states = {graph.input_name: tiled}
        else:
            mc = torch.diag_embed(box.radius.reshape(B, K)).reshape((B, K) + shape)  # x = c + r e
            self.states = {graph.input_name: _Linear(mc, box.center)}
        self.next = 0  # index of the first graph node not yet advanced through
        self.keep: set = set()  # pre-activation nodes kept for `contract` by later nodes
        self.uses = {}  # node -> how many inputs of nodes not yet advanced through it still is
        for node in graph.nodes:
            for src in node.inputs:
                self.uses[src] = self.uses.get(src, 0) + 1

    @staticmethod
    def samples_per_pass(engine, nodes: list, force: bool = False) -> int:
        """How many samples one pre-screen pass may carry within the memory budget, or 0 where
        it cannot run (unsupported ops, the float-sound mode, under autograd) or would not pay
        (`force`: whenever it can). It pays when the interval bounds leave more unstable rows
        to back-substitute than ROWS_PER_INPUT times the input size (measured: CNN7 at batch
        1, 80 times, 3-5x faster; MLPs and small CNNs, about 1 time, up to 3x slower with it)."""
        graph = engine.graph
        if not nodes or engine.errors or engine.differentiable or torch.is_grad_enabled():
            return 0
        if not supported(graph, nodes[-1]):
            return 0
        K = math.prod(graph.shapes[graph.input_name])
        last = engine.position[nodes[-1]]
        widest = max(math.prod(graph.shapes[n.name]) for n in graph.nodes[: last + 1])
        per_sample = K * widest * engine.store[graph.input_name].lo.element_size()  # dense coefficients
        if not force:
            unstable = 0
            for name in nodes:
                b = engine.store[name]
                unstable += int(((b.lo < 0) & (b.hi > 0)).any(0).sum())
            if unstable <= ROWS_PER_INPUT * K:
                return 0
        return int(min(engine.batch, MEMORY_BUDGET // per_sample))

    def bounds(self, name: str) -> Box:
        """Forward-mode bounds of node `name` (a pre-activation node; advancing through every
        node before it)."""
        position = self.engine.position
        self.keep.add(name)
        i = self.nodes.index(name)
        for old in self.nodes[: max(0, i - STOP_BACK)]:  # no later node hands over to these
            self.keep.discard(old)
            if self.uses.get(old, 0) == 0:
                self.states.pop(old, None)
        stop = position[name] + 1
        for node in self.engine.graph.nodes[self.next: stop]:
            self.states[node.name] = self._step(node)
            for src in node.inputs:  # free what no later node reads
                self.uses[src] -= 1
                if self.uses[src] == 0 and src not in self.keep:
                    self.states.pop(src, None)
        self.next = max(self.next, stop)
        s = self.states[name]
        if isinstance(s, fw.Tiled):
            return Box(*fw.bounds(s))
        lo_c = s.mc if s.dc is None else s.mc - s.dc
        hi_c = s.mc if s.dc is None else s.mc + s.dc
        lo = s.m0 - lo_c.abs().sum(1) - (0 if s.d0 is None else s.d0)
        hi = s.m0 + hi_c.abs().sum(1) + (0 if s.d0 is None else s.d0)
        return Box(lo, hi)

    def stop_for(self, name: str) -> Optional[str]:
        """The pre-activation node STOP_BACK activation layers below `name` where its rows'
        back-substitution may hand over to the forward functions (None: not deep enough)."""
        i = self.nodes.index(name) - STOP_BACK
        if i < MIN_BELOW_STOP:  # the back-substitution below would be about as cheap
            return None
        return self.nodes[i] if self.nodes[i] in self.states else None

    def _step(self, node: ir.Node) -> _Linear:
        ins = [self.states[i] for i in node.inputs]
        if node.op.is_affine:
            return self._affine(node, ins)
        return self._activation(node, ins[0])

    def _dense(self, s) -> _Linear:
        if isinstance(s, fw.Tiled):
            return _Linear(fw.densify(s, s.mc, self.K), s.m0, fw.densify(s, s.dc, self.K), s.d0)
        return s

    def _affine(self, node: ir.Node, ins: list):
        op, ctx = node.op, self.engine.ctx
        m0 = op.forward(*[s.m0 for s in ins], ctx=ctx)
        gap = any(s.dc is not None or s.d0 is not None for s in ins)
        d0 = op.abs_linear(*[s.d0 if s.d0 is not None else torch.zeros_like(s.m0) for s in ins], ctx=ctx) if gap else None
        if any(isinstance(s, fw.Tiled) for s in ins):
            out = None
            if isinstance(op, ir.Conv2d):
                out = fw.conv(op, ins[0], tuple(self.engine.graph.shapes[node.name]), m0, d0)
            elif isinstance(op, (ir.BatchNorm, ir.ElementwiseAffine)):
                out = fw.channel_affine(op, ins[0], m0, d0, ctx)
            elif isinstance(op, ir.Add) and fw.same_geometry(ins):
                out = fw.add(ins, m0, d0)
            if out is not None:
                return out
            ins = [self._dense(s) for s in ins]
        B, K = ins[0].mc.shape[:2]
        out_shape = (B, K) + tuple(self.engine.graph.shapes[node.name])
        mc = _linear_part(op, [s.mc.flatten(0, 1) for s in ins], ctx).reshape(out_shape)
        if not gap:
            return _Linear(mc, m0)
        dcs = [s.dc.flatten(0, 1) if s.dc is not None else torch.zeros_like(s.mc.flatten(0, 1)) for s in ins]
        return _Linear(mc, m0, op.abs_linear(*dcs, ctx=ctx).reshape(out_shape), d0)

    def _activation(self, node: ir.Node, s):
        rel = self.engine.relaxation(node)
        a_l, a_u = rel.lower_slope, rel.upper_slope
        # the activations `supported` admits are monotone: their lines' slopes are >= 0, so the
        # lower line applies to the lower function and the upper line to the upper one
        d0 = s.d0 if s.d0 is not None else torch.zeros_like(s.m0)
        lo0 = a_l * (s.m0 - d0) + rel.lower_bias
        hi0 = a_u * (s.m0 + d0) + rel.upper_bias
        m0, d0 = (hi0 + lo0) / 2, (hi0 - lo0) / 2
        if isinstance(s, fw.Tiled):
            return fw.activation(s, a_l, a_u, m0, d0)
        al, au = a_l.unsqueeze(1), a_u.unsqueeze(1)
        if s.dc is None:
            mc, dc = s.mc * ((al + au) / 2), s.mc * ((au - al) / 2)
        else:
            lo_c, hi_c = al * (s.mc - s.dc), au * (s.mc + s.dc)
            mc, dc = (hi_c + lo_c) / 2, (hi_c - lo_c) / 2
        return _Linear(mc, m0, dc, d0)

    def contract(self, name: str, lam) -> tuple[Tensor, Tensor]:
        """min over the lower/upper functions of node `name` of <lam, x>, as a linear function of
        e: (const (B, m), coefficients (B, m, K)); lam is (B, m, *shape) or a Window. The
        minimum of <lam, x> over L <= x <= U is <lam, M> - <|lam|, D>."""
        s = self.states[name]
        if isinstance(s, fw.Tiled):
            if hasattr(lam, "region"):  # a window of the map: the tiles it overlaps only
                return fw.contract(s, lam.lam, lam.top, lam.left, self.K)
            # the whole map, through the same position table: a position's products cover the
            # input coordinates that reach it only (CNN7's Linear rows at its 4th conv: a
            # quarter of the dense product's; x1.02-1.04 over densifying the windows)
            return fw.contract(s, lam, 0, 0, self.K)
        mc, dc, m0, d0 = s.mc, s.dc, s.m0, s.d0
        if hasattr(lam, "region"):  # a Window: the coefficient maps' window only
            t, l = lam.top, lam.left
            hh, ww = lam.lam.shape[-2:]
            mc = mc[..., t: t + hh, l: l + ww]
            dc = None if dc is None else dc[..., t: t + hh, l: l + ww]
            m0, d0 = lam.region(m0), None if d0 is None else lam.region(d0)
            lam = lam.lam
        B, m = lam.shape[:2]
        flat = lam.reshape(B, m, -1)
        coef = torch.bmm(flat, mc.reshape(B, self.K, -1).transpose(1, 2))
        const = (flat * m0.reshape(B, 1, -1)).sum(-1)
        if dc is not None or d0 is not None:
            mag = flat.abs()
            if dc is not None:
                coef = coef - torch.bmm(mag, dc.reshape(B, self.K, -1).transpose(1, 2))
            if d0 is not None:
                const = const - (mag * d0.reshape(B, 1, -1)).sum(-1)
        return const, coef
