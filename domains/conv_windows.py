"""Backward rules for convolution-like ops: Conv2d, and non-overlapping AvgPool2d.

The transpose of a convolution is a transposed convolution. For dense coefficients (B, m, C,
H, W) one transposed convolution over the B*m rows replaces the generic vector-Jacobian
product vmapped over the rows (same maths, without vmap's per-op overhead). For windowed
coefficients (`Window`: zero outside a small spatial window) it runs on the window only, and
the result is the window of the input it reaches. Where the convolution has very few input
channels (the first layer: 1 or 3), torch's transposed convolution is slow on CPU, and the
same sums are formed as one matrix product with the weight followed by `fold` (col2im). Where
the stride divides the kernel and the channels are few (the first layers of small CNNs: 4x4
kernels at stride 2), the transposed convolution is split into its stride phases: each output
phase is an ordinary convolution of the coefficients with a sub-kernel, all phases are one
`conv2d` call, interleaved after (CPU timings in `_phase_transpose`).

Average pooling with kernel = stride and no padding (the common 2x2 pooling) spreads each
coefficient, divided by the window size, over its window: an expand, exact, and windowed too,
so rows of a conv layer after such a pooling no longer fall back to the dense form there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir


FEW_CHANNELS = 3  # transposed convolutions onto at most this many channels go through fold
# strided transposed convolutions with at most this many input times output channels (of the
# forward conv) go through their stride phases: torch's strided conv_transpose2d is slow there
# on CPU (16 x 16: 1.1-2.7x faster by phases; 16 x 32: as fast either way; 32 x 32: 0.7-0.95x)
PHASE_CHANNELS = 256


class Window:
    """Coefficients (B, m, C, h, w) that are zero outside the spatial window starting at
    (top, left) of a (C, H, W) node: rows started at nearby neurons of a conv layer touch only
    their receptive field, so convolutions run on the window instead of the whole map."""

    __slots__ = ("lam", "top", "left")

    def __init__(self, lam: Tensor, top: int, left: int):
        self.lam, self.top, self.left = lam, top, left

    def region(self, t: Tensor) -> Tensor:
        """The window's part of a per-sample tensor (B, C, H, W) (or broadcastable)."""
        if t.dim() < 4 or t.shape[-2] == 1 and t.shape[-1] == 1:
            return t
        h, w = self.lam.shape[-2:]
        return t[..., self.top:self.top + h, self.left:self.left + w]

    def dense(self, shape: tuple) -> Tensor:
        h, w = self.lam.shape[-2:]
        H, W = shape[-2:]
        return F.pad(self.lam, (self.left, W - self.left - w, self.top, H - self.top - h))

    def resized(self, top: int, left: int, h: int, w: int) -> Tensor:
        """The coefficients placed in a larger window (top, left, h, w) containing this one."""
        lh, lw = self.lam.shape[-2:]
        dt, dl = self.top - top, self.left - left
        return F.pad(self.lam, (dl, w - dl - lw, dt, h - dt - lh))


def accumulate(a, b, shape: tuple):
    """Sum of two coefficient blocks (dense tensors or Windows) for a node of `shape`."""
    if a is None:
        return b
    if isinstance(a, Window) and isinstance(b, Window):
        top, left = min(a.top, b.top), min(a.left, b.left)
        h = max(a.top + a.lam.shape[-2], b.top + b.lam.shape[-2]) - top
        w = max(a.left + a.lam.shape[-1], b.left + b.lam.shape[-1]) - left
        return Window(a.resized(top, left, h, w) + b.resized(top, left, h, w), top, left)
    a = a.dense(shape) if isinstance(a, Window) else a
    b = b.dense(shape) if isinstance(b, Window) else b
    return a + b


def _transpose(lam: Tensor, weight: Tensor, stride: tuple, padding: tuple, dilation: tuple, groups: int,
               out_hw: tuple, phases: Optional[Tensor] = None) -> Tensor:
    """The transposed convolution of lam (N, C_out, h, w) onto an (N, C_in, *out_hw) map
    (`phases`: the weight's `phase_kernel`, where the caller keeps it)."""
    N, C_out, h, w = lam.shape
    C_in, kh, kw = weight.shape[1:]
    if _phases_pay(weight, stride, dilation, groups):
        return _phase_transpose(lam, phase_kernel(weight, stride) if phases is None else phases, C_in, stride,
                                padding, out_hw)
    if groups == 1 and C_in <= FEW_CHANNELS and tuple(dilation) == (1, 1):
        cols = torch.matmul(weight.reshape(C_out, C_in * kh * kw).t(), lam.reshape(N, C_out, h * w))
        return F.fold(cols, out_hw, (kh, kw), padding=padding, stride=stride)
    pad = []
    for size, n, k, s, p, d in ((out_hw[0], h, kh, stride[0], padding[0], dilation[0]),
                                (out_hw[1], w, kw, stride[1], padding[1], dilation[1])):
        pad.append(size - ((n - 1) * s - 2 * p + d * (k - 1) + 1))
    return F.conv_transpose2d(lam, weight, None, stride, padding, tuple(pad), groups, dilation)


def _phases_pay(weight: Tensor, stride: tuple, dilation: tuple, groups: int) -> bool:
    C_out, C_in, kh, kw = weight.shape
    return (groups == 1 and tuple(dilation) == (1, 1) and max(stride) > 1 and kh % stride[0] == 0
            and kw % stride[1] == 0 and C_in * C_out <= PHASE_CHANNELS)


def phase_kernel(weight: Tensor, stride: tuple) -> Tensor:
    """The sub-kernels of every stride phase as one conv2d weight (C_in * s_h * s_w, C_out, kh / s_h,
    kw / s_w): sub[c_in, p, q, c_out, i, j] = weight[c_out, c_in, p + s_h i, q + s_w j], flipped in
    i and j (a convolution is a correlation with the flipped kernel)."""
    C_out, C_in, kh, kw = weight.shape
    sh, sw = stride
    sub = weight.reshape(C_out, C_in, kh // sh, sh, kw // sw, sw).permute(1, 3, 5, 0, 2, 4).flip(-2, -1)
    return sub.reshape(C_in * sh * sw, C_out, kh // sh, kw // sw)


def _phase_transpose(lam: Tensor, kernel: Tensor, C_in: int, stride: tuple, padding: tuple, out_hw: tuple) -> Tensor:
    """conv_transpose2d(lam, weight, stride, padding) on an (N, C_in, *out_hw) map, by phases:
    output row s*a + p only receives kernel rows p, p + s, ... (the sub-kernel of phase p), so
    phase p is the full convolution of lam with that sub-kernel. One conv2d computes every
    phase (as s_h * s_w groups of output channels), a reshape interleaves them. The same
    products, summed in another order. (2 threads, CPU: oval21-style 3 <- 8 channels, 4x4/2,
    20000 rows of 3x3: 117 ms -> 17 ms; 8 <- 16 on 6400 dense 8x8 rows: 170 -> 138 ms; at stride
    1, or with 32 <- 64 channels, torch's own is faster.)"""
    N = lam.shape[0]
    sh, sw = stride
    Kh, Kw = kernel.shape[-2:]
    y = F.conv2d(lam, kernel, None, 1, (Kh - 1, Kw - 1))
    H, W = y.shape[-2:]
    y = y.view(N, C_in, sh, sw, H, W)
    # the transposed convolution's output is the interleaved phases from row ph, column pw on
    # (zeros past their end). Small outputs: each phase is copied straight into its rows and
    # columns of the output, interleaving and cropping in one pass (0.45 -> 0.26 ms for 200
    # rows 8 -> 3 channels onto 32 x 32); large ones: one permuted copy and a cropping pad,
    # whose contiguous writes ran faster there (oval21-style CNN at batch 32: x0.93 otherwise)
    (ph, pw), (oh, ow) = padding, out_hw
    if N * C_in * oh * ow > STRIDED_INTERLEAVE:
        full = y.permute(0, 1, 4, 2, 5, 3).reshape(N, C_in, H * sh, W * sw)
        return F.pad(full, (-pw, ow + pw - W * sw, -ph, oh + ph - H * sh))
    out = torch.empty((N, C_in, oh, ow), dtype=y.dtype, device=y.device)
    for i in range(min(sh, oh)):  # output rows i, i + sh, ...: phase (ph + i) % sh from its row (ph + i) // sh
        p, a0 = (ph + i) % sh, (ph + i) // sh
        rows = out[:, :, i::sh]
        n = max(0, min(rows.shape[2], H - a0))
        for j in range(min(sw, ow)):
            q, b0 = (pw + j) % sw, (pw + j) // sw
            cell = rows[:, :, :, j::sw]
            m = max(0, min(cell.shape[3], W - b0))
            cell[:, :, :n, :m] = y[:, :, p, q, a0:a0 + n, b0:b0 + m]
            if n < cell.shape[2]:
                cell[:, :, n:] = 0
            if m < cell.shape[3]:
                cell[:, :, :n, m:] = 0
    return out


# the largest output (elements) of a phase transpose interleaved by strided copies
STRIDED_INTERLEAVE = 1 << 21


@dataclass
class ConvForm:
    weight: Optional[Tensor]  # None: a non-overlapping average pooling of window `stride`
    bias: Optional[Tensor]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    _phases: Optional[Tensor] = field(default=None, repr=False)

    def phases(self) -> Optional[Tensor]:
        """The weight's phase_kernel where the transposed convolution goes through phases (formed
        once per engine: the engine's ConvForms live as long as its weights do not change)."""
        if self._phases is None and _phases_pay(self.weight, self.stride, self.dilation, self.groups):
            self._phases = phase_kernel(self.weight, self.stride)
        return self._phases


def conv_form(op: ir.Op) -> Optional[ConvForm]:
    """The op as a convolution, or None when it is not one."""
    if isinstance(op, ir.Conv2d):
        return ConvForm(op.weight, op.bias, tuple(op.stride), tuple(op.padding), tuple(op.dilation), op.groups)
    # ceil_mode can add a last, partial window that averages fewer entries: the generic rule
    if (isinstance(op, ir.AvgPool2d) and tuple(op.kernel) == tuple(op.stride) and tuple(op.padding) == (0, 0)
            and not op.ceil_mode):
        return ConvForm(None, None, tuple(op.stride), (0, 0), (1, 1), 0)  # weight None: the pooling
    return None


def _spread(lam: Tensor, k: tuple) -> Tensor:
    """Average-pooling transpose on (N, C, h, w): each entry / (kh kw) over its kh x kw window."""
    N, C, h, w = lam.shape
    g = (lam / (k[0] * k[1]))[:, :, :, None, :, None].expand(N, C, h, k[0], w, k[1])
    return g.reshape(N, C, h * k[0], w * k[1])


def dense_backward(conv: ConvForm, lam: Tensor, in_shape: tuple):
    """(coefficients on the input (B, m, *in_shape), constant (B, m) or None), or None when
    the output size does not fit a convolution of the input (the generic rule then runs)."""
    B, m, C_out, h, w = lam.shape
    H, W = in_shape[-2:]
    if conv.weight is None:
        g = _spread(lam.reshape(B * m, C_out, h, w), conv.stride)
        g = F.pad(g, (0, W - g.shape[-1], 0, H - g.shape[-2]))  # floor mode leaves the last rows out
        return g.reshape((B, m) + tuple(in_shape)), None
    kh, kw = conv.weight.shape[-2:]
    for size, n, k, s, p, d in ((H, h, kh, conv.stride[0], conv.padding[0], conv.dilation[0]),
                                (W, w, kw, conv.stride[1], conv.padding[1], conv.dilation[1])):
        if not 0 <= size - ((n - 1) * s - 2 * p + d * (k - 1) + 1) < max(s, d):
            return None
    g = _transpose(lam.reshape(B * m, C_out, h, w), conv.weight, conv.stride, conv.padding, conv.dilation,
                   conv.groups, (H, W), conv.phases())
    const = lam.sum((-2, -1)) @ conv.bias if conv.bias is not None else None
    return g.reshape((B, m) + tuple(in_shape)), const


def window_backward(conv: ConvForm, win: Window, in_shape: tuple):
    """(Window on the input, constant (B, m) or None) for coefficients `win` (a Window)."""
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    B, m, C_out, h, w = win.lam.shape
    if conv.weight is None:  # the pooling windows of the coefficients' window
        g = _spread(win.lam.reshape(B * m, C_out, h, w), conv.stride)
        return Window(g.reshape((B, m) + g.shape[1:]), win.top * sh, win.left * sw), None
    kh, kw = conv.weight.shape[-2:]
    full = ((h - 1) * sh + dh * (kh - 1) + 1, (w - 1) * sw + dw * (kw - 1) + 1)
    g = _transpose(win.lam.reshape(B * m, C_out, h, w), conv.weight, (sh, sw), (0, 0), (dh, dw), conv.groups, full,
                   conv.phases())
    H, W = in_shape[-2:]
    t0, l0 = win.top * sh - ph, win.left * sw - pw  # input position of g's corner
    r0, r1 = max(t0, 0), min(t0 + g.shape[-2], H)
    c0, c1 = max(l0, 0), min(l0 + g.shape[-1], W)
    if r1 <= r0 or c1 <= c0:  # the window lies entirely in the padding: no input reaches it
        r0, c0 = min(r0, H - 1), min(c0, W - 1)
        r1, c1 = r0 + 1, c0 + 1
        g = torch.zeros(g.shape[:-2] + (1, 1), device=g.device, dtype=g.dtype)
    else:
        g = g[..., r0 - t0:r1 - t0, c0 - l0:c1 - l0]  # positions outside the map are padding
    const = win.lam.sum((-2, -1)) @ conv.bias if conv.bias is not None else None
    return Window(g.reshape((B, m) + g.shape[1:]), r0, c0), const
