"""ONNX import of the ops that move data without arithmetic across samples: shape ops
(Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Concat, Identity, Dropout), padding and
pooling. A mixin of the importer (`verikit.onnx_import._Importer`), which provides `builder`,
`vars`, `consts` and `dtype`.

Axes are ONNX axes of the tensor as ONNX sees it: with a batch dimension (IR axis = ONNX axis)
or without one (IR axis = ONNX axis + 1). Pooling, which the IR does on (B, C, H, W), takes an
ONNX (N, C, H, W) tensor without batch dimension as (N*C, H, W): pooling never mixes channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ir


@dataclass
class Var:
    node: str  # IR node name
    batched: bool  # does the ONNX tensor carry the batch dimension?


class Unsupported(Exception):
    """A node the importer cannot represent exactly (collected and reported together)."""


_NOT_SET = (None, b"NOTSET", "NOTSET")


class ShapeOps:
    # -------------------------------------------------------------- helpers
    def t(self, a) -> torch.Tensor:
        a = np.asarray(a)
        return torch.as_tensor(a.astype(np.float64), dtype=self.dtype) if a.dtype.kind in "fiub" else torch.as_tensor(a)

    def onnx_shape(self, v: Var) -> tuple:
        s = self.builder.shape(v.node)
        return (1,) + s if v.batched else s

    def ir_axis(self, v: Var, axis: int) -> int:
        rank = len(self.onnx_shape(v))
        axis = axis + rank if axis < 0 else axis
        if not 0 <= axis < rank:
            raise Unsupported(f"axis {axis} out of range for rank {rank}")
        if v.batched:
            if axis == 0:
                raise Unsupported("operation along the batch dimension")
            return axis
        return axis + 1

    def reshape_to(self, name: str, v: Var, out_shape) -> Var:
        """Any shape-only op (Reshape, Flatten, Squeeze, Unsqueeze) as an IR Reshape."""
        out_shape = tuple(int(s) for s in out_shape)
        batched = v.batched and len(out_shape) >= 1 and out_shape[0] == 1
        sample = out_shape[1:] if batched else out_shape
        if int(np.prod(sample)) != int(np.prod(self.builder.shape(v.node))):
            raise Unsupported(f"reshape to {list(out_shape)} mixes samples of a batch")
        return Var(self.builder.add(name, ir.Reshape(tuple(sample)), [v.node]), batched)

    # -------------------------------------------------------------- pooling
    def _pool_input(self, node, v: Var):
        """(IR node to pool, shape to restore or None): 4-D data only; (N, C, H, W) without a
        batch dimension is pooled as (N*C, H, W)."""
        s = self.onnx_shape(v)
        if len(s) != 4:
            raise Unsupported(f"only 2-D pooling of (N, C, H, W) data, got shape {list(s)}")
        if v.batched:
            return v.node, None
        flat = self.builder.add((node.name or "pool") + "_merge", ir.Reshape((s[0] * s[1],) + tuple(s[2:])), [v.node])
        return flat, (s[0], s[1])

    def _pool_output(self, node, out: str, restore, batched: bool) -> Var:
        if restore is None:
            return Var(out, batched)
        shape = tuple(restore) + tuple(self.builder.shape(out)[1:])
        return Var(self.builder.add((node.name or "pool") + "_split", ir.Reshape(shape), [out]), False)

    @staticmethod
    def _pool_pads(a, kernel, dilation=(1, 1)):
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if a.get("auto_pad", None) not in _NOT_SET:  # VALID: no padding
            pads = [0, 0, 0, 0]
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        symmetric = pads[0] == pads[2] and pads[1] == pads[3]
        small = all(2 * p <= e for p, e in zip(pads, effective + effective))
        return pads, symmetric and small

    def op_AveragePool(self, node, a):
        v = self.vars[node.input[0]]
        k = tuple(a["kernel_shape"])
        pads, torch_ok = self._pool_pads(a, k)
        ceil, include = bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0))
        src, restore = self._pool_input(node, v)
        if not torch_ok:
            if not include or ceil:
                raise Unsupported(f"pads {pads} (asymmetric or over half the kernel) need count_include_pad=1 "
                                  f"and ceil_mode=0")
            # zeros counted in the average: the same as explicit zero padding
            src = self.builder.add((node.name or "avgpool") + "_pad", ir.Pad((pads[1], pads[3], pads[0], pads[2])), [src])
            pads = [0, 0, 0, 0]
        op = ir.AvgPool2d(k, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), ceil, include)
        out = self.builder.add(node.name or "avgpool", op, [src])
        return self._pool_output(node, out, restore, v.batched)

    def op_MaxPool(self, node, a):
        v = self.vars[node.input[0]]
        k = tuple(a["kernel_shape"])
        dil = tuple(a.get("dilations", [1, 1]))
        pads, torch_ok = self._pool_pads(a, k, dil)
        if not torch_ok:
            raise Unsupported(f"pads {pads} are asymmetric or over half the kernel")
        src, restore = self._pool_input(node, v)
        op = ir.MaxPool2d(k, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), dil, bool(a.get("ceil_mode", 0)))
        out = self.builder.add(node.name or "maxpool", op, [src])
        return self._pool_output(node, out, restore, v.batched)

    def op_GlobalAveragePool(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        if len(s) < 3:
            raise Unsupported(f"GlobalAveragePool needs (N, C, D1, ...) data, got shape {list(s)}")
        src, restore = v.node, None
        if not v.batched:  # average over ONNX axes 2.. = IR axes 3..: merge N and C first
            src = self.builder.add((node.name or "gap") + "_merge", ir.Reshape((s[0] * s[1],) + tuple(s[2:])), [src])
            restore = (s[0], s[1])
        out = self.builder.add(node.name or "gap", ir.GlobalAvgPool(), [src])
        return self._pool_output(node, out, restore, v.batched)

    # -------------------------------------------------------------- padding
    def op_Pad(self, node, a):
        v = self.vars[node.input[0]]
        if len(node.input) > 1 and node.input[1]:
            pads = [int(p) for p in self.consts[node.input[1]]]
        else:
            pads = [int(p) for p in a.get("pads", [])]
        value = float(a.get("value", 0.0))
        if len(node.input) > 2 and node.input[2]:
            cv = np.asarray(self.consts[node.input[2]]).reshape(-1)
            value = float(cv[0]) if cv.size else 0.0
        rank = len(self.onnx_shape(v))
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [int(x) % rank for x in self.consts[node.input[3]]]
        n = len(axes)
        if len(pads) != 2 * n:
            raise Unsupported(f"{len(pads)} pads for {n} axes")
        begin, end = dict(zip(axes, pads[:n])), dict(zip(axes, pads[n:]))
        if any(p < 0 for p in pads):
            raise Unsupported("negative pads (cropping)")
        if v.batched and (begin.get(0, 0) or end.get(0, 0)):
            raise Unsupported("padding the batch dimension")
        torch_pads = []
        for ax in reversed(range(rank)):
            torch_pads += [begin.get(ax, 0), end.get(ax, 0)]
        while torch_pads and torch_pads[-2:] == [0, 0]:
            torch_pads = torch_pads[:-2]
        return Var(self.builder.add(node.name or "pad", ir.Pad(tuple(torch_pads), value), [v.node]), v.batched)

    # -------------------------------------------------------------- shape ops
    def op_Flatten(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        axis = a.get("axis", 1)
        axis = axis + len(s) if axis < 0 else axis
        return self.reshape_to(node.name or "flatten", v, (int(np.prod(s[:axis])), int(np.prod(s[axis:]))))

    def op_Reshape(self, node, a):
        v = self.vars[node.input[0]]
        if len(node.input) > 1 and node.input[1]:
            target = [int(x) for x in self.consts[node.input[1]]]
        elif "shape" in a:  # Reshape-1: the target shape is an attribute
            target = [int(x) for x in a["shape"]]
        else:
            raise Unsupported("Reshape without a target shape")
        s = self.onnx_shape(v)
        if not a.get("allowzero", 0):
            target = [s[i] if t == 0 else t for i, t in enumerate(target)]
        return self.reshape_to(node.name or "reshape", v, np.empty(s, dtype=np.uint8).reshape(target).shape)

    def _axes(self, node, a):
        if len(node.input) > 1 and node.input[1]:
            return [int(x) for x in self.consts[node.input[1]]]
        return list(a.get("axes", [])) if "axes" in a else None

    def op_Squeeze(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        axes = self._axes(node, a)
        axes = [i for i, d in enumerate(s) if d == 1] if axes is None else [x % len(s) for x in axes]
        if any(s[x] != 1 for x in axes):
            raise Unsupported(f"cannot squeeze axes {axes} of shape {list(s)}")
        return self.reshape_to(node.name or "squeeze", v, tuple(d for i, d in enumerate(s) if i not in axes))

    def op_Unsqueeze(self, node, a):
        v = self.vars[node.input[0]]
        s = list(self.onnx_shape(v))
        given = self._axes(node, a) or []
        axes = sorted(x % (len(s) + len(given)) for x in given)
        for ax in axes:
            s.insert(ax, 1)
        return self.reshape_to(node.name or "unsqueeze", v, tuple(s))

    def op_Transpose(self, node, a):
        v = self.vars[node.input[0]]
        rank = len(self.onnx_shape(v))
        perm = [int(p) for p in a.get("perm", list(reversed(range(rank))))]
        if sorted(perm) != list(range(rank)):
            raise Unsupported(f"perm {perm} is not a permutation of {rank} axes")
        if v.batched:
            if perm[0] != 0:
                raise Unsupported("transpose moves the batch dimension")
            ir_perm = tuple(perm)
        else:
            ir_perm = (0,) + tuple(p + 1 for p in perm)
        return Var(self.builder.add(node.name or "transpose", ir.Transpose(ir_perm), [v.node]), v.batched)

    def op_Concat(self, node, a):
        vs = [self.vars[i] for i in node.input]
        if len({x.batched for x in vs}) != 1 or len({len(self.onnx_shape(x)) for x in vs}) != 1:
            raise Unsupported("inputs disagree on the batch dimension or rank")
        axis = self.ir_axis(vs[0], int(a["axis"]))
        return Var(self.builder.add(node.name or "concat", ir.Concat(axis), [x.node for x in vs]), vs[0].batched)

    def op_Identity(self, node, a):
        return self.vars[node.input[0]]

    def op_Dropout(self, node, a):
        # inference semantics: identity (the mask output, if read, was rejected in convert)
        if len(node.input) > 2 and node.input[2] and bool(self.consts[node.input[2]]):
            raise Unsupported("training_mode=True")
        return self.vars[node.input[0]]
