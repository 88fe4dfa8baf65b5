"""ONNX import of products of two data tensors (bilinear ops) onto the IR's `Mul`:

    Mul(x, y)     = ir.Mul, per-sample dimensions of size 1 broadcast (numpy rules)
    MatMul(x, y)  = sum_k x[..., n, k, 1] * y[..., 1, k, m]: a Reshape of each factor, one Mul
                    (broadcast to (..., n, k, m)), a Transpose that puts k last and a Linear
                    with a row of ones, then a Reshape to (..., n, m)

so each product term x_nk y_km gets its own bilinear relaxation and the sum is exact.
Supported: both factors with the batch dimension (or both without one); MatMul needs rank >= 2
on both sides (a batched factor: rank >= 3, the batch dimension broadcast as 1 x 1).

A mixin of the importer (which provides `builder`, `onnx_shape`, `reshape_to`, `t`).
"""
from __future__ import annotations

import numpy as np

from . import ir
from .onnx_shape_ops import Unsupported, Var


def _broadcast(a: tuple, b: tuple) -> tuple:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise Unsupported(f"shapes {list(a)} and {list(b)} do not broadcast") from None


class BilinearOps:
    def _same_rank(self, name: str, v: Var, rank: int) -> Var:
        """v reshaped with leading size-1 dimensions to `rank` (ONNX coordinates, un-batched v)."""
        s = self.onnx_shape(v)
        return v if len(s) == rank else self.reshape_to(name, v, (1,) * (rank - len(s)) + tuple(s))

    def _factors(self, node, x: Var, y: Var) -> tuple[Var, Var]:
        if x.batched != y.batched:
            raise Unsupported("a product of a batched and an un-batched data tensor is not supported")
        sx, sy = self.onnx_shape(x), self.onnx_shape(y)
        if x.batched:
            if len(sx) != len(sy):  # right-aligned, one batch dimension would meet a data dimension
                raise Unsupported(f"broadcasting a product of data tensors of ranks {len(sx)} and {len(sy)} "
                                  "across the batch dimension")
            return x, y
        rank = max(len(sx), len(sy))
        base = node.name or node.op_type.lower()
        return self._same_rank(base + "_xrank", x, rank), self._same_rank(base + "_yrank", y, rank)

    def data_product(self, node, x: Var, y: Var) -> Var:
        x, y = self._factors(node, x, y)
        _broadcast(self.onnx_shape(x), self.onnx_shape(y))
        return Var(self.builder.add(node.name or "mul", ir.Mul(), [x.node, y.node]), x.batched)

    def data_matmul(self, node, x: Var, y: Var) -> Var:
        sx, sy = self.onnx_shape(x), self.onnx_shape(y)
        need = 3 if x.batched or y.batched else 2
        if len(sx) < need or len(sy) < need:
            raise Unsupported(f"MatMul of data tensors of shapes {list(sx)} and {list(sy)}: both need rank >= {need}")
        x, y = self._factors(node, x, y)
        sx, sy = self.onnx_shape(x), self.onnx_shape(y)
        (n, k), (k2, m) = sx[-2:], sy[-2:]
        if k != k2:
            raise Unsupported(f"MatMul of shapes {list(sx)} and {list(sy)}: inner dimensions differ")
        lead = _broadcast(sx[:-2], sy[:-2])
        base = node.name or "matmul"
        xe = self.reshape_to(base + "_x", x, tuple(sx[:-2]) + (n, k, 1))
        ye = self.reshape_to(base + "_y", y, tuple(sy[:-2]) + (1, k, m))
        terms = Var(self.builder.add(base + "_terms", ir.Mul(), [xe.node, ye.node]), x.batched)
        r = len(self.builder.shape(terms.node))  # per-sample rank: leading dims, n, k, m
        perm = tuple(range(r - 2)) + (r - 1, r - 2)  # per-sample: ..., n, m, k
        moved = self.builder.add(base + "_k_last", ir.Transpose((0,) + tuple(p + 1 for p in perm)), [terms.node])
        summed = self.builder.add(base + "_sum", ir.Linear(self.t(np.ones((1, k)))), [moved])
        return self.reshape_to(base, Var(summed, x.batched), tuple(lead) + (n, m))
