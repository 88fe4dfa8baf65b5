"""Intermediate bounds for the linear-bound engine: which neurons are back-substituted, in which
chunks, and how the forward pre-screen and the per-sample rows share the work.

`RowRefinement` is a mixin of `LinearBoundEngine` (linear_bounds.py), which owns the backward
walk (`lower_bound`); this module owns the bookkeeping around it: one-hot rows (dense, as conv
windows, or as weight rows of a Linear), tiles of neighbouring positions, the hand-over to the
forward functions a few layers down, and refinement one sample at a time when the
pre-screen's coefficients would not fit for the whole batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from verikit import ir
from verikit.bounds import Box

from .box import propagate_box
from .conv_patches import bound_patches, patch_chain
from .conv_rows import conv_row_form, kernel_rows
from .conv_windows import Window
from .forward_bounds import ForwardBounds
from .linear_rows import bound_rows_per_sample, collect_sides, linear_rows, per_sample_rows, row_form, tighten

# rows (over the batch) of one chunk of windowed rows: the windows' small transposed
# convolutions run faster on fewer rows at a time (oval21-style CNN at batch 32: its 2nd conv
# 405 ms with 4096, 240 ms with 1024, 350 ms with 512; the whole call 917 -> 830 ms; the
# avg-pool CNN unchanged; at batch 1 a tile holds fewer rows than this: nothing changes)
WINDOW_ROWS = 1024
# the largest tiles of windowed rows, in positions per side: windows grow per layer, but a
# tile is one back-substitution (at batch 1, 2 -> 4: oval21-style CNN 28.8 -> 19.7 ms, the
# avg-pool CNN 37.9 -> 30.2 ms; wide layers such as CNN7's get 2x2 tiles from max_rows anyway)
TILE_SIDE = 4
# activations whose relaxation is exact on stable neurons (tighter bounds change nothing there)
PIECEWISE_LINEAR = (ir.ReLU, ir.LeakyReLU)
# ops that map each input neuron to one output neuron, and ops that mix neurons (box_is_exact)
_ONE_TO_ONE = (ir.ElementwiseAffine, ir.BatchNorm, ir.Reshape, ir.Transpose, ir.Pad)
_MIXING = (ir.Linear, ir.Conv2d, ir.AvgPool2d, ir.GlobalAvgPool)


class RowRefinement:
    """Bounds of chosen neurons of a node and of every pre-activation node (needs the engine's
    graph, store, batch, device, dtype, max_rows, windows, fast_paths, per_sample_rows,
    forward_prescreen and lower_bound)."""

    def bound_rows(self, name: str, rows: Tensor, stop: Optional[str] = None,
                   sides: tuple = (1, -1)) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Lower and upper bounds (B, len(rows)) of the flat neurons `rows` of node `name`,
        in chunks of at most `max_rows_per_chunk` rows over the whole batch (WINDOW_ROWS for
        windowed rows). `sides`: the rows' signs, +1 for the lower bound and -1 for the upper
        one; a side not asked for comes back as None."""
        shape = tuple(self.graph.shapes[name])
        n = math.prod(shape)
        B = self.batch
        windowed = self._windowed(shape)
        per_chunk = max(1, (min(self.max_rows, WINDOW_ROWS) if windowed else self.max_rows) // (len(sides) * B))
        found = {s: [] for s in sides}
        done = []
        node = self.graph.node(name) if name != self.graph.input_name else None
        form = row_form(self, node, shape, stop)
        kernels = conv_row_form(self, node, shape, stop) if windowed else None
        for chunk in self._chunks(rows, shape, per_chunk):
            done.append(chunk)
            k = chunk.numel()
            start = kernel_rows(self, kernels, chunk, shape, sides) if kernels is not None else None
            if start is not None:  # the rows as kernels on the convolution's input (conv_rows.py)
                lb = self.lower_bound(kernels[0].inputs[0], start[0], stop=stop)
                lb = lb if start[1] is None else lb + start[1]
            elif windowed:
                lb = self.lower_bound(name, self._one_hot_window(chunk, shape, sides), stop=stop)
            elif form is not None:
                lb = linear_rows(self, form[0], chunk, stop, *form[1:], sides=sides)
            else:
                lam = torch.zeros(B, len(sides) * k, n, device=self.device, dtype=self.dtype)
                ar = torch.arange(k, device=self.device)
                for j, sign in enumerate(sides):
                    lam[:, ar + j * k, chunk] = float(sign)
                lb = self.lower_bound(name, lam.reshape((B, len(sides) * k) + shape), stop=stop)
            collect_sides(found, lb, k, sides)
            self.rows_bounded += len(sides) * k * B
        # chunks may visit the rows in another order: put the results back in `rows` order
        done = torch.cat(done)
        out = []
        for sign in (1, -1):
            if sign not in found:
                out.append(None)
                continue
            full = torch.empty(B, n, device=self.device, dtype=self.dtype)
            full[:, done] = torch.cat(found[sign], 1)
            out.append(full[:, rows])
        return out[0], out[1]

    def _chunks(self, rows: Tensor, shape: tuple, per_chunk: int) -> list[Tensor]:
        """Rows in chunks; for (C, H, W) nodes, chunks of neighbouring positions (square tiles
        of at most TILE_SIDE x TILE_SIDE positions), so each chunk's window stays small."""
        if not self._windowed(shape):
            return list(rows.split(per_chunk))
        C, H, W = shape
        side = self._tile_side(shape, per_chunk)
        h, w = (rows // W) % H, rows % W
        tile = (h // side) * ((W + side - 1) // side) + (w // side)
        order = torch.argsort(tile, stable=True)
        rows, tile = rows[order], tile[order]
        _, counts = torch.unique_consecutive(tile, return_counts=True)
        return [piece for group in rows.split(counts.tolist()) for piece in group.split(per_chunk)]

    @staticmethod
    def _tile_side(shape: tuple, per_chunk: int) -> int:
        """Positions per side of a tile of windowed rows of a (C, H, W) node, for chunks of
        `per_chunk` rows per sample."""
        return max(1, min(TILE_SIDE, int(math.sqrt(per_chunk / shape[0]))))

    def _windowed(self, shape: tuple) -> bool:
        """Are rows of a node of this shape bounded as spatial windows (a (C, H, W) node)?"""
        return self.windows and len(shape) == 3

    def _one_hot_window(self, rows: Tensor, shape: tuple, sides: tuple = (1, -1)) -> Window:
        """[+e_rows; -e_rows] (the signs `sides`, in order) as a Window around the rows' positions."""
        C, H, W = shape
        k, B = rows.numel(), self.batch
        c, h, w = rows // (H * W), (rows // W) % H, rows % W
        top, left = int(h.min()), int(w.min())
        hh, ww = int(h.max()) - top + 1, int(w.max()) - left + 1
        lam = torch.zeros(B, len(sides) * k, C, hh, ww, device=self.device, dtype=self.dtype)
        ar = torch.arange(k, device=self.device)
        for j, sign in enumerate(sides):
            lam[:, ar + j * k, c, h - top, w - left] = float(sign)
        return Window(lam, top, left)

    def refine_node(self, name: str) -> Box:
        """Back-substitute the neurons of `name` whose bounds matter, intersect with the store."""
        box = self.store[name]
        B = box.lo.shape[0]
        lo, hi = box.lo.reshape(B, -1), box.hi.reshape(B, -1)
        users = [self.graph.node(u).op for u in self.graph.consumers()[name]]
        own = need = None
        if all(isinstance(op, PIECEWISE_LINEAR) for op in users):
            need = (lo < 0) & (hi > 0)
            rows = need.any(0).nonzero().flatten()
            windowed = self._windowed(tuple(self.graph.shapes[name]))
            own = per_sample_rows(need) if self.per_sample_rows and not windowed else None
        else:
            rows = torch.arange(lo.shape[1], device=lo.device)
        if rows.numel() == 0:
            return box
        lo, hi = lo.clone(), hi.clone()
        upper_first = self.fast_paths and self.upper_first and B >= self.upper_first_min_batch and \
            need is not None and all(type(op) is ir.ReLU for op in users)
        # hand over to the forward functions a few layers down where the rest is deep (fewer
        # rows reach the input: CNN7 5th conv 4148 -> 573, its Linear 506 -> 63)
        stop = self.forward.stop_for(name) if self.forward is not None and own is None and need is not None else None
        if stop is not None:  # back-substitute a few layers only, then the forward functions
            self._tighten_rows(name, rows, lo, hi, stop, upper_first)
            rows = ((lo < 0) & (hi > 0)).any(0).nonzero().flatten()
            if rows.numel() == 0:
                self.nodes_refined += 1
                return self.store.update(name, Box(lo.reshape(box.lo.shape), hi.reshape(box.hi.shape)))
        chain = patch_chain(self, name) if (stop is None and need is not None
                                            and self._windowed(tuple(self.graph.shapes[name]))) else None
        if chain is not None:  # every row on its own receptive field (conv_patches.py)
            self._tighten_patches(name, chain, rows, lo, hi, need, upper_first)
        elif own is not None:  # each sample's own unstable neurons
            tighten(lo, hi, *own, *bound_rows_per_sample(self, name, own[0]))
        else:
            self._tighten_rows(name, rows, lo, hi, None, upper_first)
        self.nodes_refined += 1
        return self.store.update(name, Box(lo.reshape(box.lo.shape), hi.reshape(box.hi.shape)))

    def _tighten_rows(self, name: str, rows: Tensor, lo: Tensor, hi: Tensor, stop: Optional[str],
                      upper_first: bool) -> None:
        """Bound the neurons `rows` of node `name` in every sample and intersect them into lo, hi
        (B, n) in place. `upper_first` (a node read by ReLUs only): the upper bounds first, then
        the lower ones, each only where the upper bound is above 0. A ReLU is exactly 0 on a
        neuron with hi <= 0 whatever its lower bound (its lines, its interval and every bound
        after it are the same), so the rows skipped there change nothing downstream."""
        if not upper_first:
            new_lo, new_hi = self.bound_rows(name, rows, stop)
            lo[:, rows] = torch.maximum(lo[:, rows], new_lo)
            hi[:, rows] = torch.minimum(hi[:, rows], new_hi)
            return
        self._tighten_side(name, rows, hi, -1, stop)
        self._tighten_side(name, rows, lo, 1, stop, alive=hi[:, rows] > 0)

    def _tighten_patches(self, name: str, chain: list, rows: Tensor, lo: Tensor, hi: Tensor, need: Tensor,
                         upper_first: bool) -> None:
        """`_tighten_rows` (or, with `per_sample_rows`, each sample's own unstable neurons) with
        every row bounded as a patch: the same rows and bounds, the same upper-first order."""
        B = self.batch
        every_sample = lambda r: (torch.arange(B, device=self.device).repeat_interleave(r.numel()), r.repeat(B))
        b, neurons = need.nonzero(as_tuple=True) if self.per_sample_rows else every_sample(rows)
        if not upper_first:
            new_lo, minus_hi = bound_patches(self, name, chain, b, neurons, (1, -1))
            lo[b, neurons] = torch.maximum(lo[b, neurons], new_lo)
            hi[b, neurons] = torch.minimum(hi[b, neurons], -minus_hi)
            return
        (minus_hi,) = bound_patches(self, name, chain, b, neurons, (-1,))
        hi[b, neurons] = torch.minimum(hi[b, neurons], -minus_hi)
        # lower bounds only where hi > 0 (a ReLU is 0 elsewhere whatever the lower bound); as
        # the tiles, a neuron alive in some sample gets them in every sample
        if self.per_sample_rows:
            alive = hi[b, neurons] > 0
            b, neurons = b[alive], neurons[alive]
        else:
            b, neurons = every_sample(rows[(hi[:, rows] > 0).any(0)])
        if b.numel():
            (new_lo,) = bound_patches(self, name, chain, b, neurons, (1,))
            lo[b, neurons] = torch.maximum(lo[b, neurons], new_lo)

    def _tighten_side(self, name: str, rows: Tensor, bound: Tensor, sign: int, stop: Optional[str],
                      alive: Optional[Tensor] = None) -> None:
        """One side (sign +1: lower, -1: upper) of the neurons `rows` (k,) of node `name`,
        intersected into `bound` (B, n) in place, only in the samples where `alive` (B, k) holds
        (None: where `bound`, the upper bounds, is still above 0)."""
        if alive is None:
            alive = bound[:, rows] > 0
        if not bool(alive.any()):
            return
        better = torch.maximum if sign > 0 else torch.minimum
        own = None if self._windowed(tuple(self.graph.shapes[name])) else per_sample_rows(alive)
        if own is None:  # one row list for the batch: the rows alive in some sample
            keep = rows[alive.any(0)]
            new = self.bound_rows(name, keep, stop, sides=(sign,))[0 if sign > 0 else 1]
            bound[:, keep] = better(bound[:, keep], new)
            return
        picked, valid = rows[own[0]], own[1]  # each sample's alive rows, padded
        new = bound_rows_per_sample(self, name, picked, sides=(sign,), stop=stop)[0 if sign > 0 else 1]
        old = bound.gather(1, picked)
        bound.scatter_(1, picked, torch.where(valid, better(old, new), old))

    def preactivation_nodes(self) -> list[str]:
        """Nodes (in topological order) whose bounds some non-linear op's relaxation needs."""
        needed = []
        for node in self.graph.nodes:
            if not node.op.is_affine:
                for src in node.inputs:  # a product needs both factors' bounds
                    if src != self.graph.input_name and src not in needed:
                        needed.append(src)
        return sorted(needed, key=self.position.__getitem__)

    def box_is_exact(self, name: str) -> bool:
        """Is `name` a chain of affine ops from the input with at most one mixing op? Interval
        bounds are then already the exact range, and back-substitution cannot improve them."""
        mixing = 0
        while name != self.graph.input_name:
            node = self.graph.node(name)
            if len(node.inputs) != 1 or not isinstance(node.op, _ONE_TO_ONE + _MIXING):
                return False
            mixing += isinstance(node.op, _MIXING)
            if mixing > 1:
                return False
            name = node.inputs[0]
        return True

    def refine_intermediate(self, only: Optional[set] = None) -> None:
        """Bounds for every pre-activation node by back-substitution, in topological order; after
        each, interval bounds downstream are refreshed from the tighter ones (so later layers
        select fewer unstable neurons), lazily: up to the next node refined, just before it is
        (the nodes beyond would be recomputed again from tighter bounds; a 9x200 MLP did 8
        refreshes of 8 nodes on average, now each node once). `only`: the nodes to
        back-substitute, where the store already holds back-substituted bounds of the others
        (branch and bound's children)."""
        inputs = self.store[self.graph.input_name]
        nodes = self.preactivation_nodes()
        per_pass = 0 if self.forward_prescreen is False else \
            ForwardBounds.samples_per_pass(self, nodes, force=self.forward_prescreen is True)
        if 0 < per_pass < self.batch:  # the pre-screen's coefficients fit for a few samples only:
            # one sample at a time (a group shares no arithmetic, only the union of its samples'
            # unstable rows: CNN7 at batch 4, groups of 3 took 69 s and 6.9 GB, singles 39 s and
            # 2.4 GB, the same margins)
            return self._refine_each_sample(nodes, only)
        self.forward = forward = ForwardBounds(self, nodes) if per_pass else None
        last = None  # the last node refined: the interval refresh after it is still to do
        for name in nodes:
            if forward is not None:  # settle what forward mode proves stable (forward_bounds.py)
                self.store.update(name, forward.bounds(name))
            if self.box_is_exact(name) or (only is not None and name not in only):
                continue
            if last is not None:
                self._refresh(inputs, last, name)
            self.refine_node(name)
            last = name
        if last is not None:
            self._refresh(inputs, last, None)
        self.forward = None  # its coefficient tensors are large: not kept past this point

    def _refresh(self, inputs: Box, after: str, until: Optional[str]) -> None:
        """Interval bounds of the nodes after `after` up to `until` (None: to the end) from the
        store's; on the general rules every node, as a reference."""
        fast = self.fast_paths
        propagate_box(self.graph, inputs, self.store, self.ctx, widen=self.errors or None,
                      after=after if fast else None, until=until if fast else None)

    def refine_groups(self, groups: list) -> None:
        """refine_intermediate for groups of samples: (index tensor, `only` set) each, e.g. branch
        and bound's children grouped by the layer of their new split."""
        if len(groups) == 1:
            return self.refine_intermediate(groups[0][1])
        self._refine_subsets(self.preactivation_nodes(), groups, self.forward_prescreen)

    def _refine_each_sample(self, nodes: list, only: Optional[set] = None) -> None:
        """refine_intermediate for one sample at a time, each with the pre-screen and its own
        unstable rows (its bounds are those of the sample alone)."""
        samples = [(torch.tensor([b], device=self.device), only) for b in range(self.batch)]
        self._refine_subsets(nodes, samples, True)

    def _refine_subsets(self, nodes: list, subsets: list, prescreen: Optional[bool]) -> None:
        """refine_intermediate on subsets of the batch ((index tensor, `only`) each), merged back
        into this engine's store. The subsets are refined on the part of the graph the
        pre-activation nodes depend on: what follows (a folded per-sample spec, sized for the
        whole batch) is refreshed once for the whole batch after."""
        head = self._nonlinear_part()
        # only the head's nodes change in a subset's store; the rest is refreshed below
        merged = {name: (self.store[name].lo.clone(), self.store[name].hi.clone())
                  for name in [head.input_name] + [n.name for n in head.nodes]}
        for idx, only in subsets:
            errors = {k: v[idx] if v.shape[0] == self.batch else v for k, v in self.errors.items()} or None
            sub = type(self)(head, self.store.select(idx), self.ctx, self.variant, self.max_rows, self.windows,
                             errors, self.fast_paths, self.per_sample_rows)
            sub.forward_prescreen = prescreen
            sub.refine_intermediate(only)
            self.rows_bounded += sub.rows_bounded
            self.nodes_refined = max(self.nodes_refined, sub.nodes_refined)
            for name, (lo, hi) in merged.items():
                lo[idx], hi[idx] = sub.store[name].lo, sub.store[name].hi
        for name, (lo, hi) in merged.items():
            self.store.update(name, Box(lo, hi))
        self._refresh(self.store[self.graph.input_name], nodes[-1], None)

    def _nonlinear_part(self) -> ir.Graph:
        """The subgraph of the non-linear ops and everything they read (so the same nodes are
        pre-activation nodes there), ending at the last of them."""
        g = self.graph
        needed, todo = set(), [n.name for n in g.nodes if not n.op.is_affine]
        while todo:
            name = todo.pop()
            if name in needed or name == g.input_name:
                continue
            needed.add(name)
            todo.extend(g.node(name).inputs)
        kept = [n for n in g.nodes if n.name in needed]
        return ir.Graph(g.input_name, g.input_shape, kept, kept[-1].name, g.shapes, g.source, g.meta)
