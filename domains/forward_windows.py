"""Forward-mode coefficients in spatial windows (used by forward_bounds.py on conv nets).

The coefficient image of one input coordinate is zero outside that coordinate's receptive
field, which grows by about a kernel's half-width per conv layer. Dense forward mode pushes
K full feature maps through every conv (CNN7: 785 maps of 64x28x28); here the input is cut
into square tiles of TILE x TILE positions and each tile's coefficient images live in one
window (the same size for every tile) that follows the tile's receptive field, so the
convolutions run on windows, like the back-substitution windows (conv_windows.py) do in the
other direction. Windows may reach past the feature map; positions outside it are kept at
zero (masked after every convolution). A node whose windows would cover most of its map, or
whose op has no window rule (anything but convolutions, per-channel affine maps and
element-wise activations), is turned dense.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir

TILE = 4  # input positions per tile side (CNN7 on MNIST: 49 tiles)
DENSE_SHARE = 0.6  # a window covering more than this share of its map is not worth keeping


@dataclass
class Tiled:
    """Per-tile windows (B, G, Kg, C, h, w) of the coefficient maps mc and dc (None: zero) of a
    (C, H, W) node; tile g's window starts at (tops[g], lefts[g]) of the map. `index` (G, Kg):
    the input coordinate of every coefficient image. m0 and d0 stay dense (B, C, H, W)."""

    mc: Tensor
    dc: Optional[Tensor]
    m0: Tensor
    d0: Optional[Tensor]
    tops: list
    lefts: list
    index: Tensor
    shape: tuple  # (C, H, W)
    table: Optional[tuple] = field(default=None, repr=False, compare=False)  # _position_table's


def initial(box_center: Tensor, radius: Tensor) -> Optional[Tiled]:
    """The input's coefficients x = c + r e as tiles, or None when the input is not (C, H, W)
    with sides divisible by TILE."""
    if box_center.dim() != 4:
        return None
    B, C, H, W = box_center.shape
    if H % TILE or W % TILE or H * W <= 4 * TILE * TILE:
        return None
    ty, tx = H // TILE, W // TILE
    G, Kg = ty * tx, C * TILE * TILE
    coords = torch.arange(C * H * W, device=radius.device).reshape(C, ty, TILE, tx, TILE)
    index = coords.permute(1, 3, 0, 2, 4).reshape(G, Kg)  # tile-major, then channel, row, column
    r = radius.reshape(B, C, ty, TILE, tx, TILE).permute(0, 2, 4, 1, 3, 5).reshape(B, G, Kg)
    eye = torch.eye(Kg, device=radius.device, dtype=radius.dtype).reshape(1, 1, Kg, C, TILE, TILE)
    mc = eye * r.reshape(B, G, Kg, 1, 1, 1)
    tops = [TILE * (g // tx) for g in range(G)]
    lefts = [TILE * (g % tx) for g in range(G)]
    return Tiled(mc, None, box_center, None, tops, lefts, index, (C, H, W))


def _margins(s: Tiled, h: int, w: int, H: int, W: int) -> tuple[int, int, int, int]:
    """How far (top, left, bottom, right) the tiles' (h, w) windows reach past an (H, W) map."""
    return (max(0, -min(s.tops)), max(0, -min(s.lefts)), max(0, max(s.tops) + h - H), max(0, max(s.lefts) + w - W))


def _windows_of(t: Tensor, s: Tiled, h: int, w: int) -> Tensor:
    """(B', C', h, w) windows of a dense (B', C', H, W) map at every tile: (B', G, C', h, w),
    zero outside the map."""
    H, W = t.shape[-2:]
    top, left, bottom, right = _margins(s, h, w, H, W)
    p = F.pad(t, (left, right, top, bottom))
    return torch.stack([p[..., a + top: a + top + h, b + left: b + left + w] for a, b in zip(s.tops, s.lefts)], 1)


def _sum_windows(win: Tensor, s: Tiled, shape: tuple) -> Tensor:
    """Add per-tile windows (B, G, C, h, w) into a dense (B, C, H, W) map (cropping)."""
    B, G, C, h, w = win.shape
    H, W = shape[-2:]
    top, left, bottom, right = _margins(s, h, w, H, W)
    out = win.new_zeros(B, C, H + top + bottom, W + left + right)
    for g, (a, b) in enumerate(zip(s.tops, s.lefts)):
        out[..., a + top: a + top + h, b + left: b + left + w] += win[:, g]
    return out[..., top: top + H, left: left + W]


def densify(s: Tiled, t: Optional[Tensor], K: int) -> Optional[Tensor]:
    """A dense (B, K, C, H, W) coefficient tensor from tile windows `t` of `s` (None stays None)."""
    if t is None:
        return None
    B, G, Kg, C, h, w = t.shape
    _, H, W = s.shape
    # written straight into the map, each window cut to it (tiles hold disjoint coordinates):
    # no padded copy to crop and make contiguous again (CNN7: 177 MB zeroed, 79 MB copied)
    out = t.new_zeros(B, K, C, H, W)
    for g, (a, b) in enumerate(zip(s.tops, s.lefts)):
        r0, r1, c0, c1 = max(a, 0), min(a + h, H), max(b, 0), min(b + w, W)
        if r0 < r1 and c0 < c1:
            out[:, s.index[g], :, r0:r1, c0:c1] = t[:, g, :, :, r0 - a: r1 - a, c0 - b: c1 - b]
    return out


def bounds(s: Tiled) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (B, C, H, W) of the node: (m0 - d0) - sum |mc - dc| and its mirror."""
    lo_c = s.mc if s.dc is None else s.mc - s.dc
    hi_c = s.mc if s.dc is None else s.mc + s.dc
    lo = s.m0 - _sum_windows(lo_c.abs().sum(2), s, s.shape)
    hi = s.m0 + _sum_windows(hi_c.abs().sum(2), s, s.shape)
    if s.d0 is not None:
        lo, hi = lo - s.d0, hi + s.d0
    return lo, hi


def _per_channel(t: Optional[Tensor]) -> bool:
    """Is a constant of an element-wise affine op the same at every position (and sample)?"""
    if t is None or t.numel() == 1:
        return True
    return t.dim() >= 3 and t.shape[-1] == 1 and t.shape[-2] == 1 and (t.dim() < 4 or t.shape[0] == 1)


def conv(op: ir.Conv2d, s: Tiled, out_shape: tuple, m0: Tensor, d0: Optional[Tensor]) -> Optional[Tiled]:
    """The windows after a convolution (None: they would cover most of the map, or tiles would
    get windows of different sizes)."""
    B, G, Kg, C, h, w = s.mc.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.weight.shape[-2:], op.stride, op.padding, op.dilation
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    Co, Ho, Wo = out_shape
    # outputs o whose receptive rows o*s - p ... o*s - p + e - 1 meet the window a ... a + h - 1
    tops = [-((eh - 1 - ph - a) // sh) for a in s.tops]  # ceil((a + p - e + 1) / s)
    lefts = [-((ew - 1 - pw - b) // sw) for b in s.lefts]
    ends_h = [(a + h - 1 + ph) // sh for a in s.tops]
    ends_w = [(b + w - 1 + pw) // sw for b in s.lefts]
    # the input rows those outputs read, relative to each window (negative: cropped)
    pads = {(a - (t * sh - ph), (e * sh - ph + eh - 1) - (a + h - 1), b - (l * sw - pw),
             (f * sw - pw + ew - 1) - (b + w - 1), e - t + 1, f - l + 1)
            for a, t, e, b, l, f in zip(s.tops, tops, ends_h, s.lefts, lefts, ends_w)}
    if len(pads) != 1:  # tiles at different offsets to the stride: no common window
        return None
    pad_t, pad_b, pad_l, pad_r, ho, wo = pads.pop()
    if ho * wo > DENSE_SHARE * Ho * Wo:
        return None

    def apply(t: Tensor, weight: Tensor) -> Tensor:
        x = F.pad(t.reshape(B * G * Kg, C, h, w), (pad_l, pad_r, pad_t, pad_b))
        y = F.conv2d(x, weight, None, op.stride, 0, op.dilation, op.groups)
        return y.reshape(B, G, Kg, Co, ho, wo)

    rows = torch.tensor(tops, device=m0.device).reshape(G, 1) + torch.arange(ho, device=m0.device)
    cols = torch.tensor(lefts, device=m0.device).reshape(G, 1) + torch.arange(wo, device=m0.device)
    inside = ((rows >= 0) & (rows < Ho)).reshape(G, ho, 1) & ((cols >= 0) & (cols < Wo)).reshape(G, 1, wo)
    mask = inside.to(m0.dtype).reshape(1, G, 1, 1, ho, wo)  # positions past the map stay zero
    mc = apply(s.mc, op.weight) * mask
    dc = None if s.dc is None else apply(s.dc, op.weight.abs()) * mask
    return Tiled(mc, dc, m0, d0, tops, lefts, s.index, out_shape)


def channel_affine(op: ir.Op, s: Tiled, m0: Tensor, d0: Optional[Tensor], ctx) -> Optional[Tiled]:
    """A BatchNorm or per-channel ElementwiseAffine on windows (None: not per-channel)."""
    if isinstance(op, ir.BatchNorm):
        scale, _ = op.scale_shift(m0, ctx, record=False)
    elif isinstance(op, ir.ElementwiseAffine) and _per_channel(op.scale) and _per_channel(op.shift):
        scale = op.scale
    else:
        return None
    if scale is None:
        return Tiled(s.mc, s.dc, m0, d0, s.tops, s.lefts, s.index, s.shape)
    scale = scale.reshape(-1, 1, 1) if scale.numel() > 1 else scale.reshape(())
    mc = s.mc * scale
    dc = None if s.dc is None else s.dc * scale.abs()
    return Tiled(mc, dc, m0, d0, s.tops, s.lefts, s.index, s.shape)


def activation(s: Tiled, a_l: Tensor, a_u: Tensor, m0: Tensor, d0: Tensor) -> Tiled:
    """Lines with slopes a_l, a_u (B, C, H, W) >= 0 applied to the lower and upper functions."""
    h, w = s.mc.shape[-2:]
    al = _windows_of(a_l, s, h, w).unsqueeze(2)
    au = _windows_of(a_u, s, h, w).unsqueeze(2)
    if s.dc is None:
        mc, dc = s.mc * ((al + au) / 2), s.mc * ((au - al) / 2)
    else:
        lo_c, hi_c = al * (s.mc - s.dc), au * (s.mc + s.dc)
        mc, dc = (hi_c + lo_c) / 2, (hi_c - lo_c) / 2
    return Tiled(mc, dc, m0, d0, s.tops, s.lefts, s.index, s.shape)


def same_geometry(states: list) -> bool:
    first = states[0]
    return all(isinstance(t, Tiled) and t.tops == first.tops and t.lefts == first.lefts
               and t.mc.shape == first.mc.shape for t in states)


def add(states: list, m0: Tensor, d0: Optional[Tensor]) -> Tiled:
    """The sum of nodes whose windows coincide."""
    first = states[0]
    mc = sum(t.mc for t in states)
    dcs = [t.dc for t in states if t.dc is not None]
    dc = sum(dcs) if dcs else None
    return Tiled(mc, dc, m0, d0, first.tops, first.lefts, first.index, first.shape)



def contract(s: Tiled, lam: Tensor, top: int, left: int, K: int) -> tuple[Tensor, Tensor]:
    """<lam, M> - <|lam|, D> for coefficients lam (B, m, C, hh, ww) placed at (top, left) of the
    node's map: (const (B, m), coefficients on e (B, m, K)). Through the node's position table
    (`_position_table`): a batched product over the window's positions (one per number of
    filled slots), and an index_add of the slots into their input coordinates. (Tile by tile,
    the overlaps of lam and of each tile's window took two strided copies each: CNN7's 5th
    conv rows, ~35 tiles x 49 row chunks, spent ~1 s copying and 0.3 s in 1,700 products.)"""
    B, m, C, hh, ww = lam.shape
    _, H, W = s.shape
    mag = lam.abs() if s.dc is not None or s.d0 is not None else None
    r0, r1, c0, c1 = max(top, 0), min(top + hh, H), max(left, 0), min(left + ww, W)
    if r0 >= r1 or c0 >= c1:  # lam lies off the map: no coefficients on e
        coef = lam.new_zeros(B, m, K)
    else:
        mc, dc, index, filled = _position_table(s)
        local = (torch.arange(r0 - top, r1 - top, device=lam.device).reshape(-1, 1) * ww
                 + torch.arange(c0 - left, c1 - left, device=lam.device)).reshape(-1)
        pos = (torch.arange(r0, r1, device=lam.device).reshape(-1, 1) * W
               + torch.arange(c0, c1, device=lam.device)).reshape(-1)
        fills = filled[pos]
        total = lam.new_zeros(B, K + 1, m)  # column K: the empty slots
        # (B, hh*ww, C, m): each position's coefficients one contiguous block, for the gathers
        by_pos = lam.reshape(B, m, C, hh * ww).permute(0, 3, 2, 1).contiguous()
        by_pos_mag = None if dc is None else by_pos.abs()
        # positions grouped by how many slots they fill: a product over the filled slots only
        # (CNN7's 5th conv rows: 58% of the most slots filled on average)
        for f in sorted(set(fills.tolist())):
            at = (fills == f).nonzero().flatten()
            n, p, q = at.numel(), pos[at], local[at]
            got = torch.bmm(mc[:, p, :f].reshape(B * n, f, C), by_pos[:, q].reshape(B * n, C, m))
            if dc is not None:
                got = got - torch.bmm(dc[:, p, :f].reshape(B * n, f, C), by_pos_mag[:, q].reshape(B * n, C, m))
            total.index_add_(1, index[p, :f].reshape(-1), got.reshape(B, n * f, m))
        coef = total[:, :K].transpose(1, 2)
    region = lambda t: t[..., top: top + hh, left: left + ww].reshape(B, 1, -1)
    flat = lam.reshape(B, m, -1)
    const = (flat * region(s.m0)).sum(-1)
    if s.d0 is not None:
        const = const - (mag.reshape(B, m, -1) * region(s.d0)).sum(-1)
    return const, coef


def _position_table(s: Tiled) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """The tiles' windows regrouped by position of the (H, W) map, built once per state:
    (mc (B, H*W, P, C), dc likewise or None, index (H*W, P), filled (H*W,)). Slot q at position
    p holds the coefficients over the C channels of input coordinate index[p, q]; P is the most
    slots any position has (tiles covering it times Kg), position p fills its first filled[p];
    an empty slot has index K (the number of input coordinates, which the tiles' indices cover)
    and zero coefficients."""
    if s.table is not None:
        return s.table
    B, G, Kg, C, h, w = s.mc.shape
    _, H, W = s.shape
    device = s.mc.device
    covered = [0] * (H * W)  # tiles covering each position so far
    picks = []  # per tile: (its positions inside the map, their slot, the window's cut)
    for a, b in zip(s.tops, s.lefts):
        r0, r1, c0, c1 = max(a, 0), min(a + h, H), max(b, 0), min(b + w, W)
        if r0 >= r1 or c0 >= c1:
            picks.append(None)
            continue
        pos = [r * W + c for r in range(r0, r1) for c in range(c0, c1)]
        slots = [covered[p] for p in pos]
        for p in pos:
            covered[p] += 1
        picks.append((pos, slots, (r0 - a, r1 - a, c0 - b, c1 - b)))
    per_position = max(covered)
    P = per_position * Kg
    index = torch.full((H * W, per_position, Kg), s.index.numel(), dtype=torch.long, device=device)
    tables = []
    for t in (s.mc, s.dc):
        if t is None:
            tables.append(None)
            continue
        table = t.new_zeros(B, H * W, per_position, Kg, C)
        for g, pick in enumerate(picks):
            if pick is None:
                continue
            pos, slots, (i0, i1, j0, j1) = pick
            win = t[:, g, :, :, i0:i1, j0:j1]  # (B, Kg, C, oh, ow)
            p = torch.tensor(pos, device=device)
            q = torch.tensor(slots, device=device)
            table[:, p, q] = win.permute(0, 3, 4, 1, 2).reshape(B, len(pos), Kg, C)
            if t is s.mc:
                index[p, q] = s.index[g]
        tables.append(table.reshape(B, H * W, P, C))
    filled = torch.tensor(covered, device=device) * Kg
    s.table = (tables[0], tables[1], index.reshape(H * W, P), filled)
    return s.table
