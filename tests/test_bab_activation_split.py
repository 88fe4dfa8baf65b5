"""bab's splits of Sigmoid/Tanh input intervals (GenBaB, domains/bab_activation_split.py):
children cover their parent, every child bound holds on the points of the child (sampling),
verdicts agree with a dense grid reference, never "verified" where a violation exists, and
the splits decide properties CROWN alone cannot."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_milp import mlp
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.alpha_beta import SubdomainBatch, bound_subdomains
from verikit.domains.bab_activation_split import narrowed, s_shaped_nodes, split_point
from verikit.spec import Spec, fold_spec
from verikit.torch_import import from_torch

ACTS = {"sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}


@given(st.floats(-50, 50), st.floats(1e-3, 100))
def test_split_point_lies_inside_and_prefers_zero(lo, width):
    lo_t, hi_t = torch.tensor([lo], dtype=torch.float64), torch.tensor([lo + width], dtype=torch.float64)
    t = float(split_point(lo_t, hi_t)[0])
    assert lo <= t <= lo + width
    if lo < 0 < lo + width and min(-lo, lo + width) >= 0.2 * width:
        assert t == 0.0
    (a_lo, a_hi), (b_lo, b_hi) = narrowed(lo_t, hi_t, 0)
    assert float(a_lo[0]) == lo and float(a_hi[0]) == t == float(b_lo[0]) and float(b_hi[0]) == lo + width


def _net(seed, act, sizes=(20, 12, 12, 3), scale=1.0):
    model = mlp(seed, list(sizes), ACTS[act])
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            layer.weight.data *= scale
    graph = from_torch(model, (sizes[0],))
    g = torch.Generator().manual_seed(seed)
    center = torch.rand(1, sizes[0], generator=g) * 2 - 1
    return graph, center


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.floats(0.05, 0.6), st.integers(0, 3))
def test_child_bounds_hold_on_the_points_of_each_child(seed, act, eps, steps):
    graph, center = _net(seed, act)
    box = Box(center - eps, center + eps)
    spec = Spec.robustness(torch.tensor([0]), 3)
    folded = fold_spec(graph, spec)
    root = bound_subdomains(folded, SubdomainBatch(box, {}), steps=0)
    # split the widest input interval of a Sigmoid/Tanh neuron of the second layer
    name = s_shaped_nodes(folded)[1]
    pre = folded.node(name).inputs[0]
    lo, hi = root.pre_bounds[pre]
    idx = int((hi - lo).reshape(-1).argmax())
    (l0, h0), (l1, h1) = narrowed(lo[0], hi[0], idx)
    bounds = {p: (torch.stack([b[0][0], b[0][0]]), torch.stack([b[1][0], b[1][0]])) for p, b in root.pre_bounds.items()}
    bounds[pre] = (torch.stack([l0, l1]), torch.stack([h0, h1]))
    two = Box(box.lo.expand(2, -1), box.hi.expand(2, -1))
    kids = bound_subdomains(folded, SubdomainBatch(two, {}, bounds), steps=steps)
    # (no floor: a narrower interval's lines are not tighter everywhere, so each child's own
    # bound is checked here; bab also keeps the parent's bound as a floor)
    x = box.lo + (box.hi - box.lo) * torch.rand(20_000, center.shape[1], generator=torch.Generator().manual_seed(seed))
    x = torch.cat([x, box.lo + (box.hi - box.lo) * (torch.rand(2_000, center.shape[1]) > 0.5)])  # corners too
    with torch.no_grad():
        values = folded.forward(x, return_all=True)
    z, y = values[pre].reshape(len(x), -1)[:, idx], values[folded.output].reshape(len(x), -1)
    t = float(h0.reshape(-1)[idx])
    for k, inside in enumerate((z <= t, z >= t)):
        if bool(kids.empty[k]):
            assert not bool(inside.any()), "a child with points was called empty"
            continue
        assert (y[inside] >= kids.lower[k] - 1e-5).all()


def _grid_case(seed, act, above, r):
    """A 2-input net (input splitting off, so bab must split neurons), the true minimum of
    y0 - y1 on [-r, r]^2 from a 401^2 grid plus a Lipschitz margin, and a threshold just
    below it (holds) or just above the grid minimum (violated)."""
    model = mlp(seed, [2, 16, 16, 2], ACTS[act])
    graph = from_torch(model, (2,))
    g = torch.linspace(-r, r, 401)
    with torch.no_grad():
        vals = graph.forward(torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)) @ torch.tensor([1.0, -1.0])
    slope = 0.25 if act == "sigmoid" else 1.0
    lip = slope ** 2 * math.sqrt(2) * math.prod(float(torch.linalg.matrix_norm(m.weight.detach(), 2))
                                                 for m in model if isinstance(m, torch.nn.Linear))
    d = float(vals.min()) + 0.01 if above else float(vals.min()) - lip * r / 200 - 0.01  # grid step 2r/400
    return graph, Box(torch.full((1, 2), -r), torch.full((1, 2), r)), Spec(torch.tensor([[1.0, -1.0]]), torch.tensor([d]))


# (seed, activation, radius): CROWN alone proves none of the "holds" cases
GRID_CASES = [(3, "sigmoid", 1.5), (1, "tanh", 0.5), (7, "tanh", 0.5)]


@pytest.mark.parametrize("seed,act,r", GRID_CASES)
def test_verdicts_agree_with_the_dense_grid_reference(seed, act, r):
    graph, box, holds = _grid_case(seed, act, False, r)
    assert not _crown_holds(graph, box, holds)
    res = get_domain("bab", timeout=60.0, input_split=False).bound(graph, box, holds)
    assert res.status == ["verified"], res.info
    graph, box, violated = _grid_case(seed, act, True, r)
    res = get_domain("bab", timeout=60.0, input_split=False).bound(graph, box, violated)
    assert res.status == ["falsified"], res.info
    with torch.no_grad():
        assert bool(violated.violated_by(graph.forward(res.counterexamples[0][None]))[0])


def _crown_holds(graph, box, spec):
    return bool(spec.holds_given_lower(get_domain("crown").bound(graph, box, spec).lower)[0])


def _queries(count=6, beyond=1.1):
    """Robustness queries on 20-input Sigmoid/Tanh MLPs at `beyond` times the largest radius
    CROWN proves (found by bisection): CROWN decides none of them by construction."""
    out = []
    for seed in range(count):
        act = ("sigmoid", "tanh")[seed % 2]
        graph, center = _net(seed, act, scale=4.0 if act == "sigmoid" else 1.0)  # (saturated otherwise)
        with torch.no_grad():
            spec = Spec.robustness(torch.tensor([int(graph.forward(center).argmax())]), 3)
        lo, hi = 0.0, 1.0
        for _ in range(10):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _crown_holds(graph, Box(center - mid, center + mid), spec) else (lo, mid)
        eps = beyond * lo
        out.append((graph, Box(center - eps, center + eps), spec))
    return out


def test_splits_verify_what_crown_cannot_and_never_a_violated_query():
    verified = 0
    for graph, box, spec in _queries():
        assert not _crown_holds(graph, box, spec)
        # 20 inputs: no input splitting. A domain cap rather than a short timeout ends the query
        # bab cannot decide, so a loaded machine changes how long this takes, not its verdicts
        res = get_domain("bab", timeout=40.0, max_domains=700).bound(graph, box, spec)
        x = box.lo + (box.hi - box.lo) * torch.rand(20_000, box.lo.shape[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            sampled_violation = bool(spec.expand(len(x)).violated_by(graph.forward(x)).any())
        if sampled_violation:
            assert res.status != ["verified"]
        if res.status == ["falsified"]:
            with torch.no_grad():
                assert bool(spec.violated_by(graph.forward(res.counterexamples[0][None]))[0])
        verified += int(res.status == ["verified"])
    assert verified >= 3, verified  # 5 of 6 here, each in under 5 s (at most 546 sub-domains) when idle


def test_a_mixed_relu_and_sigmoid_net_is_split_soundly():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(2, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.Sigmoid(),
                                torch.nn.Linear(12, 2)).eval()
    graph = from_torch(model, (2,))
    box = Box(torch.full((1, 2), -1.0), torch.full((1, 2), 1.0))
    g = torch.linspace(-1.0, 1.0, 201)
    with torch.no_grad():
        low = float((graph.forward(torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2))
                     @ torch.tensor([1.0, -1.0])).min())
    violated = Spec(torch.tensor([[1.0, -1.0]]), torch.tensor([low + 0.01]))
    res = get_domain("bab", timeout=30.0, input_split=False).bound(graph, box, violated)
    assert res.status == ["falsified"]
    assert get_domain("bab", timeout=0.0, input_split=False).bound(graph, box, violated).status == ["unknown"]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(ACTS)), st.floats(0.05, 0.8), st.floats(0.01, 10.0))
def test_any_interval_multiplier_gives_a_valid_bound(seed, act, eps, scale):
    """Random (unoptimised, either sign) gamma: the bound with the interval term still holds."""
    from verikit.domains.alpha_beta import split_store
    from verikit.domains.bab_activation_split import interval_constant, interval_nodes, interval_terms
    from verikit.domains.linear_bounds import LinearBoundEngine

    graph, center = _net(seed, act)
    box = Box(center - eps, center + eps)
    folded = fold_spec(graph, Spec.robustness(torch.tensor([1]), 3))
    store, _ = split_store(folded, SubdomainBatch(box, {}))
    engine = LinearBoundEngine(folded, store, None, "crown", 4096, True, None)
    engine.refine_intermediate()
    eye = torch.eye(2)[None]
    gen = torch.Generator().manual_seed(seed)
    gammas = {n: scale * torch.randn((1, 2) + tuple(folded.shapes[folded.node(n).inputs[0]]), generator=gen)
              for n in interval_nodes(folded)}
    assert gammas
    lower = interval_constant(folded, store, gammas, engine.lower_bound(folded.output, eye, None, interval_terms(gammas)))
    x = box.lo + (box.hi - box.lo) * torch.rand(20_000, center.shape[1], generator=gen)
    with torch.no_grad():
        y = folded.forward(x)
    assert (y >= lower).all()
