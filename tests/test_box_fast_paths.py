"""The box pass's fast paths against the slow ones they replace: lazily formed lo/hi of
centre/radius boxes, and the spec-folded layer's radius bounded once per distinct spec matrix."""
import torch
from hypothesis import given, settings, strategies as st

from op_graphs import OP_GRAPHS
from verikit import Box, Spec, from_torch
from verikit.domains import get_domain
from verikit.spec import MAX_DISTINCT, FoldedSpecLinear, distinct_matrices


def _per_sample_radius(C, W, r):
    """The slow path: |C_b W| r_b for every sample b."""
    return torch.einsum("bmn,bn->bm", (C @ W).abs(), r)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 80), classes=st.integers(2, 12),
       labels=st.integers(1, 12), n_in=st.integers(1, 40))
def test_folded_radius_per_distinct_matrix_equals_per_sample(seed, batch, classes, labels, n_in):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, min(labels, classes), (batch,), generator=g)
    spec = Spec.robustness(y, classes)
    W, b = torch.randn(classes, n_in, generator=g), torch.randn(classes, generator=g)
    r = torch.rand(batch, n_in, generator=g)
    op = FoldedSpecLinear(W, b, spec.C, spec.d)
    with torch.no_grad():
        fast = op.abs_linear(r)
    slow = _per_sample_radius(spec.C, W, r)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    assert bool((fast >= 0).all())


def test_distinct_matrices_groups_exactly():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, generator=g)
    idx = torch.tensor([0, 1, 0, 2, 2, 1, 0])
    uniq, index = distinct_matrices(base[idx])
    assert uniq.shape[0] == 3
    assert torch.equal(uniq[index], base[idx])
    # matrices differing in one entry by one ulp are never merged
    C = base[idx].clone()
    C[3, 1, 2] = torch.nextafter(C[3, 1, 2], torch.tensor(float("inf")))
    uniq, index = distinct_matrices(C)
    assert uniq.shape[0] == 4 and torch.equal(uniq[index], C)
    # all distinct, too many distinct, NaN, batch 1: the per-sample path is used
    assert distinct_matrices(base) is None
    assert distinct_matrices(torch.randn(2 * MAX_DISTINCT + 2, 2, 2, generator=g)[torch.arange(2 * MAX_DISTINCT + 2) % (MAX_DISTINCT + 1)]) is None
    nan = base[idx].clone()
    nan[0, 0, 0] = float("nan")
    assert distinct_matrices(nan) is None
    assert distinct_matrices(base[:1]) is None


def test_fast_spec_folding_is_sound_by_sampling_and_equals_the_training_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 20),
                              torch.nn.ReLU(), torch.nn.Linear(20, 6))
    graph = from_torch(net, (1, 3, 4))
    x = torch.rand(40, 1, 3, 4)
    y = torch.arange(40) % 3  # 3 distinct spec matrices among 40 samples
    spec = Spec.robustness(y, 6)
    box = Box.linf_ball(x, 0.05)
    with torch.no_grad():
        fast = get_domain("box").bound(graph, box, spec)
    slow = get_domain("box").bound(graph, Box(box.lo, box.hi), spec)  # autograd on: per-sample path
    torch.testing.assert_close(fast.lower, slow.lower.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.upper, slow.upper.detach(), rtol=1e-6, atol=1e-6)
    n = 1000
    pts = box.sample(n, torch.Generator().manual_seed(1))  # (n, B, ...)
    with torch.no_grad():
        out = net(pts.reshape((n * 40,) + tuple(x.shape[1:]))).reshape(n, 40, -1)
        vals = torch.einsum("bmk,nbk->nbm", spec.C, out) - spec.d
    assert bool((vals >= fast.lower - 1e-5).all() and (vals <= fast.upper + 1e-5).all())


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_center_radius_box_forms_lo_hi_like_the_eager_form(seed):
    g = torch.Generator().manual_seed(seed)
    c, r = torch.randn(3, 7, generator=g), torch.rand(3, 7, generator=g)
    box = Box.from_center_radius(c, r)
    assert box.shape == c.shape and "lo" not in box.__dict__  # nothing formed yet
    assert torch.equal(box.lo, c - r) and torch.equal(box.hi, c + r)
    assert box.center is c and box.radius is r
    # a plain box's centre and radius are the usual halves, bit for bit
    plain = Box(c - r, c + r)
    assert torch.equal(plain.center, (plain.lo + plain.hi) / 2) and torch.equal(plain.radius, (plain.hi - plain.lo) / 2)
    # broadcasting centre and radius keep the eager form
    wide = Box.from_center_radius(c, r[:1])
    assert wide.lo.shape == c.shape and torch.equal(wide.hi, c + r[:1])


def test_store_boxes_of_lazy_nodes_contain_samples():
    graph, box = OP_GRAPHS["mlp"](seed=5)
    res = get_domain("box").bound(graph, box)
    pts = box.sample(500, torch.Generator().manual_seed(2))
    vals = graph.forward(pts.reshape((-1,) + tuple(box.lo.shape[1:])), return_all=True)
    for name, v in vals.items():
        v = v.reshape((500,) + tuple(res.store[name].lo.shape))
        assert bool(((v >= res.store[name].lo - 1e-5) & (v <= res.store[name].hi + 1e-5)).all()), name
