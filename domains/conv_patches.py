"""Rows of a convolutional layer bounded as patches: each row on its own receptive field.

The tiled windows of `conv_windows.py` give a tile of neighbouring rows one shared window, the
union of their receptive fields; each row then carries coefficients over the whole window,
mostly zeros outside its own field (oval21-style CNN, its 2nd conv: a 4 x 4 tile's window at
the input is 22 x 22 where one row's field is 10 x 10). Here every row keeps only its own
field, and all rows of a chunk share one size of it (the field of one neuron, layer by layer),
so a whole layer of rows is one tensor op per step: a transposed convolution of small
patches, element-wise relaxation lines gathered at each row's field, and at the input the
centre and radius gathered the same way.

CROWN, 2 threads, patches against tiles, the same bounds (interleaved runs, medians of 5-9):
oval21-style CNN batch 1 x1.13-1.22, 2 x1.14-1.37, 4 x1.47-1.63, 16 x1.15, 32 x1.07-1.23;
avg-pool CNN batch 1 x1.21-1.39, 2 x1.36-1.53, 4 x1.23-1.33, 16 x1.26, 32 x1.01-1.04 (the dense
rows of the Linear layers after the convolutions are unchanged). At batch 32 a tile holds one
position (its window is its rows' own field already); the patches win there only because a
chunk carries many positions at once, with each map's fields cut out once per call and
chunks small enough for the caches (with 4x larger chunks the avg-pool CNN ran x0.68).

The chain from the refined node to the input must be ops of one input each that keep
coefficients per position: ungrouped Conv2d, non-overlapping AvgPool2d, per-channel
BatchNorm and the ReLU family. Positions of a field outside a map are the layer's zero
padding: the gathered lines, centre and radius are 0 there, and before a convolution, a
pooling or a BatchNorm reads a patch the part outside the map is cleared, so padding adds
nothing. Only on the fast paths, without rounding-error radii, captured coefficients, the
forward hand-over or a gradient through the weights (the tiled windows take those).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir

from .conv_windows import _spread, _transpose, conv_form
from .linear_rows import batchnorm_constants
from .relaxations import LinearRelaxation

# rows x elements of the largest patch per chunk (rows of both sides counted): a few tensors
# of this size are alive at once (8 MB each in float32; 2^23 ran x0.68 on the avg-pool CNN at
# batch 32, 2^19 and 2^20 within the noise of this)
PATCH_ELEMENTS = 1 << 21
# the largest cut-out of a map's fields at every position (samples x channels x patch x
# positions) that is formed and kept for a call; larger maps are indexed chunk by chunk
TABLE_ELEMENTS = 1 << 25
# a patch's transposed convolution as a matrix product: at most this many entries, and at
# most this many times the products of the convolution itself (2 threads: 8 -> 3 channels,
# 4x4 patches, 374 rows, 6.3x the products: 0.31 -> 0.17 ms; 16 -> 1 channels, 6x6 patches,
# 1118 rows, 12x: 0.92 -> 1.36 ms, slower)
MATRIX_ELEMENTS = 1 << 22
MATRIX_WORK = 8
# the ReLU family: lines that are exact on stable neurons, zero slope and bias in the padding
_ACTIVATIONS = (ir.ReLU, ir.LeakyReLU)


@dataclass
class _Step:
    node: ir.Node
    kind: str  # "conv", "pool", "bn" or "act"
    stride: tuple = (1, 1)  # the map's positions per position of the op's output
    padding: tuple = (0, 0)
    patch: tuple = (1, 1)  # a row's field on the op's input, in positions
    in_shape: tuple = ()
    exact_tiling: bool = True  # a pooling whose windows cover its input map (floor drops nothing)
    scale: Optional[Tensor] = None  # a BatchNorm's per-channel constants (C,), read once per chain
    shift: Optional[Tensor] = None
    matrix: Optional[Tensor] = None  # the transposed convolution of a patch as a matrix, where it pays

    def kernels(self) -> Tensor:
        """The convolution's kernels as patches on its input: dilated (zeros between the taps)."""
        w = self.node.op.weight
        dh, dw = self.node.op.dilation
        if (dh, dw) == (1, 1):
            return w
        out = w.new_zeros(w.shape[:2] + tuple(self.patch))
        out[:, :, ::dh, ::dw] = w
        return out

    def transpose_matrix(self, out_patch: tuple) -> Optional[Tensor]:
        """The transposed convolution from a patch (C_out, *out_patch) to this step's input patch
        as one (C_out oh ow, C_in ph pw) matrix, where a matrix product over the rows pays
        (MATRIX_WORK): every row's patch has the same geometry, so the map is the same for all
        of them, and torch's convolutions of many tiny maps run far below its matrix products."""
        if self.matrix is None:
            op = self.node.op
            C_out, C_in, kh, kw = op.weight.shape
            K, K_in = C_out * math.prod(out_patch), C_in * math.prod(self.patch)
            if K * K_in > MATRIX_ELEMENTS or K * K_in > MATRIX_WORK * K * C_in * kh * kw:
                self.matrix = False
            else:
                eye = torch.eye(K, device=op.weight.device, dtype=op.weight.dtype).view((K, C_out) + tuple(out_patch))
                with torch.no_grad():
                    self.matrix = _transpose(eye, op.weight.detach(), self.stride, (0, 0), tuple(op.dilation), 1,
                                             self.patch).reshape(K, K_in)
        return self.matrix if self.matrix is not False else None


def patch_chain(engine, name: str) -> Optional[list]:
    """The steps from node `name` down to the graph input when its rows can be bounded as
    patches (see the module's docstring), else None. Cached per engine."""
    if not engine.fast_paths or not engine.windows or engine.errors or engine.capture or engine.differentiable:
        return None
    cache = engine.__dict__.setdefault("_patch_chains", {})
    if name not in cache:
        cache[name] = _chain(engine, name)
    return cache[name]


def _chain(engine, name: str) -> Optional[list]:
    g = engine.graph
    if name == g.input_name or len(g.input_shape) != 3:
        return None
    steps, patch = [], (1, 1)
    while name != g.input_name:
        node = g.node(name)
        if len(node.inputs) != 1:
            return None
        shape, in_shape = tuple(g.shapes[name]), tuple(g.shapes[node.inputs[0]])
        if len(shape) != 3 or len(in_shape) != 3:
            return None
        op = node.op
        if isinstance(op, ir.Conv2d):
            if op.groups != 1 or op.weight.dim() != 4:
                return None
            (kh, kw), s, d = op.weight.shape[-2:], tuple(op.stride), tuple(op.dilation)
            patch = ((patch[0] - 1) * s[0] + d[0] * (kh - 1) + 1, (patch[1] - 1) * s[1] + d[1] * (kw - 1) + 1)
            steps.append(_Step(node, "conv", s, tuple(op.padding), patch, in_shape))
        elif isinstance(op, ir.AvgPool2d) and conv_form(op) is not None:
            s = tuple(op.stride)
            patch = (patch[0] * s[0], patch[1] * s[1])
            exact = in_shape[1] == shape[1] * s[0] and in_shape[2] == shape[2] * s[1]
            steps.append(_Step(node, "pool", s, (0, 0), patch, in_shape, exact))
        elif isinstance(op, ir.BatchNorm):
            scale, shift = batchnorm_constants(engine, node)
            if scale.numel() not in (1, shape[0]) or shift.numel() not in (1, shape[0]):
                return None
            steps.append(_Step(node, "bn", patch=patch, in_shape=in_shape, scale=scale.expand(shape[0]),
                               shift=shift.expand(shape[0])))
        elif type(op) in _ACTIVATIONS:
            if not any(s.kind in ("conv", "pool") for s in steps):
                return None  # a ReLU on one-hot rows (BatchNorm -> ReLU -> BatchNorm): the tiles' case
            steps.append(_Step(node, "act", patch=patch, in_shape=in_shape))
        else:
            return None
        name = node.inputs[0]
    return steps if any(s.kind == "conv" for s in steps) else None


class _Fields:
    """Where the rows' fields lie on a map: row r's field starts at (i[r] * S - P) for the
    stride S and offset P (per axis) that the ops between the map and the refined node add up
    to, so the fields of all positions of the refined node are a regular grid on every map:
    `F.unfold` cuts them out once per sample and position, the rows then take theirs by index
    (cheaper than indexing every element: oval21-style CNN at batch 32, ~4x)."""

    def __init__(self, b: Tensor, i: Tensor, j: Tensor, top_hw: tuple, tables: Optional[dict] = None):
        self.b, self.i, self.j, self.top_hw = b, i, j, top_hw
        self.stride, self.offset = (1, 1), (0, 0)
        # cut-out fields by (name, patch, stride, offset), shared by the chunks of one bound_patches
        # call: every chunk reads the same maps (without it, each chunk unfolded whole maps again)
        self.tables = {} if tables is None else tables

    def through(self, stride: tuple, padding: tuple) -> None:
        """The fields one op further down (an op of this stride and padding)."""
        self.offset = tuple(o * s + p for o, s, p in zip(self.offset, stride, padding))
        self.stride = tuple(a * s for a, s in zip(self.stride, stride))

    def gather(self, t: Tensor, patch: tuple, name: str) -> Tensor:
        """t (B or 1, C, H, W), the map called `name`, on each row's field: (R, C, ph, pw), 0
        outside the map."""
        B, C, H, W = t.shape
        (sh, sw), (oh, ow), (ph, pw) = self.stride, self.offset, tuple(patch)
        Ht, Wt = self.top_hw
        if B * C * ph * pw * Ht * Wt > TABLE_ELEMENTS:  # the map's fields at every position would be too large
            return self._direct(t, (ph, pw))
        key = (name, (ph, pw), self.stride, self.offset)
        if key not in self.tables:
            bottom = max(0, (Ht - 1) * sh - oh + ph - H)
            right = max(0, (Wt - 1) * sw - ow + pw - W)
            u = F.unfold(F.pad(t, (ow, right, oh, bottom)), (ph, pw), stride=self.stride)  # (B, C ph pw, Lh Lw)
            Lw = (W + ow + right - pw) // sw + 1
            self.tables[key] = (u.transpose(1, 2).reshape(B * u.shape[-1], C * ph * pw), Lw, u.shape[-1])
        table, Lw, L = self.tables[key]
        at = self.i * Lw + self.j
        if B > 1:
            at = at + self.b * L
        return table.index_select(0, at).view(-1, C, ph, pw)

    def _direct(self, t: Tensor, patch: tuple) -> Tensor:
        """`gather` by indexing each element of the groups' fields: memory in proportion to the
        chunk, not to the map's fields at every position."""
        B, C, H, W = t.shape
        (sh, sw), (oh, ow), (ph, pw) = self.stride, self.offset, patch
        top, left = self.i * sh - oh, self.j * sw - ow
        pt, pl = max(0, -int(top.min())), max(0, -int(left.min()))
        pb, pr = max(0, int(top.max()) + ph - H), max(0, int(left.max()) + pw - W)
        t = F.pad(t, (pl, pr, pt, pb))
        ar = lambda n: torch.arange(n, device=t.device)
        rows = (top + pt).view(-1, 1, 1, 1) + ar(ph).view(1, 1, -1, 1)
        cols = (left + pl).view(-1, 1, 1, 1) + ar(pw).view(1, 1, 1, -1)
        b = self.b.view(-1, 1, 1, 1) if B > 1 else torch.zeros_like(self.b).view(-1, 1, 1, 1)
        return t[b, ar(C).view(1, -1, 1, 1), rows, cols]

    def inside(self, patch: tuple, hw: tuple, dtype) -> Tensor:
        """(R, 1, ph, pw): 1 where a row's field lies on the (H, W) map, 0 in the padding."""
        ones = torch.ones((1, 1) + tuple(hw), device=self.i.device, dtype=dtype)
        return self.gather(ones, patch, f"inside {tuple(hw)}")


def _dot(lam: Tensor, t: Tensor) -> Tensor:
    """sum over the patch of lam (G, m, ...) * t (G, ...), for each group's m rows: (G, m)."""
    G, m = lam.shape[:2]
    return torch.bmm(lam.reshape(G, m, -1), t.reshape(G, -1, 1)).view(G, m)


def bound_patches(engine, name: str, steps: list, b: Tensor, neurons: Tensor, sides: tuple) -> list:
    """Lower bounds of the rows sign * e_neuron of node `name` in sample b (the pairs b (R,),
    neurons (R,), flat indices), one tensor (R,) per sign of `sides`.

    Rows are grouped by their field, (sample, position): the rows of a group differ only in
    the channel they start from, so every line, centre and radius is gathered once per group
    and shared by its rows (G groups of up to k rows each, padded with repeats of a row whose
    result is dropped). Groups go in chunks, the fullest first, so that a chunk's padding is
    small."""
    C, H, W = engine.graph.shapes[name]
    HW = H * W
    key = b * HW + neurons % HW
    order = torch.argsort(key, stable=True)
    key, chan = key[order], (neurons // HW)[order]
    groups, counts = torch.unique_consecutive(key, return_counts=True)
    G, R = groups.numel(), key.numel()
    start = torch.cumsum(counts, 0) - counts  # group g's rows: start[g] ... start[g] + counts[g] - 1
    largest = max(math.prod(s.patch) * s.in_shape[0] for s in steps)
    by_size = torch.argsort(counts, descending=True, stable=True)
    sizes = counts[by_size].tolist()
    out = [torch.empty(R, device=engine.device, dtype=engine.dtype) for _ in sides]
    tables = {}
    at = 0
    while at < G:
        k = sizes[at]  # the chunk's fullest group
        n = max(1, min(G - at, PATCH_ELEMENTS // (len(sides) * largest * k)))
        picked = by_size[at:at + n]
        cnt = counts[picked]
        local = torch.repeat_interleave(torch.arange(n, device=key.device), cnt)  # each row's group in the chunk
        slot = torch.arange(int(cnt.sum()), device=key.device) - (torch.cumsum(cnt, 0) - cnt)[local]
        mine = start[picked][local] + slot  # the chunk's rows, in sorted order
        table = torch.full((n, k), int(chan[mine[0]]), device=key.device, dtype=torch.long)  # padding: a real channel
        table[local, slot] = chan[mine]
        g = groups[picked]
        lb = _bound_groups(engine, name, steps, g // HW, (g % HW) // W, g % W, table, sides, tables)  # (n, S, k)
        for j in range(len(sides)):
            out[j][order[mine]] = lb[local, j, slot]
        engine.rows_bounded += len(sides) * mine.numel()
        at += n
    return out


def _bound_groups(engine, name: str, steps: list, b: Tensor, i: Tensor, j: Tensor, chan: Tensor,
                  sides: tuple, tables: dict) -> Tensor:
    """Lower bounds (G, S, k) of the rows sign * e_(chan[g, r], i[g], j[g]) of node `name` in
    sample b[g], for each sign of `sides` (S of them); `tables`: the call's cut-out fields."""
    C, H, W = engine.graph.shapes[name]
    (G, k), S = chan.shape, len(sides)
    m = S * k
    device, dtype = engine.device, engine.dtype
    fields = _Fields(b, i, j, (H, W), tables)
    signs = torch.tensor([float(s) for s in sides], device=device, dtype=dtype)
    coef = signs.view(1, S, 1).expand(G, S, k).reshape(G, m)  # one-hot rows: coef * e_chan (1 x 1)
    chan = chan.repeat(1, S)  # (G, m)
    const = torch.zeros(G, m, device=device, dtype=dtype)
    lam = None  # (G * m, C, ph, pw) once the rows have left their 1 x 1 start
    clean = True  # is lam 0 outside the map (so a convolution's bias and transpose may read it)?
    grouped = lambda t: t.view((G, m) + t.shape[1:])
    for step in steps:
        node, op = step.node, step.node.op
        hw = tuple(engine.graph.shapes[node.name][1:])
        if step.kind != "act" and not clean and not (step.kind == "pool" and step.exact_tiling):
            mask = fields.inside(lam.shape[-2:], hw, dtype)  # (G, 1, ph, pw)
            lam = (grouped(lam) * mask.unsqueeze(1)).flatten(0, 1)
            clean = True
        if step.kind == "bn":
            scale, shift = step.scale, step.shift
            if lam is None:
                const = const + coef * shift[chan]
                coef = coef * scale[chan]
            else:
                const = const + (lam.sum((-2, -1)) @ shift).view(G, m)
                lam = lam * scale.view(1, -1, 1, 1)
        elif step.kind == "act":
            rel: LinearRelaxation = engine.relaxation(node)
            shape = (engine.batch,) + tuple(engine.graph.shapes[node.name])
            lower_bias = engine._has_lower_bias(node)
            own = lambda t: t if t.dim() == 4 and t.shape[0] == 1 else t.expand(shape)  # (1, ...): one for all
            at = lambda t, what: fields.gather(own(t), lam.shape[-2:], f"{node.name} {what}").unsqueeze(1)
            lam = grouped(lam)
            neg = lam.clamp(max=0)
            pos = lam - neg
            const = const + _dot(neg, at(rel.upper_bias, "upper bias"))
            if lower_bias:
                const = const + _dot(pos, at(rel.lower_bias, "lower bias"))
            lam = (pos * at(rel.lower_slope, "lower slope") + neg * at(rel.upper_slope, "upper slope")).flatten(0, 1)
            clean = True
        elif step.kind == "conv":
            w, bias = op.weight, op.bias
            if lam is None:  # the rows' kernels (the transpose of a one-hot 1 x 1 patch)
                lam = step.kernels()[chan.flatten()] * coef.reshape(-1, 1, 1, 1)
                if bias is not None:
                    const = const + coef * bias[chan]
            else:
                if bias is not None:
                    const = const + (lam.sum((-2, -1)) @ bias).view(G, m)
                mat = step.transpose_matrix(lam.shape[-2:])
                if mat is not None:
                    lam = (lam.reshape(G * m, -1) @ mat).view((G * m, mat.shape[1] // math.prod(step.patch)) + step.patch)
                else:
                    lam = _transpose(lam, w, step.stride, (0, 0), tuple(op.dilation), 1, step.patch)
            fields.through(step.stride, step.padding)
            clean = False
        else:  # pool
            if lam is None:
                lam = torch.zeros(G * m, step.in_shape[0], 1, 1, device=device, dtype=dtype)  # a pooling keeps channels
                lam[torch.arange(G * m, device=device), chan.flatten(), 0, 0] = coef.flatten()
            lam = _spread(lam, step.stride)
            fields.through(step.stride, (0, 0))
            clean = False
    box = engine.store[engine.graph.input_name]  # every chain has a convolution: lam is a patch here
    patch = lam.shape[-2:]
    lam = grouped(lam)
    lb = const + _dot(lam, fields.gather(box.center, patch, "centre")) - \
        _dot(lam.abs(), fields.gather(box.radius, patch, "radius"))
    return lb.view(G, S, k)

