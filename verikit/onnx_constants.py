"""Evaluation of ONNX nodes whose inputs are all constants (shape arithmetic such as
Shape -> Gather -> Concat -> Reshape, Constant, Cast, ...), done with numpy at import time."""
from __future__ import annotations

from typing import Optional

import numpy as np


class UnsupportedConstantOp(Exception):
    """Raised for a constant node verikit cannot evaluate; the importer reports it."""


def node_attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def fold_constant(node, xs: list[Optional[np.ndarray]]) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants (shape arithmetic, Constant, ...)."""
    import onnx.numpy_helper as nh

    op, a = node.op_type, node_attributes(node)
    if op == "Constant":
        if "value" in a:
            return [nh.to_array(a["value"])]
        for key in ("value_float", "value_int"):
            if key in a:
                return [np.array(a[key])]
        for key in ("value_floats", "value_ints"):
            if key in a:
                return [np.array(list(a[key]))]
        raise UnsupportedConstantOp("Constant with an unsupported value kind")
    x = xs[0]
    if op in ("Identity", "Dropout"):
        return [x]
    if op == "Cast":
        import onnx

        return [x.astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))]
    if op == "Gather":
        return [np.take(x, xs[1], axis=a.get("axis", 0))]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(v) for v in xs if v is not None], axis=a["axis"])]
    if op == "Unsqueeze":
        axes = [int(v) for v in xs[1]] if len(xs) > 1 and xs[1] is not None else list(a["axes"])
        out = x
        for ax in sorted(v % (x.ndim + len(axes)) for v in axes):
            out = np.expand_dims(out, ax)
        return [out]
    if op == "Squeeze":
        axes = [int(v) for v in xs[1]] if len(xs) > 1 and xs[1] is not None else a.get("axes")
        return [np.squeeze(x, axis=None if axes is None else tuple(axes))]
    if op == "Reshape":
        target = [int(v) for v in (xs[1] if len(xs) > 1 and xs[1] is not None else a["shape"])]
        if not a.get("allowzero", 0):
            target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
        return [x.reshape(target)]
    if op == "Flatten":
        axis = a.get("axis", 1)
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op == "Transpose":
        return [np.transpose(x, a.get("perm"))]
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": None, "MatMul": np.matmul}
    if op in binary:
        if op == "Div":
            return [x // xs[1] if np.issubdtype(x.dtype, np.integer) else x / xs[1]]
        return [binary[op](x, xs[1])]
    if op == "Neg":
        return [-x]
    if op == "Slice":
        if "starts" in a:  # Slice-1: starts, ends, axes are attributes
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts, ends = xs[1], xs[2]
            axes = xs[3] if len(xs) > 3 and xs[3] is not None else range(len(starts))
            steps = xs[4] if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            sl[int(ax)] = slice(int(s), int(e), int(st))
        return [x[tuple(sl)]]
    if op == "ConstantOfShape":
        val = nh.to_array(a["value"]) if "value" in a else np.zeros(1, dtype=np.float32)
        return [np.full([int(v) for v in x], val.reshape(-1)[0], dtype=val.dtype)]
    if op == "Range":
        return [np.arange(xs[0], xs[1], xs[2])]
    raise UnsupportedConstantOp("operator not supported on constants")
