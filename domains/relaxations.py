"""The one table of linear relaxations for the non-linear IR ops.

For an element-wise activation f and pre-activation bounds l <= x <= u, a relaxation is a pair
of lines valid on [l, u]:

    lower_slope * x + lower_bias  <=  f(x)  <=  upper_slope * x + upper_bias

Back-substitution domains (DeepPoly, CROWN) use them to push linear bounds through the op;
LP/MILP encodings can use the same lines as constraints. Every function takes batched bound
tensors of any shape and returns a `LinearRelaxation` of the same shape.

`variant` picks between the two published choices where they differ:
- "deeppoly": ERAN's DeepPoly (area heuristic for the ReLU lower slope; for S-shaped functions
  one slope min(f'(l), f'(u)) through an end point, or the chord where f is concave/convex);
- "crown": CROWN's adaptive relaxations (same ReLU heuristic; tangents for S-shaped functions,
  chosen to touch f, which is tighter).

MaxPool is not element-wise: `maxpool_relaxation` describes it per pooling window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from verikit import ir
from verikit.errors import VerikitError

VARIANTS = ("deeppoly", "crown")
_TINY_WIDTH = 1e-7  # below this width an interval is treated as a point (constant bounds)


@dataclass
class LinearRelaxation:
    lower_slope: Tensor
    lower_bias: Tensor
    upper_slope: Tensor
    upper_bias: Tensor
    # elements whose lower slope may be any value in alpha_range (through the origin, bias 0):
    # alpha-CROWN optimises them. None when the op has no such free slope.
    alpha_mask: Optional[Tensor] = None
    alpha_range: tuple = (0.0, 1.0)


# ---------------------------------------------------------------- rounding
def _fit(slope: Tensor, bias: Tensor, points: list, f, above: bool) -> Tensor:
    """The intercept moved just enough that the line is on the right side of f at `points`
    (where a line can touch f), checked in float64 and rounded outward to bias's dtype: a line
    computed in float32 can otherwise miss f by an ulp (e.g. the ReLU chord at x = l)."""
    s64, b64 = slope.double(), bias.double()
    sign = 1 if above else -1
    # every point at once (one tensor op per step instead of one per point and step: the
    # relaxation of a small layer is ~40 such ops, which dominated CROWN on MLPs at batch 1)
    p = torch.stack([t.double() for t in torch.broadcast_tensors(*points)])
    fp, sp = f(p), s64 * p
    # the float64 check is itself rounded: 4 units of 2^-53 of the magnitudes involved cover it
    slack = 2.0 ** -51 * (fp.abs() + sp.abs() + b64.abs())
    need = b64 + sign * (sign * (fp - (sp + b64)) + slack).amax(0).clamp(min=0)
    out = need.to(slope.dtype)  # the line's dtype (the intercept may come in float64)
    wrong = out.double() < need if above else out.double() > need
    away = torch.full_like(out, float("inf") if above else float("-inf"))
    return torch.where(wrong, torch.nextafter(out, away), out)


# ---------------------------------------------------------------- ReLU family
def _leaky_relaxation(l: Tensor, u: Tensor, a: float) -> LinearRelaxation:
    """f(x) = x for x >= 0, a*x for x < 0 (a = 0: ReLU). Convex when a <= 1, concave when a > 1."""
    one = torch.ones_like(l)
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    width = torch.where(unstable, u - l, one)
    chord = torch.where(unstable, (u - a * l) / width, one)  # slope of the chord (l, a l)-(u, u)
    chord_bias = u - chord * u
    # the free slope through the origin: 1 when the positive side is wider (area heuristic)
    free = torch.where(u > -l, one, torch.full_like(l, a))
    stable_slope = torch.where(active, one, torch.full_like(l, a))
    zero = torch.zeros_like(l)
    f = lambda x: torch.where(x >= 0, x, a * x)
    if a <= 1:  # convex: chord above, free line below
        lo_s = torch.where(unstable, free, stable_slope)
        up_s = torch.where(unstable, chord, stable_slope)
        up_b = torch.where(unstable, _fit(chord, chord_bias, [l, u], f, above=True), zero)
        return LinearRelaxation(lo_s, zero, up_s, up_b, alpha_mask=unstable, alpha_range=(a, 1.0))
    lo_s = torch.where(unstable, chord, stable_slope)  # concave: chord below, free line above
    lo_b = torch.where(unstable, _fit(chord, chord_bias, [l, u], f, above=False), zero)
    up_s = torch.where(unstable, free, stable_slope)
    return LinearRelaxation(lo_s, lo_b, up_s, zero)


def relu_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    if l.dtype == torch.float32 and u.dtype == torch.float32:
        return _relu_relaxation_float32(l, u)
    return _leaky_relaxation(l, u, 0.0)


def _relu_relaxation_float32(l: Tensor, u: Tensor) -> LinearRelaxation:
    """The ReLU relaxation of `_leaky_relaxation` for float32 bounds in half its tensor ops (it
    is ~1/6 of a CROWN call on a small MLP at batch 1), the chord's intercept rounded by an
    argument of its own instead of `_fit`'s general check.

    The chord slope s = u / (u - l) of an unstable neuron (l < 0 < u) lies in (0, 1]. The line
    s x + b is above the ReLU on [l, u] iff it is at both ends (the ReLU is convex), i.e. iff
    b >= max(-s l, u - s u). In float64, -s l is exact (a product of two float32 numbers) and
    u - s u is s u (exact) subtracted from u with one rounding, at most 2^-53 of the result;
    so max(...) (1 + 2^-50), itself rounded once, is at least the exact maximum, and rounding
    that up to float32 (one step up wherever the nearest float32 is below it) gives a sound b.
    """
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    slope = u / (u - l)  # inf or nan on stable neurons with l = u: replaced below
    s64, l64, u64 = slope.double(), l.double(), u.double()
    need = torch.maximum(-(s64 * l64), u64 - s64 * u64)
    need = need + need.abs() * 2.0 ** -50
    bias = need.float()
    bias = torch.where(bias.double() < need, torch.nextafter(bias, torch.full_like(bias, float("inf"))), bias)
    zero = torch.zeros_like(l)
    up_s = torch.where(unstable, slope, active.to(l.dtype))
    up_b = torch.where(unstable, bias, zero)
    # the free lower slope through the origin: 1 when the positive side is wider (area heuristic)
    lo_s = (active | (unstable & (u > -l))).to(l.dtype)
    return LinearRelaxation(lo_s, zero, up_s, up_b, alpha_mask=unstable, alpha_range=(0.0, 1.0))


def leaky_relu_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    return _leaky_relaxation(l, u, float(op.alpha) if op is not None else 0.01)


# ---------------------------------------------------------------- S-shaped (sigmoid, tanh)
def _sigmoid_grad(x: Tensor) -> Tensor:
    return torch.sigmoid(x) * torch.sigmoid(-x)  # = s (1 - s), without the cancellation in 1 - s


def _tanh_grad(x: Tensor) -> Tensor:
    return torch.cosh(x).reciprocal() ** 2  # = 1 - tanh^2, without the cancellation


def _tangent(f, df, d: Tensor):
    s = df(d)
    return s, f(d) - s * d


def _tangent_line(f, df, t: Tensor, l: Tensor, u: Tensor, above: bool):
    """The tangent at t, for use as a bound on [l, u]: computed in float64, then rounded by
    `_round_line` (slope in t's dtype, intercept in float64 moved outward by the slope's
    rounding error times max(|l|, |u|), for `_fit` to round outward)."""
    t64 = t.double()
    s64 = df(t64)
    return _round_line(s64, f(t64) - s64 * t64, l.double(), u.double(), t.dtype, above)


def _tangent_through(f, df, anchor: Tensor, lo: Tensor, hi: Tensor, iters: int = 30) -> Tensor:
    """A tangent point d in [lo, hi] whose tangent line stays on the valid side of f(anchor).

    The tangent at d passes above (for d >= 0 and anchor < 0) or below (d <= 0, anchor > 0) the
    point (anchor, f(anchor)) for d far from 0; bisection moves towards the touching point while
    keeping the end that is still valid, so the result is always sound.
    """
    valid, invalid = hi.clone(), lo.clone()  # hi end: far from the inflection point, always valid
    fa = f(anchor)
    above = anchor < 0  # upper bound through a left anchor, else lower bound through a right one
    for _ in range(iters):
        mid = (valid + invalid) / 2
        s, b = _tangent(f, df, mid)
        gap = s * anchor + b - fa
        ok = torch.where(above, gap >= 0, gap <= 0)
        valid = torch.where(ok, mid, valid)
        invalid = torch.where(ok, invalid, mid)
    return valid


def _s_shaped(f: Callable, df: Callable, l: Tensor, u: Tensor, variant: str) -> LinearRelaxation:
    """Sound lines for a function that is convex on x <= 0, concave on x >= 0, increasing."""
    if variant not in VARIANTS:
        raise VerikitError(f"unknown relaxation variant {variant!r}; known: {', '.join(VARIANTS)}")
    # the lines are computed in float64 and rounded once at the end (`_round_line`): slopes
    # computed in float32 can make a line cross f between the points `_fit` checks
    dtype = l.dtype
    l, u = l.double(), u.double()
    point = (u - l) <= _TINY_WIDTH
    u_safe = torch.where(point, l + 1.0, u)  # keeps every formula finite; point cases are replaced below
    fl, fu = f(l), f(u_safe)
    chord = (fu - fl) / (u_safe - l)
    convex, concave = u_safe <= 0, l >= 0
    if variant == "deeppoly":
        s_min = torch.minimum(df(l), df(u_safe))
        lo_s = torch.where(concave, chord, s_min)
        lo_b = fl - lo_s * l
        up_s = torch.where(convex, chord, s_min)
        up_b = fu - up_s * u_safe
    else:
        mid = (l + u_safe) / 2
        t_s, t_b = _tangent_line(f, df, mid, l, u_safe, above=False)
        t_s_up, t_b_up = _tangent_line(f, df, mid, l, u_safe, above=True)
        # crossing case: tangent through the far end point, or the chord if that is already valid
        d_up = _tangent_through(f, df, l, torch.zeros_like(l), torch.clamp(u_safe, min=0))
        d_lo = _tangent_through(f, df, u_safe, torch.zeros_like(l), torch.clamp(l, max=0))
        up_cross_s, up_cross_b = _tangent_line(f, df, d_up, l, u_safe, above=True)
        lo_cross_s, lo_cross_b = _tangent_line(f, df, d_lo, l, u_safe, above=False)
        chord_b = (fl - chord * l).double()
        up_chord_ok = chord <= df(u_safe)  # chord stays above f near u
        lo_chord_ok = chord <= df(l)
        up_cross_s = torch.where(up_chord_ok, chord, up_cross_s)
        up_cross_b = torch.where(up_chord_ok, chord_b, up_cross_b)
        lo_cross_s = torch.where(lo_chord_ok, chord, lo_cross_s)
        lo_cross_b = torch.where(lo_chord_ok, chord_b, lo_cross_b)
        lo_s = torch.where(convex, t_s, torch.where(concave, chord, lo_cross_s))
        lo_b = torch.where(convex, t_b, torch.where(concave, chord_b, lo_cross_b))
        up_s = torch.where(concave, t_s_up, torch.where(convex, chord, up_cross_s))
        up_b = torch.where(concave, t_b_up, torch.where(convex, chord_b, up_cross_b))
    # guard against rounding: where the line can touch f (end points, the inflection point),
    # move the intercept by any violation found, so the lines are sound in floating point
    probes = [l, u_safe, torch.clamp(torch.zeros_like(l), l, u_safe)]
    if variant == "crown":  # and where the tangents touch f
        probes += [mid, torch.clamp(d_lo, l, u_safe), torch.clamp(d_up, l, u_safe)]
    lo_s, lo_b = _round_line(lo_s, lo_b, l, u_safe, dtype, above=False)
    up_s, up_b = _round_line(up_s, up_b, l, u_safe, dtype, above=True)
    lo_b = _fit(lo_s, lo_b, probes, f, above=False)
    up_b = _fit(up_s, up_b, probes, f, above=True)
    zero = torch.zeros_like(l, dtype=dtype)
    # a point interval (or an almost-point) is bounded by constants: f is monotone; f(l) and
    # f(u) rounded outward too (to nearest they can miss f by an ulp)
    lo_c, up_c = _fit(zero, fl, [l], f, above=False), _fit(zero, f(u), [u], f, above=True)
    return LinearRelaxation(torch.where(point, zero, lo_s), torch.where(point, lo_c, lo_b),
                            torch.where(point, zero, up_s), torch.where(point, up_c, up_b))


def _round_line(s64: Tensor, b64: Tensor, l: Tensor, u: Tensor, dtype, above: bool):
    """A valid float64 line as a slope in `dtype` and a float64 intercept moved outward by
    |slope rounding| * max(|l|, |u|): the rounded line stays on the valid side of the float64
    line everywhere on [l, u] (`_fit` then rounds the intercept outward)."""
    s = s64.to(dtype)
    shift = (s.double() - s64).abs() * torch.maximum(l.abs(), u.abs())
    return s, b64 + shift if above else b64 - shift


def sigmoid_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    return _s_shaped(torch.sigmoid, _sigmoid_grad, l, u, variant)


def tanh_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    return _s_shaped(torch.tanh, _tanh_grad, l, u, variant)


# ---------------------------------------------------------------- Exp (convex)
# exp overflows float32 above ~88.7: inputs bounded above this are refused, not bounded by inf
EXP_MAX_INPUT = 80.0


def _convex_monotone_relaxation(f, df, l: Tensor, u: Tensor, dtype) -> LinearRelaxation:
    """Lines for a convex, monotone f on [l, u] (float64 bounds): the chord above, the tangent
    at the midpoint below; slopes rounded with the outward intercept shift of `_round_line`,
    intercepts checked at the touching points (`_fit`); constants on (near-)point intervals."""
    point = (u - l) <= _TINY_WIDTH
    u_safe = torch.where(point, l + 1.0, u)
    fl, fu = f(l), f(u_safe)
    chord = (fu - fl) / (u_safe - l)
    mid = (l + u_safe) / 2
    lo_s, lo_b = _tangent_line(f, df, mid, l, u_safe, above=False)
    lo_s, lo_b = _round_line(lo_s, lo_b, l, u_safe, dtype, above=False)
    up_s, up_b = _round_line(chord, fl - chord * l, l, u_safe, dtype, above=True)
    probes = [l, u_safe, mid]
    lo_b = _fit(lo_s, lo_b, probes, f, above=False)
    up_b = _fit(up_s, up_b, probes, f, above=True)
    zero = torch.zeros_like(l, dtype=dtype)
    f_l, f_u = f(l), f(u)
    lo_c = _fit(zero, torch.minimum(f_l, f_u), [l, u], f, above=False)
    up_c = _fit(zero, torch.maximum(f_l, f_u), [l, u], f, above=True)
    return LinearRelaxation(torch.where(point, zero, lo_s), torch.where(point, lo_c, lo_b),
                            torch.where(point, zero, up_s), torch.where(point, up_c, up_b))


def exp_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    """exp is convex: the chord is an upper line, any tangent a lower line (CROWN and DeepPoly
    alike: the tangent at the midpoint; `_convex_monotone_relaxation`)."""
    if variant not in VARIANTS:
        raise VerikitError(f"unknown relaxation variant {variant!r}; known: {', '.join(VARIANTS)}")
    if not (torch.isfinite(l).all() and torch.isfinite(u).all()):
        raise VerikitError("Exp: an input bound is not finite; no linear bound of exp holds there")
    if bool((u > EXP_MAX_INPUT).any()):
        raise VerikitError(f"Exp: an input's upper bound is {float(u.max()):.4g} > {EXP_MAX_INPUT:g}; exp would overflow "
                           "float32 there (bound the inputs tighter)")
    return _convex_monotone_relaxation(torch.exp, torch.exp, l.double(), u.double(), l.dtype)


def reciprocal_relaxation(l: Tensor, u: Tensor) -> LinearRelaxation:
    """1/s on [l, u] with l > 0 (convex, decreasing): chord above, midpoint tangent below.
    Used inside the softmax rule (softmax_i = 1 / sum_j exp(x_j - x_i), `softmax_lines.py`)."""
    if not bool((l > 0).all()) or not torch.isfinite(u).all():
        raise VerikitError("reciprocal: the lines need 0 < l <= u < inf")
    return _convex_monotone_relaxation(torch.reciprocal, lambda s: -torch.reciprocal(s * s), l.double(), u.double(),
                                       l.dtype)


# ---------------------------------------------------------------- Sign (piecewise constant)
SIGN_MAX_SLOPE = 1e4


def round_outward(lo64: Tensor, hi64: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """float64 bounds rounded outward to `dtype`: lo down, hi up (never inside the float64 ones)."""
    lo, hi = lo64.to(dtype), hi64.to(dtype)
    lo = torch.where(lo.double() > lo64, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    hi = torch.where(hi.double() < hi64, torch.nextafter(hi, torch.full_like(hi, math.inf)), hi)
    return lo, hi


def _slope_down(s64: Tensor, dtype) -> Tensor:
    """s64 rounded to `dtype`, downwards."""
    s = s64.to(dtype)
    return torch.where(s.double() > s64, torch.nextafter(s, torch.full_like(s, -math.inf)), s)


def sign_relaxation(l: Tensor, u: Tensor, variant: str = "crown", op: Optional[ir.Op] = None) -> LinearRelaxation:
    """Lines for sign on [l, u] (sign(0) = 0). Across 0 (l < 0 < u): lower -1 + (2/u) x (<= -1
    left of 0, <= 1 right of it), upper 1 + (2/-l) x; on [0, u]: lower x / u, upper 1; on
    [l, 0]: lower -1, upper x / -l; constants where the sign is fixed. The intercepts are exact
    (0, -1 or 1) and the slopes are rounded down (a smaller slope keeps every one of these lines
    on its side where it binds), so the lines hold in floating point. Same for both variants."""
    if variant not in VARIANTS:
        raise VerikitError(f"unknown relaxation variant {variant!r}; known: {', '.join(VARIANTS)}")
    dtype = l.dtype
    zero, one = torch.zeros_like(l), torch.ones_like(l)
    pos_u = torch.where(u > 0, u.double(), torch.ones_like(u, dtype=torch.float64))
    neg_l = torch.where(l < 0, -l.double(), torch.ones_like(l, dtype=torch.float64))
    cross, right, left = (l < 0) & (u > 0), (l == 0) & (u > 0), (l < 0) & (u == 0)
    # no sloped line steeper than SIGN_MAX_SLOPE: float error of s * z grows with s; the constant
    # lines (-1 below, 1 above) are valid on any interval
    steep_lo, steep_up = pos_u < 2.0 / SIGN_MAX_SLOPE, neg_l < 2.0 / SIGN_MAX_SLOPE
    right = right & ~steep_lo
    left = left & ~steep_up
    cross_lo, cross_up = cross & ~steep_lo, cross & ~steep_up
    lo_s = torch.where(cross_lo, _slope_down(2.0 / pos_u, dtype), torch.where(right, _slope_down(1.0 / pos_u, dtype), zero))
    lo_b = torch.where(cross | (l < 0), -one, torch.sign(l))  # l < 0: -1 (constant or the sloped line's intercept)
    lo_b = torch.where(right, zero, lo_b)
    up_s = torch.where(cross_up, _slope_down(2.0 / neg_l, dtype), torch.where(left, _slope_down(1.0 / neg_l, dtype), zero))
    up_b = torch.where(cross | (u > 0), one, torch.sign(u))
    up_b = torch.where(left, zero, up_b)
    return LinearRelaxation(lo_s, lo_b, up_s, up_b)


# ---------------------------------------------------------------- S-shaped, tangent points free
S_SHAPED = {ir.Sigmoid: (torch.sigmoid, _sigmoid_grad), ir.Tanh: (torch.tanh, _tanh_grad)}


@dataclass
class TangentRanges:
    """Where the tangent point of each S-shaped line may lie (alpha-CROWN for general
    activations): a tangent at any t in [lo_min, lo_max] is a valid lower line on [l, u], at any
    t in [up_min, up_max] a valid upper line; elements whose mask is False keep the fixed line."""

    lo_mask: Tensor
    lo_min: Tensor
    lo_max: Tensor
    up_mask: Tensor
    up_min: Tensor
    up_max: Tensor


def _s_shaped_functions(op: ir.Op):
    for t in type(op).__mro__:
        if t in S_SHAPED:
            return S_SHAPED[t]
    return None


def tangent_ranges(op: ir.Op, l: Tensor, u: Tensor) -> Optional[TangentRanges]:
    """For f increasing, convex on x <= 0 and concave on x >= 0: a tangent at t <= 0 lies below
    f on (-inf, 0] and, if it is below f(u) at u, below the chord of the concave part, so on all
    of [l, u]; its value at u grows with t (f'' >= 0 there), so every t up to the one whose
    tangent passes through (u, f(u)) is valid. Mirrored for upper lines. None: not S-shaped."""
    fns = _s_shaped_functions(op)
    if fns is None:
        return None
    f, df = fns
    wide = (u - l) > _TINY_WIDTH
    u_safe = torch.where(wide, u, l + 1.0)
    chord = (f(u_safe) - f(l)) / (u_safe - l)
    convex, concave = u_safe <= 0, l >= 0
    zero = torch.zeros_like(l)
    d_lo = _tangent_through(f, df, u_safe, zero, torch.clamp(l, max=0))  # valid end: l
    d_up = _tangent_through(f, df, l, zero, torch.clamp(u_safe, min=0))  # valid end: u
    crossing = ~(convex | concave)
    lo_mask = wide & (convex | (crossing & (chord > df(l))))
    up_mask = wide & (concave | (crossing & (chord > df(u_safe))))
    lo_max = torch.where(convex, u_safe, torch.minimum(d_lo, zero))
    up_min = torch.where(concave, l, torch.maximum(d_up, zero))
    return TangentRanges(lo_mask, l, torch.maximum(lo_max, l), up_mask, torch.minimum(up_min, u_safe), u_safe)


def tangent_lines(op: ir.Op, l: Tensor, u: Tensor, t_lo: Tensor, t_up: Tensor, fixed: LinearRelaxation,
                  ranges: TangentRanges) -> LinearRelaxation:
    """Lines tangent at t_lo (lower) and t_up (upper), (B, m, *shape) after clamping into their
    ranges, where the mask allows, else `fixed`'s lines. Differentiable in t; the intercepts are
    moved outward for rounding (as `_fit` does for every line) by a constant correction."""
    f, df = _s_shaped_functions(op)
    ex = lambda t: t.unsqueeze(1)  # per-sample (B, *s) -> broadcast over rows
    t_lo = torch.minimum(torch.maximum(t_lo, ex(ranges.lo_min)), ex(ranges.lo_max))
    t_up = torch.minimum(torch.maximum(t_up, ex(ranges.up_min)), ex(ranges.up_max))
    out = []
    for t, mask, slope0, bias0, above in ((t_lo, ranges.lo_mask, fixed.lower_slope, fixed.lower_bias, False),
                                           (t_up, ranges.up_mask, fixed.upper_slope, fixed.upper_bias, True)):
        l_t, u_t = ex(l).expand_as(t), ex(u).expand_as(t)
        s, b64 = _tangent_line(f, df, t, l_t, u_t, above)
        with torch.no_grad():
            probes = [l_t, u_t, torch.minimum(torch.maximum(torch.zeros_like(t), l_t), u_t), t]
            fitted = _fit(s.detach(), b64.detach(), probes, f, above=above)
        b = b64.to(s.dtype)
        b = fitted + (b - b.detach())  # the value is exactly `fitted`; the gradient is the tangent's
        m = ex(mask)
        out += [torch.where(m, s, ex(slope0)), torch.where(m, b, ex(bias0))]
    return LinearRelaxation(*out)


# the table: every element-wise activation type in the IR must appear here (a test checks it)
RELAXATIONS: dict[type, Callable[..., LinearRelaxation]] = {
    ir.ReLU: relu_relaxation,
    ir.LeakyReLU: leaky_relu_relaxation,
    ir.Sigmoid: sigmoid_relaxation,
    ir.Tanh: tanh_relaxation,
    ir.Exp: exp_relaxation,
    ir.Sign: sign_relaxation,
}


def relaxation_for(op: ir.Op, l: Tensor, u: Tensor, variant: str = "crown") -> LinearRelaxation:
    """Sound linear bounds of the element-wise activation `op` on [l, u]."""
    for t in type(op).__mro__:
        if t in RELAXATIONS:
            return RELAXATIONS[t](l, u, variant, op)
    raise VerikitError(f"no linear relaxation for {op.op_type}")


# ---------------------------------------------------------------- max-pooling
@dataclass
class MaxPoolRelaxation:
    """Per pooling window: y >= x[argmax of lower bounds] always; y <= that same input when its
    lower bound beats every other input's upper bound (`exact`), else y <= max upper bound.

    `windows` maps the window layout back to the input: `index` (B, C, L) is the flat position
    (in the padded input) of the chosen element, L = number of windows.
    """

    index: Tensor  # (B, C, L) flat positions in the padded input
    exact: Tensor  # (B, C, L) bool
    upper_const: Tensor  # (B, C, L) max upper bound of the window
    padded_hw: tuple  # (Hp, Wp) of the padded input
    pads: tuple  # F.pad order (left, right, top, bottom); may be negative (cropping)


def _pool_geometry(op: ir.MaxPool2d, in_hw: tuple, out_hw: tuple):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel, op.stride, op.padding, op.dilation
    need_h = (out_hw[0] - 1) * sh + dh * (kh - 1) + 1
    need_w = (out_hw[1] - 1) * sw + dw * (kw - 1) + 1
    pads = (pw, need_w - in_hw[1] - pw, ph, need_h - in_hw[0] - ph)
    return pads, (need_h, need_w)


def maxpool_relaxation(op: ir.MaxPool2d, l: Tensor, u: Tensor, out_hw: tuple) -> MaxPoolRelaxation:
    B, C, H, W = l.shape
    pads, padded_hw = _pool_geometry(op, (H, W), out_hw)
    unfold = lambda t: F.unfold(F.pad(t, pads, value=float("-inf")), op.kernel, op.dilation, 0, op.stride)
    # (B, C*K, L) -> (B, C, K, L)
    lw = unfold(l).reshape(B, C, -1, out_hw[0] * out_hw[1])
    uw = unfold(u).reshape(B, C, -1, out_hw[0] * out_hw[1])
    best_lower, k = lw.max(dim=2)  # (B, C, L)
    others = uw.scatter(2, k.unsqueeze(2), float("-inf")).amax(dim=2)
    exact = best_lower >= others
    upper_const = uw.amax(dim=2)
    # flat padded-input position of element k in window L
    positions = torch.arange(padded_hw[0] * padded_hw[1], device=l.device, dtype=l.dtype).reshape(1, 1, *padded_hw)
    pos_w = F.unfold(positions, op.kernel, op.dilation, 0, op.stride).reshape(-1, out_hw[0] * out_hw[1])  # (K, L)
    index = pos_w.long().expand(B, C, -1, -1).gather(2, k.unsqueeze(2)).squeeze(2)
    return MaxPoolRelaxation(index, exact, upper_const, padded_hw, pads)
