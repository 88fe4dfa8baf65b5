"""Optimised sub-domain bounds (domains/alpha_beta.py): every bound holds on points that satisfy
the split constraints, for optimised and for random alpha in [0, 1] and beta >= 0; with beta = 0
and no steps the bound is plain CROWN with the clipped (split) relaxations; eps = 0 collapses."""
import math
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from backsub_graphs import dense_net, input_box, conv_mix
from verikit import ir
from verikit.bounds import Box
from verikit.domains.alpha_beta import (SubdomainBatch, _params, bound_subdomains, relu_nodes, split_store)
from verikit.domains.linear_bounds import LinearBoundEngine, output_bounds

DT = torch.float64


def residual_net(seed=0):
    """Linear -> ReLU -> Linear -> (+ skip) -> ReLU -> Linear, with a BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    lin = lambda o, i: ir.Linear(torch.randn(o, i, generator=gen, dtype=DT) / i ** 0.5, torch.randn(o, generator=gen, dtype=DT) * 0.3)
    b = ir.GraphBuilder("x", (5,), DT)
    h = b.add("fc0", lin(8, 5), ["x"])
    r = b.add("relu0", ir.ReLU(), [h])
    h = b.add("fc1", lin(8, 8), [r])
    s = b.add("add", ir.Add(), [h, r])
    r = b.add("relu1", ir.ReLU(), [s])
    h = b.add("fc2", lin(3, 8), [r])
    return b.build(h)


def conv_relu_net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (1, 5, 5), DT)
    h = b.add("conv", ir.Conv2d(torch.randn(2, 1, 3, 3, generator=gen, dtype=DT) / 3, torch.randn(2, generator=gen, dtype=DT) * 0.3,
                                (1, 1), (1, 1)), ["x"])
    h = b.add("relu", ir.ReLU(), [h])
    h = b.add("pool", ir.MaxPool2d((2, 2), (2, 2)), [h])
    h = b.add("flat", ir.Reshape((8,)), [h])
    h = b.add("fc", ir.Linear(torch.randn(6, 8, generator=gen, dtype=DT) / 3, torch.randn(6, generator=gen, dtype=DT) * 0.3), [h])
    h = b.add("relu2", ir.ReLU(), [h])
    h = b.add("out", ir.Linear(torch.randn(3, 6, generator=gen, dtype=DT) / 2, torch.randn(3, generator=gen, dtype=DT) * 0.3), [h])
    return b.build(h)


NETS = {
    "mlp": lambda s: dense_net(ir.ReLU, seed=s, widths=(4, 10, 10, 3)),
    "residual": residual_net,
    "conv-pool": conv_relu_net,
}


def random_splits(graph, box, D, gen, max_splits=3):
    """D sub-domains of one box with random signs on unstable ReLUs (domain 0 unsplit)."""
    inputs = Box(box.lo.expand((D,) + box.lo.shape[1:]).clone(), box.hi.expand((D,) + box.hi.shape[1:]).clone())
    store, _ = split_store(graph, SubdomainBatch(inputs, {}))
    signs = {}
    for n in relu_nodes(graph):
        pre = store[n.inputs[0]]
        s = torch.zeros(pre.lo.shape, dtype=torch.int8)
        unstable = ((pre.lo < 0) & (pre.hi > 0)).reshape(D, -1)
        for d in range(1, D):
            idx = unstable[d].nonzero().flatten()
            pick = idx[torch.randperm(idx.numel(), generator=gen)[:max_splits]]
            vals = torch.randint(0, 2, (pick.numel(),), generator=gen).to(torch.int8) * 2 - 1
            s.view(D, -1)[d, pick] = vals
        signs[n.name] = s
    return SubdomainBatch(inputs, signs)


def sample_check(graph, box, batch, lower, n=20000, seed=0):
    """Points of the box that satisfy each sub-domain's splits never go below its bounds."""
    g = torch.Generator().manual_seed(seed)
    x = box.lo + torch.rand((n,) + box.lo.shape[1:], generator=g, dtype=DT) * (box.hi - box.lo)
    with torch.no_grad():
        vals = graph.forward(x, return_all=True)
    y = vals[graph.output].reshape(n, -1)
    checked = 0
    for d in range(lower.shape[0]):
        ok = torch.ones(n, dtype=torch.bool)
        for name, s in batch.signs.items():
            z = vals[graph.node(name).inputs[0]].reshape(n, -1)
            ok &= ((s[d].reshape(1, -1).to(DT) * z) >= 0).all(1)
        if ok.any():
            checked += 1
            assert bool((y[ok] >= lower[d] - 1e-9).all()), (d, y[ok].min(0).values, lower[d])
    return checked


@pytest.mark.parametrize("net", sorted(NETS))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_optimised_split_bounds_hold_on_points_satisfying_the_splits(net, seed):
    gen = torch.Generator().manual_seed(seed)
    graph = NETS[net](seed % 7)
    box = input_box(gen, graph.input_shape, batch=1, width=1.5)
    batch = random_splits(graph, box, 5, gen)
    res = bound_subdomains(graph, batch, steps=8, intermediate=True)
    assert sample_check(graph, box, batch, res.lower) >= 1


@pytest.mark.parametrize("net", sorted(NETS))
def test_random_alpha_and_beta_give_valid_bounds(net):
    """No optimisation at all: arbitrary slopes in [0, 1] and multipliers >= 0 are still sound."""
    gen = torch.Generator().manual_seed(1)
    graph = NETS[net](2)
    box = input_box(gen, graph.input_shape, batch=1, width=1.5)
    batch = random_splits(graph, box, 6, gen)
    store, _ = split_store(graph, batch)
    engine = LinearBoundEngine(graph, store, None, "crown")
    engine.refine_intermediate()
    m = math.prod(graph.output_shape)
    alphas, betas = _params(engine, graph.output, m, batch.signs, None, None)
    for trial in range(3):
        a = {k: torch.rand(v.shape, generator=gen, dtype=DT) for k, v in alphas.items()}
        b = {k: torch.rand(v.shape, generator=gen, dtype=DT) * 3 for k, v in betas.items()}
        res = bound_subdomains(graph, batch, steps=0, alpha_init=a, beta_init=b, intermediate=False, guard=False)
        sample_check(graph, box, batch, res.lower, seed=trial)
        assert bool(torch.isfinite(res.lower).all())


@pytest.mark.parametrize("net", sorted(NETS))
def test_beta_zero_without_steps_is_plain_crown_with_the_split_relaxations(net):
    gen = torch.Generator().manual_seed(3)
    graph = NETS[net](1)
    box = input_box(gen, graph.input_shape, batch=1, width=1.0)
    batch = random_splits(graph, box, 4, gen)
    res = bound_subdomains(graph, batch, steps=0, intermediate=False, guard=False)
    store, _ = split_store(graph, batch)
    engine = LinearBoundEngine(graph, store, None, "crown")
    engine.refine_intermediate()
    crown, _ = output_bounds(engine, upper=False)
    # equal to float64 rounding: the engine's live-neuron chains (relu_chain.py) sum in another
    # order than the general rules bound_subdomains uses with captured coefficients
    torch.testing.assert_close(res.lower, crown, rtol=1e-12, atol=1e-12)


def test_optimisation_only_tightens_and_beta_helps_split_domains():
    gen = torch.Generator().manual_seed(5)
    graph = NETS["mlp"](3)
    box = input_box(gen, graph.input_shape, batch=1, width=2.0)
    batch = random_splits(graph, box, 6, gen, max_splits=4)
    plain = bound_subdomains(graph, batch, steps=0, intermediate=False, guard=False)
    opt = bound_subdomains(graph, batch, steps=30, intermediate=True, guard=False)
    assert bool((opt.lower >= plain.lower - 1e-12).all())
    assert bool((opt.lower > plain.lower + 1e-6).any())


def test_guard_lowers_the_bound_by_the_rounding_errors():
    gen = torch.Generator().manual_seed(6)
    graph = NETS["mlp"](4).to(dtype=torch.float32)
    b64 = input_box(gen, graph.input_shape, batch=1, width=1.0)
    box = Box(b64.lo.float(), b64.hi.float())
    batch = SubdomainBatch(box, {n.name: torch.zeros((1,) + tuple(graph.shapes[n.name]), dtype=torch.int8)
                                 for n in relu_nodes(graph)})
    plain = bound_subdomains(graph, batch, steps=0, intermediate=False, guard=False).lower
    guarded = bound_subdomains(graph, batch, steps=0, intermediate=False, guard=True).lower
    assert bool((guarded < plain).all())
    assert bool(((plain - guarded) < 1e-3 * (1 + plain.abs())).all())


def test_zero_width_box_collapses_to_the_output():
    gen = torch.Generator().manual_seed(7)
    graph = NETS["residual"](0)
    x = torch.randn((1,) + tuple(graph.input_shape), generator=gen, dtype=DT)
    batch = SubdomainBatch(Box(x, x.clone()), {n.name: torch.zeros((1,) + tuple(graph.shapes[n.name]), dtype=torch.int8)
                                               for n in relu_nodes(graph)})
    res = bound_subdomains(graph, batch, steps=3, guard=False)
    with torch.no_grad():
        y = graph.forward(x).reshape(1, -1)
    assert torch.allclose(res.lower, y, atol=1e-12)


def test_contradictory_splits_are_empty():
    """x >= 0 (first neuron active) makes z = relu(x + 1) - 0.4 = x + 0.6 >= 0.6, so z <= 0 is
    impossible: only the beta terms in the intermediate bound of z can show it."""
    b = ir.GraphBuilder("x", (1,), DT)
    h = b.add("fc", ir.Linear(torch.tensor([[1.0], [1.0]], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT)), ["x"])
    h = b.add("relu", ir.ReLU(), [h])
    h = b.add("fc2", ir.Linear(torch.tensor([[0.0, 1.0]], dtype=DT), torch.tensor([-0.4], dtype=DT)), [h])
    h = b.add("relu2", ir.ReLU(), [h])
    h = b.add("out", ir.Linear(torch.tensor([[1.0]], dtype=DT), None), [h])
    graph = b.build(h)
    box = Box(torch.tensor([[-1.0]], dtype=DT), torch.tensor([[1.0]], dtype=DT))
    void = SubdomainBatch(box, {"relu": torch.tensor([[1, 0]], dtype=torch.int8), "relu2": torch.tensor([[-1]], dtype=torch.int8)})
    assert bool(bound_subdomains(graph, void, steps=30, lr_beta=0.2, intermediate=True).empty[0])
    feasible = SubdomainBatch(box, {"relu": torch.tensor([[1, 0]], dtype=torch.int8), "relu2": torch.tensor([[1]], dtype=torch.int8)})
    res = bound_subdomains(graph, feasible, steps=30, lr_beta=0.2, intermediate=True)
    assert not bool(res.empty[0])
    assert float(res.lower[0, 0]) <= 0.6 + 1e-9  # x = 0 gives 0.6


@pytest.mark.parametrize("net", sorted(NETS))
def test_children_refined_below_their_split_equal_a_full_refinement(net):
    """Children of bounded parents, each split once more on a ReLU of another layer, bounded
    with `changed` (only the nodes below each child's new split are back-substituted, in groups
    by layer) and without it (every node again): the same bounds, which hold on sampled points
    that satisfy the splits."""
    gen = torch.Generator().manual_seed(5)
    graph = NETS[net](3)
    box = input_box(gen, graph.input_shape, batch=1, width=1.5)
    parents = random_splits(graph, box, 3, gen, max_splits=1)
    parent = bound_subdomains(graph, parents, steps=2, intermediate=False)
    relus = [n.name for n in relu_nodes(graph)]
    signs = {n: [] for n in relus}
    bounds = {p: ([], []) for p in parent.pre_bounds}
    changed = []
    for k in range(3):
        for c, sign in enumerate((1, -1)):
            name = relus[(k + c) % len(relus)]  # children of one parent split on different layers too
            lo, hi = parent.pre_bounds[graph.node(name).inputs[0]]
            open_ = ((lo[k] < 0) & (hi[k] > 0) & (parents.signs[name][k] == 0)).reshape(-1).nonzero().flatten()
            for n in relus:
                s = parents.signs[n][k].clone()
                if n == name and open_.numel():
                    s.view(-1)[open_[0]] = sign
                signs[n].append(s)
            for p, (plo, phi) in parent.pre_bounds.items():
                bounds[p][0].append(plo[k])
                bounds[p][1].append(phi[k])
            changed.append((name,))
    inputs = Box(box.lo.expand((6,) + box.lo.shape[1:]), box.hi.expand((6,) + box.hi.shape[1:]))
    runs = []
    for ch in (changed, None):
        children = SubdomainBatch(inputs, {n: torch.stack(v) for n, v in signs.items()},
                                  {p: (torch.stack(lo), torch.stack(hi)) for p, (lo, hi) in bounds.items()}, ch)
        runs.append((children, bound_subdomains(graph, children, steps=2, intermediate=False)))
    (children, grouped), (_, full) = runs
    torch.testing.assert_close(grouped.lower, full.lower, rtol=1e-9, atol=1e-9)
    for p in full.pre_bounds:
        torch.testing.assert_close(grouped.pre_bounds[p][0], full.pre_bounds[p][0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grouped.pre_bounds[p][1], full.pre_bounds[p][1], rtol=1e-9, atol=1e-9)
    assert sample_check(graph, box, children, grouped.lower) >= 1


def test_steps_stop_once_the_caller_has_proven_every_sub_domain():
    """`proven` (the search's own test): no step once it holds for every sub-domain, every step
    while it does not; the bounds stay valid either way."""
    gen = torch.Generator().manual_seed(2)
    graph = NETS["mlp"](1)
    box = input_box(gen, graph.input_shape, batch=1, width=1.0)
    batch = random_splits(graph, box, 4, gen)
    all_proven = bound_subdomains(graph, batch, steps=6, intermediate=False, proven=lambda lo: torch.ones(lo.shape[0], dtype=torch.bool))
    none_proven = bound_subdomains(graph, batch, steps=6, intermediate=False, proven=lambda lo: torch.zeros(lo.shape[0], dtype=torch.bool))
    assert all_proven.steps == 0 and none_proven.steps == 6
    assert bool((none_proven.lower >= all_proven.lower - 1e-12).all())
    sample_check(graph, box, batch, all_proven.lower)
