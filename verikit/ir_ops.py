"""IR ops beyond the core set of ir.py (imported by it and listed in `ir.ALL_OP_TYPES`).

`Take` selects elements along one axis by constant indices: ONNX Slice (any steps, negative
ones included), Gather with constant indices and each output of Split import as a Take. It is
affine and exact (it only moves values), so every domain gets it through the affine mechanism:
Box through `abs_linear`, back-substitution through the VJP, the MILP through its basis.
The same holds for the upsampling ops `ConvTranspose2d` (ONNX ConvTranspose) and `Resample`
(ONNX Resize in nearest / linear mode: a constant matrix per resized axis).
`Exp` (ONNX Exp) is a monotone element-wise activation, convex: its lines are in the shared
relaxation table (domains/relaxations.py); the MILP rejects it.
`Mul` is the product of two graph tensors (bilinear; ONNX Mul and MatMul of two data tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ir import Op


@dataclass(eq=False)
class Take(Op):
    """y = x.index_select(axis, index) with the selected axis reshaped to `index_shape`
    (() drops the axis: a Gather with a scalar index)."""

    axis: int  # in batched coordinates (>= 1)
    index: Tensor  # int64, flat
    index_shape: tuple
    op_type: ClassVar[str] = "Take"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        y = x.index_select(self.axis, self.index.to(x.device))
        shape = tuple(x.shape[:self.axis]) + tuple(self.index_shape) + tuple(x.shape[self.axis + 1:])
        return y.reshape(shape)

    def abs_linear(self, r, ctx=None):
        return self.forward(r)

    def describe(self) -> str:
        return f"Take(axis={self.axis}, index={tuple(self.index.tolist())[:8]}{'...' if self.index.numel() > 8 else ''}, index_shape={self.index_shape})"


@dataclass(eq=False)
class ConvTranspose2d(Op):
    """ONNX ConvTranspose on (B, C, H, W): the full transposed convolution, `output_padding`
    rows/columns appended at the end, then `crop` = (top, bottom, left, right) removed (ONNX's
    pads, which may be asymmetric), then the bias. weight: (C_in, C_out / groups, kh, kw)."""

    weight: Tensor
    bias: Optional[Tensor] = None
    stride: tuple = (1, 1)
    dilation: tuple = (1, 1)
    groups: int = 1
    output_padding: tuple = (0, 0)
    crop: tuple = (0, 0, 0, 0)
    op_type: ClassVar[str] = "ConvTranspose2d"
    is_affine: ClassVar[bool] = True

    def _apply(self, x, w, b):
        y = F.conv_transpose2d(x, w, None, self.stride, 0, 0, self.groups, self.dilation)
        oh, ow = self.output_padding
        if oh or ow:
            y = F.pad(y, (0, ow, 0, oh))
        t, bo, le, ri = self.crop
        y = y[:, :, t:y.shape[2] - bo, le:y.shape[3] - ri]
        return y if b is None else y + b.reshape(1, -1, 1, 1)

    def forward(self, x, ctx=None):
        return self._apply(x, self.weight, self.bias)

    def abs_linear(self, r, ctx=None):
        return self._apply(r, self.weight.abs(), None)


@dataclass(eq=False)
class Resample(Op):
    """y = x with each listed axis mapped by a constant matrix (n_out, n_in): ONNX Resize in
    nearest mode (one 1 per row) or linear mode (two interpolation weights per row), which is
    separable over the resized axes."""

    axes: tuple  # batched coordinates (>= 1)
    matrices: tuple  # one (n_out, n_in) tensor per axis
    op_type: ClassVar[str] = "Resample"
    is_affine: ClassVar[bool] = True

    def _apply(self, x, mats):
        for axis, m in zip(self.axes, mats):
            x = torch.movedim(torch.tensordot(x, m.to(dtype=x.dtype, device=x.device), dims=([axis], [1])), -1, axis)
        return x

    def forward(self, x, ctx=None):
        return self._apply(x, self.matrices)

    def abs_linear(self, r, ctx=None):
        return self._apply(r, tuple(m.abs() for m in self.matrices))

    def tensors(self):
        for i, m in enumerate(self.matrices):
            yield f"matrices[{i}]", m

    def to(self, device=None, dtype=None):
        return Resample(self.axes, tuple(m.to(device=device, dtype=dtype) for m in self.matrices))

    def describe(self) -> str:
        return f"Resample(axes={self.axes}, sizes={[tuple(m.shape) for m in self.matrices]})"


@dataclass(eq=False)
class Exp(Op):
    """e^x element-wise (ONNX Exp): increasing and convex."""

    op_type: ClassVar[str] = "Exp"
    is_activation: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return torch.exp(x)


@dataclass(eq=False)
class Sign(Op):
    """-1, 0 or 1 element-wise (ONNX Sign; Sign(0) = 0): non-decreasing, piecewise constant.
    Its lines are in the shared relaxation table; the MILP encodes it exactly with two binaries."""

    op_type: ClassVar[str] = "Sign"
    is_activation: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return torch.sign(x)


@dataclass(eq=False)
class Softmax(Op):
    """exp(x_i) / sum_j exp(x_j) along `axis` (batched coordinates, >= 1; ONNX Softmax-13).
    Neither affine nor element-wise: Box has an exact interval rule, the back-substitution
    engine bounds it by the constants of that interval (no coefficient flows to its input), and
    the MILP rejects it."""

    axis: int
    op_type: ClassVar[str] = "Softmax"

    def forward(self, x, ctx=None):
        return torch.softmax(x, dim=self.axis)

    def describe(self) -> str:
        return f"Softmax(axis={self.axis})"


@dataclass(eq=False)
class Mul(Op):
    """x * y of two graph tensors, per-sample dimensions of size 1 broadcast (ONNX Mul of two
    data tensors; a MatMul of two data tensors imports as Reshape + Mul + a summing Linear).
    Bilinear, neither affine nor monotone: Box takes the extreme corner products, the
    back-substitution engine the plane through the centres (x y = cy x + cx y - cx cy
    + (x - cx)(y - cy), the last term within +-rx ry), and the MILP rejects it."""

    op_type: ClassVar[str] = "Mul"

    def forward(self, x, y, ctx=None):
        return x * y
