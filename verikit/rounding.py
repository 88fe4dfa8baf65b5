"""Bounds on the floating-point rounding error of evaluating a graph, from interval magnitudes.

Standard forward error analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3):
a sum or dot product of n terms computed in floating point with unit round-off u, in any order
and with or without fused multiply-adds, is within gamma_n * sum |w_i x_i| of the exact value,
gamma_n = n u / (1 - n u). Given interval bounds on every node's inputs, each op's own rounding
error is bounded by such a term (`local_error`, one rule per IR op type), and an error that
enters a node's inputs leaves it scaled by the op's Lipschitz constant (`propagate_errors`).
Underflow adds at most one smallest subnormal per operation (`_TINY`).

Two users:
- the verdict guard (`verikit.domains.guard`): a lower bound that verikit computed in floating point counts as a proof only
  when it exceeds the error of the (spec-folded) graph's own evaluation at that precision, plus
  the rounding of the spec's working copy against the property as written. A property that
  holds only thanks to cancellations of large magnitudes is therefore never "proven" by a
  bound that rounding alone could have produced.
- the float-sound mode (`verikit.domains.float_sound`), which widens every node's interval by
  its float32 execution error, so proofs hold for the network as a float32 runtime executes it.

Importers record how their fused nodes were formed in `graph.meta["rounding"]` (node ->
`{"extra": k, "bias_magnitude": tensor}`): `extra` counts roundings beyond the node's own
reduction (e.g. a BatchNorm folded into a convolution), `bias_magnitude` bounds the constant
terms before they were combined (their cancellation is invisible in the fused bias).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ir
from .bounds import Box

U32 = 2.0 ** -24  # unit round-off of float32 (round to nearest)
U64 = 2.0 ** -53
_TINY = {U32: 2.0 ** -149, U64: 2.0 ** -1074}
# accuracy assumed of a runtime's sigmoid/tanh: this many units of the result's magnitude,
# plus an absolute 2^-24 (ulps of values near 0 do not bound approximations there)
ACTIVATION_ULPS = 16
ACTIVATION_ABS = 2.0 ** -24
LIPSCHITZ = {ir.ReLU: 1.0, ir.Sigmoid: 0.25, ir.Tanh: 1.0}


def gamma(n: int, unit: float) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term sum or dot product."""
    nu = n * unit
    if nu >= 0.5:
        raise ValueError(f"{n}-term reduction is too long for a rounding bound at unit {unit}")
    return nu / (1.0 - nu)


def magnitude(box: Box) -> Tensor:
    return torch.maximum(box.lo.abs(), box.hi.abs())


def _tiny(unit: float, n: int) -> float:
    return n * _TINY.get(unit, 0.0)


def _fusion(graph: ir.Graph, name: str) -> tuple[int, Optional[Tensor]]:
    info = graph.meta.get("rounding", {}).get(name, {})
    return int(info.get("extra", 0)), info.get("bias_magnitude")


def _bias_term(bias: Optional[Tensor], fused: Optional[Tensor], shape_like: Tensor, channel_dim: int) -> Tensor:
    """|bias| (or the recorded magnitude of its unfused terms) broadcast to the output."""
    b = fused if fused is not None else (bias.abs() if bias is not None else None)
    if b is None:
        return torch.zeros((), dtype=shape_like.dtype, device=shape_like.device)
    b = b.to(dtype=shape_like.dtype, device=shape_like.device)
    if channel_dim and b.dim() == 1:
        b = b.reshape((-1,) + (1,) * (shape_like.dim() - 2))
    return b


# ------------------------------------------------------------------ local error rules
# rule(op, node, graph, input magnitudes, unit, executed) -> radius (B, *out) or None (exact)
def _linear(op, node, graph, mags, unit, executed):
    from .spec import SPEC_NODE, FoldedSpecLinear

    (x,) = mags
    extra, fused = _fusion(graph, node.name)
    if isinstance(op, FoldedSpecLinear):
        inner = ir.Linear(op.inner_weight, op.inner_bias)
        n = op.inner_weight.shape[-1] + 2 + extra  # reduction + bias + a fused step (if any)
        mag_y = inner.abs_linear(x) + _bias_term(op.inner_bias, fused, x, 0)
        y_err = gamma(n, unit) * mag_y + _tiny(unit, n)
        C = op.C.abs()
        prop = (lambda t: t @ C.transpose(-1, -2)) if C.dim() == 2 else (lambda t: torch.einsum("bmn,bn->bm", C, t))
        if executed:  # the runtime computes y; the spec is applied to y exactly
            return prop(y_err)
        k = n + op.inner_weight.shape[-2] + 1  # ... and verikit also computes C y - d
        return gamma(k, unit) * (prop(mag_y) + op.d.abs()) + _spec_representation(graph, mag_y) + _tiny(unit, k)
    if node.name == SPEC_NODE:  # the spec appended as its own layer: exact maths, not executed
        if executed:
            return None
        n = op.weight.shape[-1] + 1
        return gamma(n, unit) * (op.abs_linear(x) + op.bias.abs()) + _spec_representation(graph, x) + _tiny(unit, n)
    n = op.weight.shape[-1] + (1 if op.bias is not None else 0) + extra
    mag = op.abs_linear(x) + _bias_term(op.bias, fused, x, 0)
    return gamma(max(n, 1), unit) * mag + _tiny(unit, n)


def _spec_representation(graph: ir.Graph, mag_y: Tensor) -> Tensor:
    """|C - C_exact| |y| + |d - d_exact|: what the spec's rounded working copy can be off by."""
    spec = graph.meta.get("spec")
    if spec is None or spec.exact is None:
        return torch.zeros((), dtype=mag_y.dtype, device=mag_y.device)
    dC = (spec.C.double() - spec.exact_C.to(spec.C.device)).abs()
    dd = (spec.d.double() - spec.exact_d.to(spec.d.device)).abs()
    y = mag_y.double().reshape(mag_y.shape[0], -1)
    rep = (y @ dC.T if dC.dim() == 2 else torch.einsum("bmn,bn->bm", dC, y)) + dd
    # the float64 products above are themselves rounded: one more relative 2^-50 covers them
    return (rep * (1 + 2.0 ** -50)).to(mag_y.dtype)


def _conv(op, node, graph, mags, unit, executed):
    (x,) = mags
    extra, fused = _fusion(graph, node.name)
    w = op.weight
    n = (w.shape[1] * w.shape[2] * w.shape[3]) + (1 if op.bias is not None else 0) + extra
    mag = op.abs_linear(x) + _bias_term(op.bias, fused, x, 1)
    return gamma(n, unit) * mag + _tiny(unit, n)


def _conv_transpose(op, node, graph, mags, unit, executed):
    (x,) = mags
    extra, fused = _fusion(graph, node.name)
    w = op.weight  # (C_in, C_out / groups, kh, kw): an output sums at most C_in / groups * kh * kw products
    n = (w.shape[0] // op.groups) * w.shape[2] * w.shape[3] + (1 if op.bias is not None else 0) + extra
    mag = op.abs_linear(x) + _bias_term(op.bias, fused, x, 1)
    return gamma(n, unit) * mag + _tiny(unit, n)


def _resample(op, node, graph, mags, unit, executed):
    (x,) = mags
    if all(bool(((m == 0) | (m == 1)).all()) and bool((m.sum(1) == 1).all()) for m in op.matrices):
        return None  # nearest: every output is a copy of one input
    n = 4 * len(op.matrices)  # per axis: two products, a sum, and the runtime's own rounded weights
    return gamma(n, unit) * op.abs_linear(x) + _tiny(unit, n)


def _elementwise(op, node, graph, mags, unit, executed):
    (x,) = mags
    extra, fused = _fusion(graph, node.name)
    mag = op.abs_linear(x)
    shift = fused if fused is not None else (op.shift.abs() if op.shift is not None else None)
    if shift is not None:
        mag = mag + shift.to(dtype=mag.dtype, device=mag.device)
    n = 3 + extra  # multiply, add, and a derived constant (a division stored as a product)
    return gamma(n, unit) * mag + _tiny(unit, n)


def _batchnorm(op, node, graph, mags, unit, executed):
    (x,) = mags
    mult = torch.rsqrt(op.running_var + op.eps)
    if op.weight is not None:
        mult = mult * op.weight
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mag = (x + op.running_mean.abs().reshape(shape)) * mult.abs().reshape(shape)
    if op.bias is not None:
        mag = mag + op.bias.abs().reshape(shape)
    n = 8  # (x - mean), sqrt, division, two products and a sum, in whatever form the runtime uses
    return gamma(n, unit) * mag + _tiny(unit, n)


def _pool_mean(op, node, graph, mags, unit, executed):
    (x,) = mags
    k = op.kernel[0] * op.kernel[1] if isinstance(op, ir.AvgPool2d) else math.prod(x.shape[2:])
    return gamma(k + 1, unit) * op.forward(x) + _tiny(unit, k + 1)


def _add(op, node, graph, mags, unit, executed):
    n = len(mags) - 1
    return gamma(max(n, 1), unit) * op.forward(*mags) + _tiny(unit, n)


def _leaky(op, node, graph, mags, unit, executed):
    (x,) = mags
    return unit * float(op.alpha) * x + _tiny(unit, 1)


def _s_shaped(op, node, graph, mags, unit, executed):
    (x,) = mags
    # |f(v)| <= 1 for the sigmoid, <= tanh(|v|) for tanh (odd and increasing)
    top = torch.ones_like(x) if isinstance(op, ir.Sigmoid) else torch.tanh(x)
    return ACTIVATION_ULPS * unit * top + ACTIVATION_ABS * (unit / U32)


def _exp(op, node, graph, mags, unit, executed):
    (x,) = mags
    # |e^v| <= e^|v|; a libm exp is within a few ulps of the exact value
    return ACTIVATION_ULPS * unit * torch.exp(x) + ACTIVATION_ABS * (unit / U32)


def _softmax(op, node, graph, mags, unit, executed):
    (x,) = mags
    # outputs in [0, 1]; each is a ratio of exps and a sum of n of them
    n = x.shape[op.axis]
    return (ACTIVATION_ULPS + n) * unit * torch.ones_like(x) + ACTIVATION_ABS * (unit / U32)


def _product(op, node, graph, mags, unit, executed):
    x, y = mags
    return unit * (x * y) + _tiny(unit, 1)  # one rounded multiplication per element


def _exact(*args, **kwargs):
    return None


LOCAL_ERROR_RULES: dict[type, Callable] = {
    ir.Linear: _linear, ir.Conv2d: _conv, ir.ElementwiseAffine: _elementwise, ir.BatchNorm: _batchnorm,
    ir.AvgPool2d: _pool_mean, ir.GlobalAvgPool: _pool_mean, ir.Add: _add, ir.LeakyReLU: _leaky,
    ir.Sigmoid: _s_shaped, ir.Tanh: _s_shaped, ir.Exp: _exp, ir.Softmax: _softmax, ir.Mul: _product,
    ir.Pad: _exact, ir.Reshape: _exact, ir.Transpose: _exact, ir.Concat: _exact, ir.ReLU: _exact,
    ir.MaxPool2d: _exact, ir.Sign: _exact, ir.Take: _exact, ir.ConvTranspose2d: _conv_transpose, ir.Resample: _resample,
}


def _rule(op: ir.Op) -> Callable:
    for t in type(op).__mro__:
        if t in LOCAL_ERROR_RULES:
            return LOCAL_ERROR_RULES[t]
    raise KeyError(f"no rounding rule for {op.op_type}")


def local_error(graph: ir.Graph, node: ir.Node, boxes: list[Box], unit: float, executed: bool) -> Optional[Tensor]:
    """Radius (B, *shape) bounding the rounding error of computing `node` once from inputs in
    `boxes`, or None when the op is exact. `executed`: the error of the network as a runtime
    executes it (the spec is exact maths); otherwise the error of verikit's own evaluation of
    the spec-folded graph, including the spec's working copy."""
    mags = [magnitude(b) for b in boxes]
    return _rule(node.op)(node.op, node, graph, mags, unit, executed)


def _lipschitz(op: ir.Op) -> float:
    if isinstance(op, ir.LeakyReLU):
        return max(1.0, float(op.alpha))
    for t in type(op).__mro__:
        if t in LIPSCHITZ:
            return LIPSCHITZ[t]
    raise KeyError(f"no Lipschitz constant for {op.op_type}")


def propagate_errors(graph: ir.Graph, boxes: Callable[[str], Box], unit: float, executed: bool = False) -> dict:
    """node -> bound (B, *shape) on |computed value - exact value| of the whole evaluation up
    to that node (None: exact), for inputs inside the box; `boxes(name)` gives node bounds."""
    errs: dict[str, Optional[Tensor]] = {graph.input_name: None}
    for node in graph.nodes:
        ins = [errs[i] for i in node.inputs]
        op = node.op
        carried = None
        if any(e is not None for e in ins):
            if op.is_affine:
                zs = [e if e is not None else torch.zeros_like(boxes(i).lo) for e, i in zip(ins, node.inputs)]
                carried = op.abs_linear(*zs)
            elif isinstance(op, ir.Sign):  # an input error near 0 can flip the sign: up to 2
                box = boxes(node.inputs[0])
                near = (box.lo <= ins[0]) & (box.hi >= -ins[0])
                carried = torch.where(near & (ins[0] > 0), torch.full_like(ins[0], 2.0), torch.zeros_like(ins[0]))
            elif isinstance(op, ir.Exp):  # no global Lipschitz constant: e^(hi + err) on the input's box
                carried = torch.exp(boxes(node.inputs[0]).hi + ins[0]) * ins[0]
            elif op.is_activation:
                carried = _lipschitz(op) * ins[0]
            elif isinstance(op, ir.Mul):  # (x + ex)(y + ey) - x y = y ex + x ey + ex ey
                (mx, my), (ex, ey) = ([magnitude(boxes(i)) for i in node.inputs],
                                      [e if e is not None else torch.zeros_like(boxes(i).lo) for e, i in zip(ins, node.inputs)])
                carried = my * ex + mx * ey + ex * ey
            elif isinstance(op, ir.Softmax):  # sum_j |d s_i / d x_j| = 2 s_i (1 - s_i) <= 1/2
                carried = 0.5 * ins[0].amax(op.axis, keepdim=True).expand_as(ins[0])
            else:  # max-pooling moves each output by at most the largest error in its window
                carried = op.forward(ins[0])
        local = local_error(graph, node, [boxes(i) for i in node.inputs], unit, executed)
        errs[node.name] = local if carried is None else (carried if local is None else carried + local)
    return errs
