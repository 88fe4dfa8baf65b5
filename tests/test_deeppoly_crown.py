"""DeepPoly, CROWN and alpha-CROWN: soundness (sampling, exact oracle), exactness (linear
nets, eps = 0), reuse of stored bounds, batching and chunking, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.domains import get_domain
from verikit.errors import VerikitError
from verikit.spec import Spec

import backsub_graphs as bg
from exact_oracle import exact_min

DOMAINS = {"deeppoly": ("deeppoly", {}), "crown": ("crown", {}), "alpha-crown": ("crown", {"alpha_steps": 6})}


def make(label, **extra):
    name, opts = DOMAINS[label]
    return get_domain(name, **{**opts, **extra})


def sampled_values(graph, box, n=400, seed=0):
    """Every node's value at n points of each box: name -> (n, B, *shape)."""
    xs = box.sample(n, torch.Generator().manual_seed(seed))
    flat = xs.reshape((-1,) + tuple(xs.shape[2:]))
    with torch.no_grad():
        values = graph.forward(flat, return_all=True)
    return {k: v.reshape(xs.shape[:2] + v.shape[1:]) for k, v in values.items()}


def sampled_outputs(graph, box, n=400, seed=0):
    y = sampled_values(graph, box, n, seed)[graph.output]
    return y.reshape(y.shape[0], y.shape[1], -1)  # (n, B, m)


def test_graphs_cover_every_op_type():
    types = set()
    for g, _ in list(bg.graphs().values()) + list(bg.linear_graphs().values()):
        types.update(type(n.op) for n in g.nodes)
    assert set(ir.ALL_OP_TYPES) <= types, set(ir.ALL_OP_TYPES) - types


@pytest.mark.parametrize("label", list(DOMAINS))
@pytest.mark.parametrize("graph_name", list(bg.graphs()))
def test_sound_by_sampling(label, graph_name):
    graph, shape = bg.graphs()[graph_name]
    box = bg.input_box(torch.Generator().manual_seed(1), shape, batch=3, width=0.6)
    res = make(label).bound(graph, box)
    values = sampled_values(graph, box)
    y = values[graph.output].flatten(2)
    assert (y >= res.lower - 1e-9).all() and (y <= res.upper + 1e-9).all()
    for name, v in values.items():  # every intermediate bound in the store is sound too
        stored = res.store[name]
        assert ((v >= stored.lo - 1e-9) & (v <= stored.hi + 1e-9)).all(), name


@pytest.mark.parametrize("label", list(DOMAINS))
@pytest.mark.parametrize("graph_name", list(bg.graphs()))
def test_eps_zero_gives_the_output(label, graph_name):
    graph, shape = bg.graphs()[graph_name]
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(4), dtype=bg.DT)
    res = make(label).bound(graph, Box(x, x))
    y = graph(x).reshape(2, -1)
    torch.testing.assert_close(res.lower, y, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.upper, y, atol=1e-9, rtol=0)


def _true_range(graph, box):
    """Exact range of an affine graph over a box: f(c) -/+ |J| r with J from autograd."""
    outs = []
    for b in range(box.lo.shape[0]):
        c, r = box.center[b:b + 1], box.radius[b:b + 1]
        J = torch.autograd.functional.jacobian(lambda x: graph(x).reshape(-1), c).reshape(-1, c.numel())
        y = graph(c).reshape(-1)
        spread = J.abs() @ r.reshape(-1)
        outs.append((y - spread, y + spread))
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


@pytest.mark.parametrize("label", ["deeppoly", "crown"])
@pytest.mark.parametrize("graph_name", list(bg.linear_graphs()))
def test_linear_nets_are_exact(label, graph_name):
    graph, shape = bg.linear_graphs()[graph_name]
    box = bg.input_box(torch.Generator().manual_seed(5), shape, batch=2, width=1.0)
    lo, hi = _true_range(graph, box)
    res = make(label).bound(graph, box)
    torch.testing.assert_close(res.lower, lo, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.upper, hi, atol=1e-9, rtol=0)
    box_res = get_domain("box").bound(graph, box)  # the graph has a DAG: box is strictly looser here
    if graph_name == "linear-conv-dag":
        assert (box_res.upper - box_res.lower).sum() > (hi - lo).sum() * 1.01


@pytest.mark.parametrize("seed", range(4))
def test_exact_oracle_small_relu_nets(seed):
    graph = bg.dense_net(ir.ReLU, seed=seed, widths=(3, 5, 4, 3))
    box = bg.input_box(torch.Generator().manual_seed(10 + seed), (3,), batch=1, width=0.8)
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], dtype=bg.DT)
    spec = Spec(C, torch.zeros(3, dtype=bg.DT))
    lo, hi = box.lo[0].numpy(), box.hi[0].numpy()
    exact = np.array([exact_min(graph, lo, hi, c) for c in C.numpy()])
    results = {label: make(label).bound(graph, box, spec).lower[0].numpy() for label in DOMAINS}
    results["box"] = get_domain("box").bound(graph, box, spec).lower[0].numpy()
    for label, lower in results.items():
        assert (lower <= exact + 1e-9).all(), (label, lower, exact)
    assert (results["alpha-crown"] >= results["crown"] - 1e-12).all()
    assert (results["crown"] >= results["box"] - 1e-12).all()  # intersected with box: never looser


def test_alpha_crown_never_looser_and_helps():
    gains = []
    for seed in range(3):
        graph = bg.dense_net(ir.ReLU, seed=seed, widths=(5, 16, 16, 4))
        box = bg.input_box(torch.Generator().manual_seed(seed), (5,), batch=4, width=1.0)
        plain = make("crown").bound(graph, box).lower
        alpha = make("alpha-crown", alpha_steps=20).bound(graph, box).lower
        assert (alpha >= plain).all()
        gains.append((alpha - plain).sum().item())
    assert sum(gains) > 1e-3  # the optimisation does something on nets with many unstable ReLUs


def test_crown_is_tighter_than_box_on_deep_nets():
    graph = bg.dense_net(ir.ReLU, seed=1, widths=(5, 16, 16, 16, 4))
    box = bg.input_box(torch.Generator().manual_seed(0), (5,), batch=4, width=0.3)
    res_box = get_domain("box").bound(graph, box)
    for label in ("deeppoly", "crown"):
        res = make(label).bound(graph, box)
        raw = res.info["backsub_lower"]
        assert raw.mean() > res_box.lower.mean()  # the back-substituted bound itself, not the intersection


def test_spec_folding_bounds_the_margins():
    graph = bg.dense_net(ir.ReLU, seed=2, widths=(4, 8, 3))
    box = bg.input_box(torch.Generator().manual_seed(2), (4,), batch=3, width=0.5)
    spec = Spec.robustness(torch.tensor([0, 1, 2]), 3, dtype=bg.DT)
    for label in DOMAINS:
        res = make(label).bound(graph, box, spec)
        assert res.lower.shape == (3, 2)
        margins = torch.stack([spec.values(y) for y in sampled_outputs(graph, box)])
        assert (margins >= res.lower - 1e-9).all()
        # folding C into the last layer is at least as tight as combining raw output bounds
        raw = make(label).bound(graph, box)
        C = spec.C
        combined = (C.clamp(min=0) @ raw.lower.unsqueeze(-1) + C.clamp(max=0) @ raw.upper.unsqueeze(-1)).squeeze(-1)
        assert (res.lower >= combined - 1e-9).all()


@pytest.mark.parametrize("label", list(DOMAINS))
def test_batched_equals_one_by_one(label):
    graph, shape = bg.graphs()["conv-mix"]
    box = bg.input_box(torch.Generator().manual_seed(7), shape, batch=3, width=0.3)
    together = make(label).bound(graph, box)
    for b in range(3):
        alone = make(label).bound(graph, box[b:b + 1])
        # (alpha-CROWN too: Adam's updates are element-wise, so samples do not interact)
        torch.testing.assert_close(alone.lower, together.lower[b:b + 1], atol=1e-10, rtol=0)
        torch.testing.assert_close(alone.upper, together.upper[b:b + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("graph_name", ["conv-mix", "dag", "relu-mlp"])
def test_chunking_does_not_change_bounds(graph_name):
    graph, shape = bg.graphs()[graph_name]
    box = bg.input_box(torch.Generator().manual_seed(8), shape, batch=2, width=0.5)
    big = make("crown").bound(graph, box)
    small = make("crown", max_rows_per_chunk=4).bound(graph, box)
    torch.testing.assert_close(small.lower, big.lower, atol=1e-10, rtol=0)
    torch.testing.assert_close(small.upper, big.upper, atol=1e-10, rtol=0)
    assert small.info["rows_bounded"] == big.info["rows_bounded"]
    dense = make("crown", spatial_windows=False).bound(graph, box)  # conv windows change nothing
    torch.testing.assert_close(dense.lower, big.lower, atol=1e-10, rtol=0)
    torch.testing.assert_close(dense.upper, big.upper, atol=1e-10, rtol=0)


@pytest.mark.parametrize("label", list(DOMAINS))
def test_store_bounds_are_reused_and_only_tightened(label):
    graph, shape = bg.graphs()["relu-mlp"]
    box = bg.input_box(torch.Generator().manual_seed(9), shape, batch=2, width=0.6)
    box_store = get_domain("box").bound(graph, box).store
    before = {k: v for k, v in box_store.items()}
    res = make(label).bound(graph, box, store=box_store)
    for name, old in before.items():
        new = res.store[name]
        assert (new.lo >= old.lo).all() and (new.hi <= old.hi).all(), name
    # an externally tightened pre-activation bound is kept, not replaced by a looser one
    first = make(label).bound(graph, box)
    store = BoundStore()
    pre = first.store["fc1"]
    mid = (pre.lo + pre.hi) / 2
    store.update("fc1", Box(torch.minimum(mid, pre.hi), pre.hi))  # pretend a tighter lower bound is known
    res2 = make(label).bound(graph, box, store=store)
    assert (res2.store["fc1"].lo >= mid).all()
    assert not torch.equal(res2.lower, first.lower)  # and it is used by the relaxation


def test_options_and_errors():
    with pytest.raises(VerikitError):
        get_domain("crown", alpha_steps=-1)
    with pytest.raises(VerikitError):
        get_domain("crown", alpha_lr=0)
    with pytest.raises(VerikitError):
        get_domain("deeppoly", alpha_steps=3)  # deeppoly has no alpha
    with pytest.raises(VerikitError):
        get_domain("crown", max_rows_per_chunk=1).bound(*_tiny())
    from verikit.domains.crown import CLI_OPTION_FLAGS

    assert CLI_OPTION_FLAGS["alpha_steps"] == "--alpha-steps"
    for name in ("deeppoly", "crown"):
        cls = type(get_domain(name))
        assert not cls.complete and cls.description


def _tiny():
    graph = bg.dense_net(ir.ReLU, widths=(2, 3, 2))
    return graph, bg.input_box(torch.Generator().manual_seed(0), (2,), batch=1)


def test_float32_graphs_work():
    graph = bg.dense_net(ir.ReLU, seed=0, widths=(4, 8, 3)).to(dtype=torch.float32)
    box = bg.input_box(torch.Generator().manual_seed(0), (4,), batch=2).to(dtype=torch.float32)
    for label in DOMAINS:
        res = make(label).bound(graph, box)
        assert res.lower.dtype == torch.float32
        ys = sampled_outputs(graph, box)
        assert (ys >= res.lower - 1e-5).all() and (ys <= res.upper + 1e-5).all()


def test_batch_statistics_context():
    """BatchNorm in batch mode reuses the statistics a forward pass recorded (never those of
    the zero input that the engine evaluates ops at)."""
    graph, shape = bg.graphs()["conv-mix"]
    box = bg.input_box(torch.Generator().manual_seed(3), shape, batch=4, width=0.2)
    ctx = ir.EvalContext(bn_mode="batch")
    graph(box.center, ctx=ctx)  # records the clean batch's statistics
    stats = {k: tuple(t.clone() for t in v) for k, v in ctx.bn_stats.items()}
    res = make("crown").bound(graph, box, ctx=ctx)
    for k, v in ctx.bn_stats.items():
        assert all(torch.equal(a, b) for a, b in zip(v, stats[k]))
    xs = box.sample(50, torch.Generator().manual_seed(1))
    ys = torch.stack([graph(x, ctx=ctx).reshape(4, -1) for x in xs])
    assert (ys >= res.lower - 1e-9).all() and (ys <= res.upper + 1e-9).all()


@pytest.mark.parametrize("label", list(DOMAINS))
def test_activation_on_the_input(label):
    gen = torch.Generator().manual_seed(0)
    b = ir.GraphBuilder("x", (4,), bg.DT)
    h = b.add("act", ir.ReLU(), ["x"])
    h = b.add("fc", ir.Linear(torch.randn(3, 4, generator=gen, dtype=bg.DT)), [h])
    graph = b.build(h)
    box = bg.input_box(gen, (4,), batch=2, width=1.0)
    res = make(label).bound(graph, box)
    ys = sampled_outputs(graph, box)
    assert (ys >= res.lower - 1e-9).all() and (ys <= res.upper + 1e-9).all()
