"""ONNX import of the ops that select elements of a data tensor by constant positions: Slice
(starts/ends/axes/steps, negative values as ONNX defines them), Gather with constant indices,
Split (every output). Each becomes an IR `Take` (verikit/ir_ops.py) per selected axis. A mixin
of the importer, next to `ShapeOps` (whose `onnx_shape`/`ir_axis` it uses). The batch
dimension may only be kept whole.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import ir
from .onnx_shape_ops import Unsupported, Var


class IndexOps:
    def _take(self, name: str, v: Var, onnx_axis: int, index, index_shape: tuple) -> Var:
        index = [int(i) for i in np.asarray(index).reshape(-1)]
        if not index:
            raise Unsupported("selects no elements (an empty tensor)")
        rank = len(self.onnx_shape(v))
        axis = onnx_axis % rank
        if v.batched and axis == 0:
            if index == [0] and tuple(index_shape) == (1,):
                return v  # keeps the (single) batch entry: nothing to do
            raise Unsupported("selecting along the batch dimension")
        ir_axis = self.ir_axis(v, axis)
        idx = torch.tensor(index, dtype=torch.int64)
        op = ir.Take(ir_axis, idx, tuple(int(s) for s in index_shape))
        return Var(self.builder.add(name, op, [v.node]), v.batched)

    def _const_input(self, node, pos: int, what: str):
        if pos < len(node.input) and node.input[pos]:
            if node.input[pos] not in self.consts:
                raise Unsupported(f"{what} (input {pos}) must be a constant")
            return np.asarray(self.consts[node.input[pos]])
        return None

    def op_Slice(self, node, a):
        v = self.vars[node.input[0]]
        shape = self.onnx_shape(v)
        starts = self._const_input(node, 1, "starts")
        if starts is None:  # Slice-1: attributes
            starts, ends, axes, steps = a.get("starts"), a.get("ends"), a.get("axes"), None
            if starts is None or ends is None:
                raise Unsupported("Slice without starts/ends")
        else:
            ends = self._const_input(node, 2, "ends")
            axes = self._const_input(node, 3, "axes")
            steps = self._const_input(node, 4, "steps")
        starts = [int(s) for s in np.asarray(starts).reshape(-1)]
        ends = [int(e) for e in np.asarray(ends).reshape(-1)]
        axes = list(range(len(starts))) if axes is None else [int(x) for x in np.asarray(axes).reshape(-1)]
        steps = [1] * len(starts) if steps is None else [int(s) for s in np.asarray(steps).reshape(-1)]
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise Unsupported("starts, ends, axes and steps differ in length")
        if any(s == 0 for s in steps):
            raise Unsupported("a step of 0")
        axes = [x + len(shape) if x < 0 else x for x in axes]
        if any(not 0 <= x < len(shape) for x in axes) or len(set(axes)) != len(axes):
            raise Unsupported(f"axes {axes} out of range or repeated for rank {len(shape)}")
        out = v
        for k, (ax, st, en, sp) in enumerate(sorted(zip(axes, starts, ends, steps))):
            # ONNX Slice clamps exactly as Python slicing does (negative values count from the end)
            index = list(range(shape[ax]))[slice(st, en, sp)]
            if index == list(range(shape[ax])):
                continue
            out = self._take(f"{node.name or 'slice'}" + (f"_{k}" if len(axes) > 1 else ""), out, ax, index,
                             (len(index),))
        return out

    def op_Gather(self, node, a):
        v = self.vars[node.input[0]]
        indices = self._const_input(node, 1, "indices")
        if indices is None or indices.dtype.kind not in "iu":
            raise Unsupported("indices must be a constant integer tensor")
        shape = self.onnx_shape(v)
        axis = int(a.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape):
            raise Unsupported(f"axis {axis} out of range for rank {len(shape)}")
        dim = shape[axis]
        flat = indices.astype(np.int64).reshape(-1)
        if np.any(flat < -dim) or np.any(flat >= dim):
            raise Unsupported(f"indices out of range for an axis of size {dim}")
        flat = np.where(flat < 0, flat + dim, flat)
        return self._take(node.name or "gather", v, axis, flat, tuple(indices.shape))

    def op_Split(self, node, a):
        v = self.vars[node.input[0]]
        shape = self.onnx_shape(v)
        axis = int(a.get("axis", 0))
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape):
            raise Unsupported(f"axis {axis} out of range for rank {len(shape)}")
        dim = shape[axis]
        sizes = self._const_input(node, 1, "split")
        sizes = a.get("split") if sizes is None else sizes
        n = len(node.output)
        if sizes is None:  # equal parts; from opset 18 the last one may be smaller
            n = int(a.get("num_outputs", n))
            part = math.ceil(dim / n)
            sizes = [part] * (n - 1) + [dim - part * (n - 1)]
        sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
        if len(sizes) != len(node.output) or sum(sizes) != dim or any(s <= 0 for s in sizes):
            raise Unsupported(f"split sizes {sizes} do not cut an axis of size {dim} into {len(node.output)} parts")
        outs, begin = [], 0
        for k, s in enumerate(sizes):
            outs.append(self._take(f"{node.name or 'split'}_{k}", v, axis, range(begin, begin + s), (s,)))
            begin += s
        return outs
