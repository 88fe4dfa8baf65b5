"""IR ops beyond the core set of ir.py (imported by it and listed in `ir.ALL_OP_TYPES`).

`Take` selects elements along one axis by constant indices: ONNX Slice (any steps, negative
ones included), Gather with constant indices and each output of Split import as a Take. It is
affine and exact (it only moves values), so every domain gets it through the affine mechanism:
Box through `abs_linear`, back-substitution through the VJP, the MILP through its basis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
