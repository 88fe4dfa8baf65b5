"""The Box pass's fused affine groups (domains/box_fusion.py) against every node's own rule.

A fused group must give the same interval as its nodes one after the other (up to float
rounding), keep lazily computed boxes for the nodes inside it, stay off under autograd
(training's arithmetic is unchanged), follow in-place parameter changes (the weight cache),
use recorded batch statistics, and never fuse across a node with two consumers.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from verikit import ir
from verikit.bounds import Box
from verikit.domains.box import propagate_box
from verikit.domains.box_fusion import LazyBox, fusion_groups


def _bn(gen, c, key):
    return ir.BatchNorm(torch.randn(c, generator=gen), torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                        torch.rand(c, generator=gen) + 0.5, 1e-5, key)


def _conv(gen, co, ci, k=3, stride=1, pad=1, groups=1):
    return ir.Conv2d(torch.randn(co, ci // groups, k, k, generator=gen) * 0.4, torch.randn(co, generator=gen),
                     (stride, stride), (pad, pad), (1, 1), groups)


def mlp_normalized(gen):
    """shift, spatially varying scale (with a negative entry), flatten, Linear, BatchNorm1d."""
    b = ir.GraphBuilder("x", (1, 4, 4))
    scale = torch.rand(1, 1, 1, 4, generator=gen) + 0.5
    scale[..., 1] *= -1
    h = b.add("sub", ir.ElementwiseAffine(None, torch.tensor(-0.13)), ["x"])
    h = b.add("div", ir.ElementwiseAffine(scale, None), [h])
    h = b.add("flat", ir.Reshape((16,)), [h])
    h = b.add("fc1", ir.Linear(torch.randn(8, 16, generator=gen) * 0.3, torch.randn(8, generator=gen)), [h])
    h = b.add("bn1", _bn(gen, 8, "bn1"), [h])
    h = b.add("relu1", ir.ReLU(), [h])
    return b.build(b.add("fc2", ir.Linear(torch.randn(3, 8, generator=gen), torch.randn(3, generator=gen)), [h]))


def cnn(gen):
    """per-channel scale, spatial shift (a bias map through the padding), Conv, BN, per-channel
    affine; a grouped conv whose per-channel pre-scale must not be fused; a residual branch."""
    b = ir.GraphBuilder("x", (2, 5, 5))
    scale = torch.tensor([0.7, -1.3]).reshape(1, 2, 1, 1)
    h = b.add("norm", ir.ElementwiseAffine(scale, torch.randn(1, 2, 5, 5, generator=gen) * 0.2), ["x"])
    h = b.add("c1", _conv(gen, 3, 2, stride=2), [h])
    h = b.add("bn1", _bn(gen, 3, "bn1"), [h])
    h = b.add("aff", ir.ElementwiseAffine(torch.tensor([1.5, -0.5, 2.0]).reshape(1, 3, 1, 1),
                                          torch.tensor([0.1, 0.2, -0.3]).reshape(1, 3, 1, 1)), [h])
    h = b.add("relu1", ir.ReLU(), [h])
    h = b.add("chan", ir.ElementwiseAffine(torch.tensor([2.0, -1.0, 0.5]).reshape(1, 3, 1, 1), None), [h])
    h = b.add("c2", _conv(gen, 6, 3, k=2, pad=0, groups=3), [h])
    side = b.add("bn2", _bn(gen, 6, "bn2"), [h])
    h = b.add("c3", _conv(gen, 6, 6), [side])
    h = b.add("res", ir.Add(), [h, side])  # c3 output and bn2 output: two consumers of bn2
    h = b.add("relu2", ir.ReLU(), [h])
    h = b.add("flat", ir.Reshape((6 * 2 * 2,)), [h])
    return b.build(b.add("fc", ir.Linear(torch.randn(4, 24, generator=gen) * 0.3, None), [h]))


GRAPHS = {"mlp-normalized": mlp_normalized, "cnn": cnn}


def _box(gen, graph, batch=3, width=0.4):
    c = torch.randn((batch,) + graph.input_shape, generator=gen)
    r = torch.rand((batch,) + graph.input_shape, generator=gen) * width
    return Box(c - r, c + r)


def _assert_same(fused, plain, graph):
    for node in [graph.input_name] + [n.name for n in graph.nodes]:
        for a, b in ((fused[node].lo, plain[node].lo), (fused[node].hi, plain[node].hi)):
            scale = 1 + b.abs().max()
            assert torch.allclose(a, b, rtol=0, atol=2e-5 * scale), (node, (a - b).abs().max())


def test_the_expected_groups_are_fused():
    g = cnn(torch.Generator().manual_seed(0))
    groups = {last: [n.name for n in grp.nodes] for last, grp in fusion_groups(g, None).items()}
    # chan's scale is per channel but c2 has groups: chan stays out; bn2 has two consumers: c3
    # does not take it as a pre-op, and c3 cannot take res (an Add) as a post-op; c3 and fc
    # are groups of their own
    assert groups == {"aff": ["norm", "c1", "bn1", "aff"], "bn2": ["c2", "bn2"], "c3": ["c3"], "fc": ["fc"]}
    g = mlp_normalized(torch.Generator().manual_seed(0))
    assert {k: [n.name for n in v.nodes] for k, v in fusion_groups(g, None).items()} == {
        "bn1": ["sub", "div", "flat", "fc1", "bn1"], "fc2": ["fc2"]}


@pytest.mark.parametrize("label", sorted(GRAPHS))
def test_lo_hi_boxes_enter_with_halved_weights_bit_for_bit(label, monkeypatch):
    """A box given by lo and hi (the input, a ReLU's output) enters a group as lo + hi and
    hi - lo with halved weights: the intervals of forming c and r first, bit for bit."""
    from verikit.domains import box_fusion

    gen = torch.Generator().manual_seed(11)
    graph = GRAPHS[label](gen)
    box = _box(gen, graph, batch=4)
    seen = []
    original = box_fusion._weights
    monkeypatch.setattr(box_fusion, "_weights", lambda g, gr, ctx, halved: seen.append(halved) or original(g, gr, ctx, halved))
    runs = []
    with torch.no_grad():
        for halved in (True, False):
            monkeypatch.setattr(box_fusion, "HALVED_WEIGHTS", halved)
            runs.append(propagate_box(graph, Box(box.lo.clone(), box.hi.clone())))
    assert any(seen) and not all(seen)  # the first run took the halved form (input, ReLU outputs)
    for n in graph.nodes:
        assert torch.equal(runs[0][n.name].lo, runs[1][n.name].lo) and torch.equal(runs[0][n.name].hi, runs[1][n.name].hi)


@pytest.mark.parametrize("label", sorted(GRAPHS))
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10 ** 6))
def test_fused_equals_every_node_rule_and_contains_samples(label, seed):
    gen = torch.Generator().manual_seed(seed)
    graph = GRAPHS[label](gen)
    box = _box(gen, graph)
    with torch.no_grad():
        fused = propagate_box(graph, box)
        inner = [n for n in graph.nodes if isinstance(fused[n.name], LazyBox)]
        assert inner and all("_value" not in fused[n.name].__dict__ for n in inner)  # nothing computed yet
        plain = propagate_box(graph, box, fuse=False)
        _assert_same(fused, plain, graph)
        values = graph.forward(box.sample(64, gen).flatten(0, 1), return_all=True)
        for name, v in values.items():
            v = v.reshape((64, box.lo.shape[0]) + v.shape[1:])
            assert bool((v >= fused[name].lo - 1e-4).all() and (v <= fused[name].hi + 1e-4).all()), name


@pytest.mark.parametrize("label", sorted(GRAPHS))
def test_with_autograd_every_node_runs_its_own_rule(label):
    """Training (IBP, SABR) must keep its arithmetic bit for bit: no fusion under autograd."""
    gen = torch.Generator().manual_seed(3)
    graph = GRAPHS[label](gen)
    box = _box(gen, graph)
    store = propagate_box(graph, box)
    plain = propagate_box(graph, box, fuse=False)
    assert not any(isinstance(store[n.name], LazyBox) for n in graph.nodes)
    for n in graph.nodes:
        assert torch.equal(store[n.name].lo, plain[n.name].lo) and torch.equal(store[n.name].hi, plain[n.name].hi)


def test_cached_weights_follow_in_place_changes():
    gen = torch.Generator().manual_seed(5)
    graph = cnn(gen)
    box = _box(gen, graph)
    with torch.no_grad():
        before = propagate_box(graph, box)[graph.output]
        graph.node("bn1").op.running_var.mul_(4.0)  # a version bump, same storage
        graph.node("c1").op.weight.add_(0.5)
        after = propagate_box(graph, box)
        _assert_same(after, propagate_box(graph, box, fuse=False), graph)
        assert not torch.allclose(before.hi, after[graph.output].hi)


def test_batch_statistics_are_used_when_recorded():
    gen = torch.Generator().manual_seed(7)
    graph = cnn(gen)
    box = _box(gen, graph, batch=4)
    ctx = ir.EvalContext(bn_mode="batch")
    graph.forward(box.center, ctx=ctx)
    has_bn = lambda groups: any(isinstance(n.op, ir.BatchNorm) for grp in groups.values() for n in grp.nodes)
    assert has_bn(fusion_groups(graph, ctx)) and not has_bn(fusion_groups(graph, ir.EvalContext(bn_mode="batch")))
    with torch.no_grad():
        _assert_same(propagate_box(graph, box, ctx=ctx), propagate_box(graph, box, ctx=ctx, fuse=False), graph)


def test_no_fusion_into_a_store_that_holds_bounds():
    """A stored (tighter) bound of an inner node must still tighten everything after it."""
    gen = torch.Generator().manual_seed(9)
    graph = mlp_normalized(gen)
    box = _box(gen, graph)
    with torch.no_grad():
        store = propagate_box(graph, box, fuse=False)
        fc1 = store["fc1"]
        mid = (fc1.lo + fc1.hi) / 2
        tight = Box(mid - 1e-3, mid + 1e-3)
        store.update("fc1", tight)
        again = propagate_box(graph, box, store)
        bn = graph.node("bn1").op
        scale = (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).abs()
        assert bool(((again["bn1"].hi - again["bn1"].lo) <= 2e-3 * scale * (1 + 1e-4) + 1e-6).all())
        assert torch.equal(again["fc1"].lo, torch.maximum(tight.lo, fc1.lo))


# ------------------------------------------------------------------ the folded spec as a group
def _specs(gen, batch, classes):
    """A robustness spec (one matrix per label), one shared matrix with a threshold, per-sample
    thresholds, and per-sample matrices that are all different (the op's own rule)."""
    from verikit.spec import Spec

    labels = torch.randint(0, classes, (batch,), generator=gen)
    robust = Spec.robustness(labels, classes)
    shared = Spec(torch.randn(2, classes, generator=gen), torch.randn(2, generator=gen))
    thresholds = Spec(robust.C, torch.randn(batch, classes - 1, generator=gen))
    distinct = Spec(torch.randn(batch, 2, classes, generator=gen), torch.zeros(batch, 2))
    return {"robustness": robust, "shared": shared, "per-sample d": thresholds, "all distinct": distinct}


@pytest.mark.parametrize("kind", ["robustness", "shared", "per-sample d", "all distinct"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10 ** 6))
def test_folded_spec_group_equals_the_ops_own_rule(kind, seed):
    from verikit.spec import fold_spec

    gen = torch.Generator().manual_seed(seed)
    graph = mlp_normalized(gen)  # fc2 has 3 outputs
    box = _box(gen, graph, batch=12)
    spec = _specs(gen, 12, 3)[kind]
    folded = fold_spec(graph, spec)
    with torch.no_grad():
        fused = propagate_box(folded, box)
        plain = propagate_box(folded, box, fuse=False)
    grouped = "__spec__" in fusion_groups(folded, None)
    assert grouped == (kind != "all distinct")  # 12 different matrices: no group, the op's rule
    _assert_same(fused, plain, folded)
    y = graph.forward(box.sample(64, gen).flatten(0, 1)).reshape(64, 12, -1)
    C = spec.C if spec.C.dim() == 3 else spec.C.expand(12, -1, -1)
    values = torch.einsum("bmn,sbn->sbm", C, y) - spec.d  # the margins the spec asks for
    out = fused[folded.output]
    assert bool((values >= out.lo - 1e-4).all() and (values <= out.hi + 1e-4).all())


def test_robustness_rows_of_c_w_are_formed_once_per_pair():
    """|W_y - W_j| = |W_j - W_y|: a 10-class robustness spec needs 45 rows of |C W|, not 90."""
    from verikit.domains.box_fusion import _spec_rows
    from verikit.spec import Spec, fold_spec

    b = ir.GraphBuilder("x", (6,))
    gen = torch.Generator().manual_seed(1)
    graph = b.build(b.add("fc", ir.Linear(torch.randn(10, 6, generator=gen), torch.randn(10, generator=gen)), ["x"]))
    spec = Spec.robustness(torch.arange(20) % 10, 10)
    rows = _spec_rows(fold_spec(graph, spec).node("__spec__").op, True)
    assert rows.abs_rows.shape == (45, 6)
    box = _box(gen, graph, batch=20)
    with torch.no_grad():
        folded = fold_spec(graph, spec)
        _assert_same(propagate_box(folded, box), propagate_box(folded, box, fuse=False), folded)


def test_a_spec_folded_again_is_the_same_graph_until_it_changes():
    from verikit.spec import Spec, fold_spec

    gen = torch.Generator().manual_seed(2)
    graph = mlp_normalized(gen)
    spec = Spec.robustness(torch.tensor([0, 1, 2, 0]), 3)
    box = _box(gen, graph, batch=4)
    first = fold_spec(graph, spec)
    assert fold_spec(graph, spec) is first
    assert fold_spec(graph, Spec.robustness(torch.tensor([0, 1, 2, 0]), 3)) is not first  # another spec
    with torch.no_grad():
        before = propagate_box(fold_spec(graph, spec), box)["__spec__"]
        spec.C.mul_(-1.0)  # in place: the folded graph and the cached rows must follow
        again = fold_spec(graph, spec)
        assert again is not first
        after = propagate_box(again, box)
        _assert_same(after, propagate_box(again, box, fuse=False), again)
        assert torch.allclose(after["__spec__"].lo, -before.hi, atol=1e-5)


def test_a_reshape_keeps_the_form_of_its_box():
    from verikit.bounds import _CenterRadiusBox
    from verikit.domains.box import _reshape_rule

    op = ir.Reshape((4,))
    lo, hi = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    out = _reshape_rule(op, [Box(lo, hi)], None)
    assert type(out) is Box and torch.equal(out.lo, lo.reshape(3, 4)) and torch.equal(out.hi, hi.reshape(3, 4))
    out = _reshape_rule(op, [Box.from_center_radius(lo + 0.5, hi * 0.5)], None)
    assert isinstance(out, _CenterRadiusBox) and torch.equal(out.lo, lo.reshape(3, 4))


def test_a_pickled_or_copied_graph_carries_no_caches():
    """A graph sent to a Ray worker (pickled) or copied rebuilds its folded spec and fusion
    groups; the originals keep theirs, and a graph with another node list folds anew."""
    import copy
    import pickle

    from verikit.spec import Spec, fold_spec

    gen = torch.Generator().manual_seed(4)
    graph = mlp_normalized(gen)
    spec = Spec.robustness(torch.tensor([0, 1, 2, 0]), 3)
    folded = fold_spec(graph, spec)
    with torch.no_grad():
        propagate_box(folded, _box(gen, graph, batch=4))
    assert "_folded" in graph.__dict__ and "_fusion_groups" in folded.__dict__
    for other in (pickle.loads(pickle.dumps(graph)), copy.copy(graph), copy.deepcopy(folded)):
        assert "_folded" not in other.__dict__ and "_fusion_groups" not in other.__dict__
    assert fold_spec(graph, spec) is folded
    graph.nodes = list(graph.nodes)  # another node list of the same length
    refolded = fold_spec(graph, spec)
    assert refolded is not folded
    with torch.no_grad():  # and its groups are formed for it, not taken from an earlier graph
        propagate_box(refolded, _box(gen, graph, batch=4))
    assert refolded.__dict__["_fusion_groups"][2] is refolded.nodes


@pytest.mark.parametrize("kind", ["robustness", "shared", "per-sample d"])
def test_folded_spec_group_at_zero_width_gives_the_margins(kind):
    """eps = 0: the spec group's lower and upper bounds are the concrete margins C f(x) - d."""
    from verikit.domains import get_domain
    from verikit.spec import fold_spec

    gen = torch.Generator().manual_seed(8)
    graph = mlp_normalized(gen)
    spec = _specs(gen, 12, 3)[kind]
    x = torch.randn((12,) + graph.input_shape, generator=gen)
    with torch.no_grad():
        out = get_domain("box").bound(graph, Box.point(x), spec)
        assert "__spec__" in fusion_groups(fold_spec(graph, spec), None)
    y = graph.forward(x)
    C = spec.C if spec.C.dim() == 3 else spec.C.expand(12, -1, -1)
    margins = torch.einsum("bmn,bn->bm", C, y) - spec.d
    torch.testing.assert_close(out.lower, margins, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.upper, margins, rtol=1e-5, atol=1e-5)
