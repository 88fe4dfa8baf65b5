"""Rows of a convolution's neurons started at its input as kernels (the windowed counterpart of
`linear_rows.linear_rows`).

Neuron (c, i, j) of a Conv2d is <W[c], x at its receptive field> + b[c], and of a BatchNorm
after it scale[c] times that plus shift[c]; so the one-hot rows of such a node are, on the
convolution's input, the kernels W[c] (times scale[c]) placed at each row's receptive field,
and a constant. Starting the back-substitution there skips the transposed convolution of the
one-hot rows, which multiplies zeros almost everywhere (CNN7 at batch 1: 0.56 s of ~6.9 s in
the first step of its windowed rows). The kernels' parts in the zero padding are dropped: the
padding adds nothing to the neuron.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from verikit import ir

from .conv_windows import Window
from .linear_rows import batchnorm_constants


def conv_row_form(engine, node: Optional[ir.Node], shape: tuple, stop: Optional[str] = None) -> Optional[tuple]:
    """(Conv2d node, scale (C,) or None, shift (C,) or None) when the one-hot rows of the
    (C, H, W) node `node` can start as kernels on a convolution's input: `node` is an ungrouped
    Conv2d, or a BatchNorm reading one. Only on the fast paths, without rounding-error radii
    (the skipped node's own radius) and without captured coefficients; None otherwise."""
    if node is None or len(shape) != 3 or not engine.fast_paths or engine.errors or engine.capture:
        return None
    conv, scale, shift = node, None, None
    if isinstance(node.op, ir.BatchNorm):
        src = node.inputs[0]
        if src == engine.graph.input_name or stop == src:
            return None
        conv = engine.graph.node(src)
        if not isinstance(conv.op, ir.Conv2d):
            return None
        scale, shift = batchnorm_constants(engine, node)
        C = shape[0]
        if scale.numel() not in (1, C) or shift.numel() not in (1, C):  # not per channel: one-hot rows
            return None
        scale, shift = scale.expand(C), shift.expand(C)
    if not isinstance(conv.op, ir.Conv2d) or conv.op.groups != 1 or conv.op.weight.dim() != 4:
        return None
    return conv, scale, shift


def kernel_rows(engine, form: tuple, rows: Tensor, shape: tuple, sides: tuple = (1, -1)) -> Optional[tuple]:
    """The rows [+e_rows; -e_rows] (signs `sides`, in order) of the (C, H, W) node of `form`
    (conv_row_form) on the convolution's input: (a Window (B, len(sides) k, C_in, hh, ww),
    the constant (B, len(sides) k) or None); None where the rows' receptive fields lie in the
    padding only."""
    conv, scale, shift = form
    op = conv.op
    w, b = op.weight, op.bias
    C, H, W = shape
    _, H_in, W_in = engine.graph.shapes[conv.inputs[0]]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = w.shape[-2:], op.stride, op.padding, op.dilation
    k, B, device = rows.numel(), engine.batch, w.device
    c, h, x = rows // (H * W), (rows // W) % H, rows % W
    h0, x0 = int(h.min()), int(x.min())
    top, left = h0 * sh - ph, x0 * sw - pw  # input position of the window's corner
    hh = (int(h.max()) - h0) * sh + dh * (kh - 1) + 1
    ww = (int(x.max()) - x0) * sw + dw * (kw - 1) + 1
    kernels = w[c]  # (k, C_in, kh, kw)
    if scale is not None:
        kernels = kernels * scale[c].reshape(-1, 1, 1, 1)
    # built channels-last, by position: the rows at one position take their kernels in one
    # strided copy (a tile holds a few positions; an index_put per entry was 3x slower)
    lam = torch.zeros(k, hh, ww, w.shape[1], device=device, dtype=engine.dtype)
    placed = kernels.permute(0, 2, 3, 1)  # (k, kh, kw, C_in)
    spots: dict = {}
    for r, spot in enumerate(zip(h.tolist(), x.tolist())):
        spots.setdefault(spot, []).append(r)
    for (i, j), at in spots.items():
        at = torch.tensor(at, device=device)
        y0, x1 = (i - h0) * sh, (j - x0) * sw
        lam[at, y0: y0 + dh * (kh - 1) + 1: dh, x1: x1 + dw * (kw - 1) + 1: dw] = placed[at]
    lam = torch.cat([lam if sign > 0 else -lam for sign in sides]) if sides != (1,) else lam
    lam = lam.permute(0, 3, 1, 2)  # (len(sides) k, C_in, hh, ww)
    r0, r1, c0, c1 = max(top, 0), min(top + hh, H_in), max(left, 0), min(left + ww, W_in)
    if r0 >= r1 or c0 >= c1:
        return None
    lam = lam[:, :, r0 - top: r1 - top, c0 - left: c1 - left]  # the padding's part adds nothing
    lam = lam.unsqueeze(0).expand(B, -1, -1, -1, -1).contiguous()  # one copy: crop and layout
    const = None
    if b is not None or shift is not None:
        bias = b[c] if b is not None else torch.zeros(k, device=device, dtype=engine.dtype)
        if scale is not None:
            bias = bias * scale[c] + shift[c]
        const = torch.cat([bias if sign > 0 else -bias for sign in sides]).expand(B, -1)
    return Window(lam, r0, c0), const
