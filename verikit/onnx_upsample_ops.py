"""ONNX import of the upsampling ops, both affine: ConvTranspose (strides, pads incl.
asymmetric, output_padding, dilations, groups) as an IR `ConvTranspose2d`, and Resize in
nearest / linear mode with constant scales or sizes as an IR `Resample` (one constant matrix
per resized axis, built here by ONNX's coordinate rules). A mixin of the importer; both IR ops
live in verikit/ir_ops.py.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import ir
from .onnx_shape_ops import Unsupported, Var

_NEAREST = {  # x_original -> input index, per nearest_mode
    "round_prefer_floor": lambda x: math.ceil(x - 0.5),
    "round_prefer_ceil": lambda x: math.floor(x + 0.5),
    "floor": math.floor,
    "ceil": math.ceil,
}
_COORDINATES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def resize_matrix(n_in: int, n_out: int, scale: float, mode: str, coordinates: str, nearest: str) -> np.ndarray:
    """The (n_out, n_in) matrix of a 1-D ONNX Resize."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        if coordinates == "half_pixel":
            x = (i + 0.5) / scale - 0.5
        elif coordinates == "pytorch_half_pixel":
            x = (i + 0.5) / scale - 0.5 if n_out > 1 else 0.0
        elif coordinates == "align_corners":
            x = 0.0 if n_out == 1 else i * (n_in - 1) / (n_out - 1)
        else:  # asymmetric
            x = i / scale
        if mode == "nearest":
            m[i, min(max(_NEAREST[nearest](x), 0), n_in - 1)] = 1.0
        else:  # linear: clamp into the input, interpolate between the two neighbours
            x = min(max(x, 0.0), n_in - 1.0)
            j0 = int(math.floor(x))
            j1 = min(j0 + 1, n_in - 1)
            w = x - j0
            m[i, j0] += 1.0 - w
            m[i, j1] += w
    return m


class UpsampleOps:
    def model_opset(self) -> int:
        return next((int(o.version) for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 1)

    def op_ConvTranspose(self, node, a):
        v = self.vars[node.input[0]]
        W = np.asarray(self.consts[node.input[1]])
        if W.ndim != 4 or not v.batched or len(self.onnx_shape(v)) != 4:
            raise Unsupported("only 2-D transposed convolutions on batched NCHW data")
        if "kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(W.shape[2:]):
            raise Unsupported(f"kernel_shape={list(a['kernel_shape'])} differs from the weights' {list(W.shape[2:])}")
        if "output_shape" in a:
            raise Unsupported("output_shape is not supported (give pads and output_padding)")
        b = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
        stride = tuple(int(s) for s in a.get("strides", [1, 1]))
        dilation = tuple(int(d) for d in a.get("dilations", [1, 1]))
        out_pad = tuple(int(p) for p in a.get("output_padding", [0, 0]))
        if any(p >= max(s, d) for p, s, d in zip(out_pad, stride, dilation)):
            raise Unsupported(f"output_padding={list(out_pad)} must be smaller than the stride or dilation")
        op = ir.ConvTranspose2d(self.t(W), None if b is None else self.t(b), stride, dilation, int(a.get("group", 1)),
                                out_pad, (pads[0], pads[2], pads[1], pads[3]))
        return Var(self.builder.add(node.name or "convtranspose", op, [v.node]), True)

    def op_Resize(self, node, a):
        v = self.vars[node.input[0]]
        mode = _text(a.get("mode", "nearest"))
        coordinates = _text(a.get("coordinate_transformation_mode", "half_pixel"))
        nearest = _text(a.get("nearest_mode", "round_prefer_floor"))
        if mode not in ("nearest", "linear"):
            raise Unsupported(f"mode={mode} is not supported (nearest and linear are)")
        if coordinates not in _COORDINATES:
            raise Unsupported(f"coordinate_transformation_mode={coordinates} is not supported")
        if nearest not in _NEAREST:
            raise Unsupported(f"nearest_mode={nearest} is not supported")
        if int(a.get("antialias", 0)) or int(a.get("exclude_outside", 0)):
            raise Unsupported("antialias / exclude_outside are not supported")
        if _text(a.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
            raise Unsupported("keep_aspect_ratio_policy other than stretch is not supported")
        shape = self.onnx_shape(v)
        consts = [self._const_input(node, k, what) for k, what in ((1, "roi"), (2, "scales"), (3, "sizes"))]
        if self.model_opset() < 11:  # Resize-10: (X, scales)
            consts = [None, consts[0], None]
        _, scales, sizes = consts
        if sizes is not None and sizes.size:
            sizes = [int(s) for s in sizes.reshape(-1)]
            scales = [o / i for o, i in zip(sizes, shape)]
        elif scales is not None and scales.size:
            scales = [float(s) for s in scales.reshape(-1)]
            sizes = [int(math.floor(i * s)) for i, s in zip(shape, scales)]
        else:
            raise Unsupported("Resize needs constant scales or sizes")
        if len(scales) != len(shape):
            raise Unsupported(f"{len(scales)} scales for a rank-{len(shape)} tensor")
        axes, mats = [], []
        for ax, (n_in, n_out, s) in enumerate(zip(shape, sizes, scales)):
            if n_out == n_in and s == 1.0:
                continue
            if v.batched and ax == 0:
                raise Unsupported("resizing the batch dimension")
            if n_out < 1 or s <= 0:
                raise Unsupported(f"output size {n_out} along axis {ax}")
            axes.append(self.ir_axis(v, ax))
            mats.append(self.t(resize_matrix(n_in, n_out, s, mode, coordinates, nearest)))
        if not axes:
            return v
        return Var(self.builder.add(node.name or "resize", ir.Resample(tuple(axes), tuple(mats)), [v.node]), v.batched)
