"""Sigmoid/Tanh: optimised tangent points (relaxations.tangent_ranges / tangent_lines,
domains/s_shaped.py) are sound for every parameter value, alpha-CROWN tightens with them, and
input splitting decides small Sigmoid MLPs."""
import math
import time

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from test_milp import mlp as net
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.bab_input import input_split_search
from verikit.domains.linear_bounds import output_bounds, prepare
from verikit.domains.relaxations import relaxation_for, tangent_lines, tangent_ranges
from verikit.domains.s_shaped import TangentParameters
from verikit.spec import Spec, fold_spec
from verikit.torch_import import from_torch

OPS = {"sigmoid": (ir.Sigmoid(), torch.sigmoid), "tanh": (ir.Tanh(), torch.tanh)}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(OPS)), a=st.floats(-8, 8), w=st.floats(0.0, 10), seed=st.integers(0, 1000))
@example(kind="tanh", a=0.0005, w=0.0, seed=0)  # float32 slopes crossed f next to their touching point
@example(kind="tanh", a=0.0, w=0.0078125, seed=0)
@example(kind="sigmoid", a=4.0, w=9.5, seed=0)
@example(kind="sigmoid", a=1.0, w=0.0, seed=0)  # point interval: f(l) rounded to nearest
def test_any_tangent_point_gives_valid_lines(kind, a, w, seed):
    op, f = OPS[kind]
    gen = torch.Generator().manual_seed(seed)
    l = torch.tensor([[a, a - w / 3, -abs(a)]], dtype=torch.float32)
    u = l + torch.tensor([[w, w, 2 * abs(a) + w]], dtype=torch.float32)
    rng = tangent_ranges(op, l, u)
    assert bool((rng.lo_min <= rng.lo_max).all()) and bool((rng.up_min <= rng.up_max).all())
    fixed = relaxation_for(op, l, u)
    # random points, some outside the ranges on purpose (tangent_lines clamps them)
    t_lo = l.unsqueeze(1) + (torch.rand((1, 5, 3), generator=gen) * 1.4 - 0.2) * (u - l).unsqueeze(1)
    t_up = l.unsqueeze(1) + (torch.rand((1, 5, 3), generator=gen) * 1.4 - 0.2) * (u - l).unsqueeze(1)
    lines = tangent_lines(op, l, u, t_lo, t_up, fixed, rng)
    x = (l + torch.linspace(0, 1, 2001).reshape(-1, 1, 1) * (u - l)).unsqueeze(2)  # (k, 1, 1, 3)
    x = torch.cat([x, l.reshape(1, 1, 1, 3), u.reshape(1, 1, 1, 3)])
    fx = f(x.double())
    lo = lines.lower_slope.double() * x.double() + lines.lower_bias.double()
    up = lines.upper_slope.double() * x.double() + lines.upper_bias.double()
    assert bool((lo <= fx).all()) and bool((up >= fx).all())
    for variant in ("crown", "deeppoly"):  # the fixed lines of the table, on the same points
        rel = relaxation_for(op, l, u, variant)
        assert bool((rel.lower_slope.double() * x.double() + rel.lower_bias.double() <= fx).all())
        assert bool((rel.upper_slope.double() * x.double() + rel.upper_bias.double() >= fx).all())


@pytest.mark.parametrize("kind", sorted(OPS))
def test_random_tangent_parameters_give_sound_network_bounds(kind):
    act = torch.nn.Sigmoid if kind == "sigmoid" else torch.nn.Tanh
    graph = from_torch(net(1, [3, 12, 12, 4], act), (3,))
    spec = Spec(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)), torch.zeros(3))
    folded = fold_spec(graph, spec)
    x = torch.rand(2, 3)
    box = Box(x - 0.8, x + 0.8)
    with torch.no_grad():
        engine = prepare(folded, box, None, None, "crown", 4096)
    tangents = TangentParameters(engine, folded.output, 3)
    assert tangents.nodes
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tangents.params:
            p.copy_(torch.rand(p.shape, generator=gen))
        lam = torch.eye(3).expand(2, 3, 3)
        lower = engine.lower_bound(folded.output, lam, tangents.lines())
        pts = box.sample(3000, generator=gen)
        vals = spec.values(graph.forward(pts.reshape(-1, 3))).reshape(3000, 2, 3)
    assert bool((vals >= lower.unsqueeze(0) - 1e-5).all())


@pytest.mark.parametrize("kind", sorted(OPS))
def test_alpha_crown_optimises_s_shaped_tangents(kind):
    act = torch.nn.Sigmoid if kind == "sigmoid" else torch.nn.Tanh
    graph = from_torch(net(4, [4, 20, 20, 3], act), (4,))
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    box = Box(x - 0.5, x + 0.5)
    spec = Spec.robustness(torch.tensor([0, 1, 2]), 3)
    plain = get_domain("crown").bound(graph, box, spec).lower
    alpha = get_domain("crown", alpha_steps=30).bound(graph, box, spec).lower
    assert bool((alpha >= plain).all()) and float((alpha - plain).sum()) > 1e-3
    with torch.no_grad():
        y = graph.forward(box.sample(2000).reshape(-1, 4)).reshape(2000, 3, -1)
    margins = torch.einsum("bmn,kbn->kbm", spec.C, y) - spec.d
    assert bool((margins >= alpha.unsqueeze(0) - 1e-5).all())
    point = get_domain("crown", alpha_steps=10).bound(graph, Box(x, x.clone()), spec).lower
    with torch.no_grad():
        torch.testing.assert_close(point, spec.values(graph.forward(x)), atol=1e-5, rtol=0)


def _lipschitz(model, c):
    """An upper bound of the Lipschitz constant (L2) of c . model(x): spectral norms times the
    activations' largest slope (1/4 for Sigmoid)."""
    L = float(c.norm())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            L *= float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
        elif isinstance(layer, torch.nn.Sigmoid):
            L *= 0.25
    return L


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_input_splitting_decides_a_small_sigmoid_mlp(seed):
    model = net(seed, [2, 16, 16, 2], torch.nn.Sigmoid)
    graph = from_torch(model, (2,))
    box = Box(torch.full((1, 2), -1.5), torch.full((1, 2), 1.5))
    c = torch.tensor([1.0, -1.0])
    k = 401
    g = torch.linspace(-1.5, 1.5, k)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        vals = graph.forward(grid) @ c
    low = float(vals.min())
    slack = _lipschitz(model, c) * (3.0 / (k - 1)) * math.sqrt(2) / 2  # no point is farther from the grid
    spread = float(vals.max() - vals.min())
    holds = Spec(c[None], torch.tensor([low - slack - 0.02 * spread]))
    violated = Spec(c[None], torch.tensor([low + 0.02 * spread]))
    assert not bool(get_domain("crown").bound(graph, box, holds).verified(holds)[0])  # needs branching
    res = input_split_search(graph, holds, box, deadline=time.perf_counter() + 60)
    assert res.status == "verified" and res.visited > 1
    res = input_split_search(graph, violated, box, deadline=time.perf_counter() + 60)
    assert res.status == "falsified"
    with torch.no_grad():
        assert bool(violated.violated_by(graph.forward(res.counterexample[None]))[0])
