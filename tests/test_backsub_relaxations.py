"""The shared relaxation table: every line is sound on its interval, in every regime."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verikit import ir
from verikit.domains.relaxations import RELAXATIONS, VARIANTS, maxpool_relaxation, relaxation_for

OPS = [ir.ReLU(), ir.LeakyReLU(0.1), ir.LeakyReLU(1.7), ir.Sigmoid(), ir.Tanh(), ir.Exp(), ir.Sign()]


def test_table_covers_every_activation():
    assert {t for t in ir.ALL_OP_TYPES if t.is_activation} <= set(RELAXATIONS)


def _check(op, l, u, variant, dtype, tol):
    l, u = l.to(dtype), u.to(dtype)
    rel = relaxation_for(op, l, u, variant)
    t = torch.linspace(0, 1, 201, dtype=dtype).reshape(-1, 1)
    # (201, n) points including both ends, kept inside [l, u] (l + (u - l) can round past u,
    # which matters for a discontinuous op such as Sign)
    xs = torch.minimum(torch.maximum(l + t * (u - l), l), u)
    f = op.forward(xs)
    tol = tol * (1 + f.abs())  # relative: float32 rounds lines through values of size |f|
    lower = rel.lower_slope * xs + rel.lower_bias
    upper = rel.upper_slope * xs + rel.upper_bias
    assert (lower <= f + tol).all(), (op, variant, (lower - f).max())
    assert (upper >= f - tol).all(), (op, variant, (f - upper).max())
    if rel.alpha_mask is not None:  # every free slope in the range is sound too
        lo_a, hi_a = rel.alpha_range
        for a in (lo_a, (lo_a + hi_a) / 2, hi_a):
            s = torch.where(rel.alpha_mask, torch.full_like(l, a), rel.lower_slope)
            assert (s * xs + torch.where(rel.alpha_mask, 0, rel.lower_bias) <= f + tol).all()
    return rel


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.describe())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_grid_of_intervals(op, variant, dtype, tol):
    # convex-only, concave-only, crossing, wide, tiny and point intervals
    ends = torch.tensor([-30.0, -6.0, -2.0, -0.5, -1e-9, 0.0, 1e-9, 0.3, 1.0, 4.0, 25.0])
    l, u = torch.meshgrid(ends, ends, indexing="ij")
    keep = l <= u
    _check(op, l[keep], u[keep], variant, dtype, tol)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-12, 12), st.floats(0, 15)), min_size=1, max_size=20),
       st.sampled_from(OPS), st.sampled_from(VARIANTS))
def test_random_intervals(pairs, op, variant):
    l = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    u = l + torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    _check(op, l, u, variant, torch.float64, 1e-12)


def test_crown_tangents_are_no_looser_than_deeppoly_on_average():
    l = torch.linspace(-5, 3, 60, dtype=torch.float64).repeat(60)
    u = l + torch.linspace(0.1, 6, 60, dtype=torch.float64).repeat_interleave(60)
    for op in (ir.Sigmoid(), ir.Tanh()):
        gaps = {}
        for variant in VARIANTS:
            rel = relaxation_for(op, l, u, variant)
            t = torch.linspace(0, 1, 101, dtype=torch.float64).reshape(-1, 1)
            xs = l + t * (u - l)
            gaps[variant] = ((rel.upper_slope * xs + rel.upper_bias) - (rel.lower_slope * xs + rel.lower_bias)).mean()
        assert gaps["crown"] < gaps["deeppoly"]


def test_maxpool_relaxation_exact_when_one_input_dominates():
    l = torch.tensor([[[[5.0, 0.0], [1.0, 2.0]]]])
    u = torch.tensor([[[[6.0, 1.0], [3.0, 4.0]]]])
    rel = maxpool_relaxation(ir.MaxPool2d((2, 2), (2, 2)), l, u, (1, 1))
    assert rel.exact.all() and rel.index.item() == 0
    rel2 = maxpool_relaxation(ir.MaxPool2d((2, 2), (2, 2)), l - torch.tensor([[[[2.0, 0, 0, 0]]]]).reshape(1, 1, 2, 2), u, (1, 1))
    assert not rel2.exact.any() and rel2.upper_const.item() == 6.0


def _fit_one_point_at_a_time(slope, bias, points, f, above):
    """The definition of relaxations._fit, point by point: the intercept moved until the line is
    on the right side of f at every point (float64 check with slack), rounded outward."""
    s64, b64 = slope.double(), bias.double()
    sign = 1 if above else -1
    gaps = []
    for p in points:
        fp, sp = f(p.double()), s64 * p.double()
        gaps.append(sign * (fp - (sp + b64)) + 2.0 ** -51 * (fp.abs() + sp.abs() + b64.abs()))
    need = b64 + sign * torch.stack(gaps).amax(0).clamp(min=0)
    out = need.to(slope.dtype)
    wrong = out.double() < need if above else out.double() > need
    return torch.where(wrong, torch.nextafter(out, torch.full_like(out, float("inf") if above else float("-inf"))), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("f", [lambda x: torch.where(x >= 0, x, 0.1 * x), torch.sigmoid, torch.tanh, torch.exp])
def test_fit_moves_intercepts_as_point_by_point(dtype, f):
    """All points at once give the intercepts of the point-by-point definition, bit for bit."""
    from verikit.domains.relaxations import _fit

    gen = torch.Generator().manual_seed(7)
    for trial in range(5):
        l = (torch.randn(64, generator=gen) * 4).to(dtype)
        u = l + torch.rand(64, generator=gen).to(dtype) * 6
        slope = torch.rand(64, generator=gen).to(dtype)
        bias = (torch.randn(64, generator=gen) * 2).to(dtype)
        points = [l, u, torch.clamp(torch.zeros_like(l), l, u)][: 1 + trial % 3]
        for above in (True, False):
            assert torch.equal(_fit(slope, bias, points, f, above), _fit_one_point_at_a_time(slope, bias, points, f, above))


def _float32_intervals(seed: int, n: int = 4000):
    """float32 (l, u) with l <= u across magnitudes: unstable ones from tiny to huge on either
    side, stable ones, points (l = u, 0 included) and ends one ulp apart."""
    gen = torch.Generator().manual_seed(seed)
    mag = lambda: torch.exp(torch.empty(n).uniform_(-60, 60, generator=gen))  # e^-60 .. e^60
    l = -mag() * (torch.rand(n, generator=gen) < 0.85)  # some l = 0
    u = mag() * (torch.rand(n, generator=gen) < 0.9)
    flip = torch.rand(n, generator=gen) < 0.2  # stable intervals: both ends on one side
    l, u = torch.where(flip, u * 0.5, l), torch.where(flip, u, u)
    l, u = l.float(), u.float()
    point = torch.rand(n, generator=gen) < 0.05
    l = torch.where(point, u, l)
    near = torch.rand(n, generator=gen) < 0.05  # u one ulp above a negative l ... still unstable when u > 0
    u = torch.where(near & (l < 0), torch.nextafter(torch.zeros_like(l), torch.ones_like(l)), u)
    return torch.minimum(l, u), torch.maximum(l, u)


@pytest.mark.parametrize("seed", range(3))
def test_float32_relu_fast_path_is_the_general_relaxation_and_exactly_sound(seed):
    """The float32 ReLU path: the same slopes and masks as the general (leaky) rule bit for bit,
    an upper intercept never more than one float32 step above its (often below: `_fit`'s slack
    grows with |s u|, while the exact argument needs none there), and the chord above the ReLU
    at both ends in exact rational arithmetic (on 4,000 intervals per seed, tiny to huge)."""
    from fractions import Fraction

    from verikit.domains.relaxations import _leaky_relaxation, relu_relaxation

    l, u = _float32_intervals(seed)
    fast, general = relu_relaxation(l, u), _leaky_relaxation(l, u, 0.0)
    for name in ("lower_slope", "lower_bias", "upper_slope", "alpha_mask"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    unstable = fast.alpha_mask
    assert bool(unstable.any()) and bool((~unstable).any())
    assert bool((fast.upper_bias[~unstable] == 0).all())
    b_fast, b_general = fast.upper_bias[unstable], general.upper_bias[unstable]
    assert bool((b_fast <= torch.nextafter(b_general, torch.full_like(b_general, float("inf")))).all())
    assert bool((b_fast < b_general).any())  # the cases where the general slack is wider
    for li, ui, si, bi in zip(l[unstable].tolist(), u[unstable].tolist(), fast.upper_slope[unstable].tolist(),
                              fast.upper_bias[unstable].tolist()):
        li, ui, si, bi = (Fraction(v) for v in (li, ui, si, bi))
        assert si * li + bi >= 0 and si * ui + bi >= ui  # above ReLU(l) = 0 and ReLU(u) = u


def test_float32_relu_fast_path_in_float64_stays_general():
    from verikit.domains.relaxations import _leaky_relaxation, relu_relaxation

    l, u = _float32_intervals(5, 500)
    l, u = l.double(), u.double()
    fast, general = relu_relaxation(l, u), _leaky_relaxation(l, u, 0.0)
    assert all(torch.equal(getattr(fast, k), getattr(general, k)) for k in ("lower_slope", "upper_slope", "upper_bias"))
