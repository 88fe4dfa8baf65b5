"""ONNX import of piecewise-linear ops as exact compositions of ReLU and affine ops, so every
domain bounds them with what it already has (the ReLU relaxations of domains/relaxations.py,
the MILP's exact ReLU encoding; nothing is approximated):

    Clip(x, a, b) = a + relu(x - a) - relu(x - b)      (Relu6 = Clip(x, 0, 6); a or b may be absent)
    Abs(x)        = relu(x) + relu(-x)
    Max(x, y)     = y + relu(x - y),   Min(x, y) = x - relu(x - y)   (two data tensors of one
                                                                      shape, or data and a constant)

A mixin of the importer (which provides `_elementwise`, `_const_on_ir`, `_two_data`).
"""
from __future__ import annotations

import numpy as np

from . import ir
from .onnx_shape_ops import Unsupported, Var


class PiecewiseOps:
    def _relu_of(self, name: str, v: Var) -> Var:
        return Var(self.builder.add(name, ir.ReLU(), [v.node]), v.batched)

    def _affine(self, name: str, v: Var, scale=None, shift=None) -> Var:
        op = ir.ElementwiseAffine(None if scale is None else self.t(scale), None if shift is None else self.t(shift))
        out = self.builder.add(name, op, [v.node])
        if self.builder.shape(out) != self.builder.shape(v.node):
            raise Unsupported("constant broadcasting changes the data shape")
        return Var(out, v.batched)

    def _sum(self, name: str, a: Var, b: Var) -> Var:
        return Var(self.builder.add(name, ir.Add(), [a.node, b.node]), a.batched)

    def _clip_bound(self, node, a, pos: int, attr: str):
        if len(node.input) > pos and node.input[pos]:
            c = self._const_input(node, pos, attr)
            if c.size != 1:
                raise Unsupported(f"{attr} must be a scalar")
            return float(c.reshape(-1)[0])
        return float(a[attr]) if attr in a else None

    def op_Clip(self, node, a):
        v = self.vars[node.input[0]]
        lo, hi = self._clip_bound(node, a, 1, "min"), self._clip_bound(node, a, 2, "max")
        if lo is not None and hi is not None and lo > hi:
            raise Unsupported(f"min {lo} > max {hi}")
        name = node.name or "clip"
        if lo is None and hi is None:
            return v
        if hi is None:  # lo + relu(x - lo)
            r = self._relu_of(name + "_relu_lo", self._affine(name + "_minus_lo", v, shift=np.array(-lo)))
            return self._affine(name, r, shift=np.array(lo))
        # both bounds: lo + relu(x - lo) - relu(x - hi)
        upper = self._relu_of(name + "_relu_hi", self._affine(name + "_minus_hi", v, shift=np.array(-hi)))
        neg_upper = self._affine(name + "_neg_hi", upper, scale=np.array(-1.0))
        if lo is None:  # x - relu(x - hi)
            return self._sum(name, v, neg_upper)
        lower = self._relu_of(name + "_relu_lo", self._affine(name + "_minus_lo", v, shift=np.array(-lo)))
        return self._affine(name, self._sum(name + "_sum", lower, neg_upper), shift=np.array(lo))

    def op_Abs(self, node, a):
        v = self.vars[node.input[0]]
        name = node.name or "abs"
        pos = self._relu_of(name + "_pos", v)
        neg = self._relu_of(name + "_neg", self._affine(name + "_flip", v, scale=np.array(-1.0)))
        return self._sum(name, pos, neg)

    def _max_min(self, node, is_max: bool) -> Var:
        name = node.name or ("max" if is_max else "min")
        if len(node.input) == 1:
            return self.vars[node.input[0]]
        if len(node.input) != 2:
            raise Unsupported(f"{len(node.input)} inputs (two are supported)")
        pair = self._two_data(node)
        if pair is not None:
            x, y = pair
            neg_y = self._affine(name + "_neg", y, scale=np.array(-1.0))
            diff = self._sum(name + "_diff", x, neg_y)  # x - y
            r = self._relu_of(name + "_relu", diff)
            if is_max:
                return self._sum(name, y, r)  # y + relu(x - y)
            return self._sum(name, x, self._affine(name + "_negrelu", r, scale=np.array(-1.0)))  # x - relu(x - y)
        v, c, _ = self.var_and_const(node)
        c = self._const_on_ir(v, c)
        # max(x, c) = c + relu(x - c); min(x, c) = c - relu(c - x)
        inner = self._affine(name + "_diff", v, scale=None if is_max else np.array(-1.0), shift=-c if is_max else c)
        r = self._relu_of(name + "_relu", inner)
        return self._affine(name, r, scale=None if is_max else np.array(-1.0), shift=c)

    def op_Max(self, node, a):
        return self._max_min(node, True)

    def op_Min(self, node, a):
        return self._max_min(node, False)
