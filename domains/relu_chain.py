"""Back-substitution through chains Linear -> ReLU -> Linear -> ... on live neurons only.

A ReLU neuron that is stably inactive (upper bound <= 0) has both relaxation lines equal to 0,
so every coefficient leaving it backwards is exactly zero: the Linear below never needs that
neuron's weight row, and the Linear above never needs to produce its coefficient. On trained
MLPs half or more of the neurons are inactive in each sample, so keeping coefficients only on
the live neurons of each ReLU shrinks every product of the chain from n_out x n_in to
live_out x live_in: the same sums without their zero terms, hence the same bounds up to float
summation order.

Live neurons are indexed per sample (padded to the batch's largest count with dead neurons,
whose zero slopes keep the padding at zero) when that is clearly smaller than the union over
the batch, else by the union (one shared index, plain matrix products). The weights restricted
to live neurons are built once per engine, without autograd (CROWN is not differentiated with
respect to the network), and reused by every row chunk, every intermediate layer and every
alpha step.

A ReLU with a rounding error radius (the float-sound mode) keeps all its coefficients, as
the error term <|lam|, err> needs them; its Linear below still uses only live rows.

Where the chain ends at the graph input (an MLP's first Linear), the input box is folded into
that Linear: min over |x - c| <= r of <lam W, x> is <lam, W c> - ||lam (W diag r)||_1, so the
coefficients on the input are never formed, nor their absolute values (a pass over the
largest tensor of the walk), and the sum of |.| is one reduction that reads its operand once
(256x4 MLP at batch 32: 37 -> 8 ms per intermediate layer for this step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from verikit import ir

# per-sample live indices are used when their padded count is below this share of the union
PER_SAMPLE_SHARE = 0.8
# ... and the per-sample weights of one layer stay below this many elements (also the bound on
# the first Linear's weights scaled by each sample's own input radius)
PER_SAMPLE_ELEMENTS = 1 << 23


@dataclass
class LiveNeurons:
    """The live neurons of one ReLU node and its relaxation restricted to them: (B, 1, a)."""

    idx: Tensor  # (a,) shared by the batch, or (B, a) per sample
    per_sample: bool
    lower_slope: Tensor
    upper_slope: Tensor
    lower_bias: Optional[Tensor]  # None when zero everywhere (the ReLU's lower line)
    upper_bias: Tensor
    alpha_mask: Optional[Tensor]

    def take(self, t: Tensor) -> Tensor:
        """(B, ..., n) -> (B, ..., a): the live entries of the last dimension."""
        if not self.per_sample:
            return t.index_select(-1, self.idx)
        idx = self.idx.reshape((t.shape[0],) + (1,) * (t.dim() - 2) + (-1,))
        return t.gather(-1, idx.expand(t.shape[:-1] + (idx.shape[-1],)))


def _dot(lam: Tensor, t: Tensor) -> Tensor:
    """sum over the last dimension of lam (B, m, a) * t (B, 1, a) -> (B, m)."""
    return torch.bmm(lam, t.transpose(1, 2).expand(lam.shape[0], -1, -1)).squeeze(-1)


class ReluChains:
    """Finds chains in one engine's graph and back-substitutes through them."""

    def __init__(self, engine):
        self.engine = engine
        self.graph = engine.graph
        self.users = self.graph.consumers()
        self._steps: dict[str, Optional[list]] = {}
        self._live: dict[str, tuple] = {}  # node -> (its relaxation, LiveNeurons)
        self._weights: dict[tuple, tuple] = {}
        self._input_folds: dict[str, tuple] = {}

    # ------------------------------------------------------------ structure
    def _flat(self, name: str) -> bool:
        return len(self.graph.shapes[name]) == 1

    def _chain_relu(self, name: str) -> bool:
        """A ReLU on a flat node whose input is a Linear used by this ReLU alone."""
        if name == self.graph.input_name:
            return False
        node = self.graph.node(name)
        if type(node.op) is not ir.ReLU or not self._flat(name):
            return False
        src = node.inputs[0]
        if src == self.graph.input_name or not isinstance(self.graph.node(src).op, ir.Linear):
            return False
        return self.users[src] == [name] and self._flat(src) and self._flat(self.graph.node(src).inputs[0])

    def steps(self, top: ir.Node) -> Optional[list]:
        """The chain's nodes from `top` down, or None when `top` starts no chain: a ReLU (of
        the kind above) or a Linear whose input is one; below, every ReLU's input is its Linear
        and every Linear's input is a ReLU used by that Linear alone, until a Linear whose
        input is something else."""
        if top.name not in self._steps:
            out = []
            name = top.name
            if isinstance(top.op, ir.Linear) and self._flat(name):
                src = top.inputs[0]
                if self._chain_relu(src) and self.users[src] == [name]:
                    out.append(top)
                    name = src
            while self._chain_relu(name) and (not out or self.users[name] == [out[-1].name]):
                relu = self.graph.node(name)
                lin = self.graph.node(relu.inputs[0])
                out += [relu, lin]
                name = lin.inputs[0]
            self._steps[top.name] = out if any(n.op.is_activation for n in out) else None
        return self._steps[top.name]

    # ------------------------------------------------------------ live neurons and weights
    def live(self, node: ir.Node) -> LiveNeurons:
        rel = self.engine.relaxation(node)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (rel.lower_slope, rel.upper_slope, rel.lower_bias,
                                                                      rel.upper_bias)):
            return self._live_neurons(node, rel)  # differentiable relaxations (alpha_beta.py): a fresh graph each call
        if node.name not in self._live or self._live[node.name][0] is not rel:  # a caller may replace relaxations
            self._live[node.name] = (rel, self._live_neurons(node, rel))
        return self._live[node.name][1]

    def _live_neurons(self, node: ir.Node, rel) -> LiveNeurons:
        lo_s, up_s, lo_b, up_b = rel.lower_slope, rel.upper_slope, rel.lower_bias, rel.upper_bias
        B, n = lo_s.shape
        alive = (lo_s != 0) | (up_s != 0) | (lo_b != 0) | (up_b != 0)
        if rel.alpha_mask is not None:
            alive = alive | rel.alpha_mask
        most = max(1, int(alive.sum(1).max()))
        union = alive.any(0).nonzero().flatten()
        if union.numel() == 0:
            union = union.new_zeros(1)  # a dead neuron: zero slopes, zero coefficients
        widest = max(n, self.graph.shapes[self.graph.node(node.inputs[0]).inputs[0]][0])
        per_sample = B > 1 and most < PER_SAMPLE_SHARE * union.numel() and B * most * widest <= PER_SAMPLE_ELEMENTS
        if per_sample:  # live neurons first (in order), then dead ones as padding
            idx = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :most]
        else:
            idx = union
        pick = lambda t: (t.gather(1, idx) if per_sample else t[:, idx]).unsqueeze(1)
        return LiveNeurons(idx, per_sample, pick(lo_s), pick(up_s), pick(lo_b) if bool((lo_b != 0).any()) else None,
                           pick(up_b), pick(rel.alpha_mask) if rel.alpha_mask is not None else None)

    def weights(self, node: ir.Node, rows: Optional[LiveNeurons], cols: Optional[LiveNeurons]):
        """The Linear's weight (…, out, in) and bias restricted to live output neurons `rows`
        and live input neurons `cols` (None: all of them)."""
        key = (node.name, rows is not None, cols is not None)
        cached = self._weights.get(key)
        if cached is None or cached[0] is not rows or cached[1] is not cols:
            with torch.no_grad():
                w, b = node.op.weight.detach(), node.op.bias
                b = b.detach() if b is not None else None
                B = self.engine.batch
                if rows is not None:
                    if rows.per_sample:
                        w = w.expand((B,) + w.shape[-2:]) if w.dim() == 2 else w
                        w = w.gather(1, rows.idx.unsqueeze(-1).expand(-1, -1, w.shape[-1]))
                        b = b.expand(B, -1).gather(1, rows.idx) if b is not None else None
                    else:
                        w, b = w[..., rows.idx, :], (b[..., rows.idx] if b is not None else None)
                if cols is not None:
                    if cols.per_sample:
                        w = w.expand((B,) + w.shape[-2:]) if w.dim() == 2 else w
                        w = w.gather(2, cols.idx.unsqueeze(1).expand(-1, w.shape[1], -1))
                    else:
                        w = w[..., cols.idx]
                if b is not None:
                    b = b.expand(B, -1).unsqueeze(1)  # (B, 1, out)
                self._weights[key] = (rows, cols, w.contiguous(), b)
        return self._weights[key][2:]

    def input_fold(self, node: ir.Node, rows: Optional[LiveNeurons], box) -> Optional[tuple]:
        """(W c + b (B, 1, a), W diag r ((B,) a, n)) of the Linear `node` on the graph input, its
        weight restricted to live output neurons `rows`, for the input box's centre c and
        radius r; None when the per-sample scaled weights would be too large."""
        cached = self._input_folds.get(node.name)
        if cached is not None and cached[0] is rows and cached[1] is box.lo and cached[2] is box.hi:
            return cached[3]
        with torch.no_grad():
            w = node.op.weight.detach()  # (out, n); a per-sample (B, out, n) weight is not folded
            c, r = box.center.detach(), box.radius.detach()
            B = c.shape[0]
            c, r = c.reshape(B, -1), r.reshape(B, -1)
            per_sample = rows is not None and rows.per_sample
            a = w.shape[0] if rows is None else rows.idx.shape[-1]
            if B > 1 and not per_sample and bool((r == r[:1]).all()):
                r = r[:1]  # one radius for the batch (e.g. branch and bound's children): one weight
            if w.dim() != 2 or r.shape[0] * a * w.shape[1] > PER_SAMPLE_ELEMENTS:
                fold = None
            else:
                # W c for all neurons, then the live ones; W diag r from the live rows of W
                # directly (no gathered copy of the weight first)
                wc = torch.matmul(c, w.T)
                if node.op.bias is not None:
                    wc = wc + node.op.bias.detach()
                if per_sample:
                    wc = wc.gather(1, rows.idx)
                    wr = w.index_select(0, rows.idx.flatten()).view(B, a, -1).mul_(r.unsqueeze(1))
                else:
                    live = w if rows is None else w[rows.idx]
                    wc = wc if rows is None else wc[:, rows.idx]
                    wr = live * r.unsqueeze(1)
                    wr = wr[0] if wr.shape[0] == 1 else wr
                fold = (wc.unsqueeze(1), wr)
        self._input_folds[node.name] = (rows, box.lo, box.hi, fold)
        return fold

    # ------------------------------------------------------------ back-substitution
    def run(self, steps: list, lam: Tensor, alphas: Optional[dict], errors: dict, input_box=None):
        """Coefficients `lam` (B, m, n) on the output of steps[0], carried through the chain:
        (coefficients on the input of the last Linear, (B, m, n_in); the constant (B, m)).
        `input_box`: the box of the last Linear's input (the graph input, read by nothing
        else), to minimise over: the coefficients are then None and the constant the bound."""
        const = lam.new_zeros(lam.shape[:2])
        live = None  # the live neurons lam is restricted to (None: all neurons of its node)
        for i, node in enumerate(steps):
            if i > 0 and node.name in errors:  # the engine has charged the top node already
                err = errors[node.name].reshape(lam.shape[0], 1, -1)
                const = const - _dot(lam.abs(), err if live is None else live.take(err))
            if node.op.is_activation:
                if live is None:  # lam covers every neuron (the top, or a ReLU with an error radius)
                    lam = self.live(node).take(lam)
                live = self.live(node)
                lo_s = live.lower_slope
                if alphas is not None and node.name in alphas:
                    lo_s = torch.where(live.alpha_mask, live.take(alphas[node.name]), lo_s)
                neg = lam.clamp(max=0)
                pos = lam - neg  # exact; cheaper than a second clamp or a where
                const = const + _dot(neg, live.upper_bias)
                if live.lower_bias is not None:
                    const = const + _dot(pos, live.lower_bias)
                lam = pos * lo_s + neg * live.upper_slope
            else:
                below = steps[i + 1] if i + 1 < len(steps) else None
                # a ReLU below with an error radius needs all its coefficients (<|lam|, err>)
                cols = self.live(below) if below is not None and below.name not in errors else None
                fold = self.input_fold(node, live, input_box) if below is None and input_box is not None else None
                if fold is not None:  # <lam, W c + b> - ||lam W diag r||_1: the minimum over the box
                    wcb, wr = fold
                    return None, const + _dot(lam, wcb) - torch.linalg.vector_norm(torch.matmul(lam, wr), 1, -1)
                w, b = self.weights(node, live, cols)
                if b is not None:
                    const = const + _dot(lam, b)
                lam = torch.matmul(lam, w)
                live = cols
        return lam, const
