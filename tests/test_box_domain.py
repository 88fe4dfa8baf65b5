"""Soundness of the Box domain on every op: sampling, eps = 0, exact oracle, and gradients."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from exact_oracle import exact_min
from op_graphs import OP_GRAPHS, op_types_covered
from verikit import Box, Spec, from_torch, ir
from verikit.domains import get_domain
from verikit.domains.box import BOX_RULES, propagate_box


def test_every_op_type_has_a_rule_and_a_test_graph():
    assert set(ir.ALL_OP_TYPES) <= set(BOX_RULES)
    assert set(ir.ALL_OP_TYPES) <= op_types_covered()


@pytest.mark.parametrize("label", sorted(OP_GRAPHS))
def test_sampled_points_stay_inside_every_node_bound(label):
    graph, box = OP_GRAPHS[label](seed=1)
    store = propagate_box(graph, box)
    n, B = 1200, box.lo.shape[0]
    xs = box.sample(n, torch.Generator().manual_seed(0))  # (n, B, *shape): one forward over n*B points
    values = graph.forward(xs.reshape((n * B,) + tuple(box.lo.shape[1:])), return_all=True)
    for name, v in values.items():
        v = v.reshape((n, B) + tuple(v.shape[1:]))
        b = store[name]
        assert bool(((v >= b.lo - 1e-5) & (v <= b.hi + 1e-5)).all()), f"{label}: node {name} escapes its box"


@pytest.mark.parametrize("label", sorted(OP_GRAPHS))
def test_zero_width_box_gives_the_concrete_output(label):
    graph, box = OP_GRAPHS[label](seed=2)
    x = box.center
    out = get_domain("box").bound(graph, Box.point(x))
    y = graph.forward(x).reshape(x.shape[0], -1)
    torch.testing.assert_close(out.lower, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.upper, y, rtol=1e-5, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.floats(0.01, 0.6))
def test_box_is_sound_against_the_exact_oracle(seed, width):
    graph, box = OP_GRAPHS["mlp"](seed=seed, batch=1, width=width)
    spec = Spec(torch.randn(2, 3, generator=torch.Generator().manual_seed(seed)), torch.zeros(2))
    res = get_domain("box").bound(graph, box, spec)
    for row in range(2):
        exact = exact_min(graph, box.lo[0].numpy().astype(np.float64), box.hi[0].numpy().astype(np.float64),
                          spec.C[row].numpy().astype(np.float64))
        assert res.lower[0, row].item() <= exact + 1e-5
        # and the upper bound is above the exact maximum
        exact_max = -exact_min(graph, box.lo[0].numpy().astype(np.float64), box.hi[0].numpy().astype(np.float64),
                               -spec.C[row].numpy().astype(np.float64))
        assert res.upper[0, row].item() >= exact_max - 1e-5


def test_spec_is_folded_and_tighter_than_bounding_logits():
    graph, box = OP_GRAPHS["mlp"](seed=3, width=0.3)
    spec = Spec.robustness(torch.tensor([0, 2]), 3)
    folded = get_domain("box").bound(graph, box, spec)
    raw = get_domain("box").bound(graph, box)
    # margin y_t - y_j from raw logit bounds: lo_t - hi_j
    naive = torch.stack([torch.stack([raw.lower[b, t] - raw.upper[b, j] for j in range(3) if j != t])
                         for b, t in enumerate([0, 2])])
    assert bool((folded.lower >= naive - 1e-6).all())
    assert bool((folded.lower > naive + 1e-6).any()), "folding C into the last layer should gain something"


def test_linf_ball_respects_the_data_range():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    b = Box.linf_ball(x, 0.1)
    assert torch.equal(b.lo, torch.tensor([[0.0, 0.4, 0.9]]))
    assert torch.allclose(b.hi, torch.tensor([[0.1, 0.6, 1.0]]))


def test_bound_store_only_tightens():
    graph, box = OP_GRAPHS["mlp"](seed=4)
    store = propagate_box(graph, box)
    before = store["relu0"].hi.clone()
    wide = Box(store["relu0"].lo - 5, store["relu0"].hi + 5)
    store.update("relu0", wide)
    assert torch.equal(store["relu0"].hi, before)


def test_box_loss_gradients_reach_every_parameter():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3))
    graph = from_torch(net, (1, 7, 7))
    x = torch.rand(4, 1, 7, 7)
    res = get_domain("box").bound(graph, Box.linf_ball(x, 0.1), Spec.robustness(torch.tensor([0, 1, 2, 0]), 3))
    torch.nn.functional.cross_entropy(torch.cat([torch.zeros(4, 1), -res.lower], 1), torch.zeros(4, dtype=torch.long)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_statistics_are_recorded_and_reused():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    graph = from_torch(net, (3,))
    x = torch.randn(16, 3)
    ctx = ir.EvalContext(bn_mode="batch")
    y = graph.forward(x, ctx=ctx)
    net.train()
    torch.testing.assert_close(y, net(x))
    res = get_domain("box").bound(graph, Box.point(x), ctx=ctx)  # zero-width box, batch stats of x
    torch.testing.assert_close(res.lower, y, rtol=1e-5, atol=1e-5)


def test_wrong_input_shape_is_a_clear_error():
    from verikit.errors import ShapeError

    graph, box = OP_GRAPHS["mlp"]()
    with pytest.raises(ShapeError, match="expects"):
        get_domain("box").bound(graph, Box.point(torch.zeros(2, 7)))
