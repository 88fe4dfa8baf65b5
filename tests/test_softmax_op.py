"""ONNX Softmax: imported as the IR's Softmax along the ONNX axis, matching onnxruntime; its
Box rule is the exact interval (each output increasing in its own input, decreasing in the
others), sound by sampling (with far-apart and saturated inputs too) and exact at eps = 0; the
back-substitution engine bounds it through softmax_i = 1 / (1 + sum_(j != i) exp(x_j - x_i))
with lines per piece (domains/softmax_lines.py): sound by sampling on any axis and any width,
tighter than the interval constants on small boxes, the constants where the differences are
large; the reciprocal's lines hold in float32; the MILP refuses it in one line."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_onnx_import import N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.domains.linear_bounds import prepare
from verikit.domains.relaxations import reciprocal_relaxation
import verikit.domains.softmax_lines as softmax_lines
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec


def _softmax_model(tmp_path, opset=17, axis=None):
    attrs = {} if axis is None else {"axis": axis}
    nodes = [N("Gemm", ["x", "W"], ["h"]), N("Softmax", ["h"], ["y"], **attrs)]
    return _model(nodes, (1, 4), None, [("W", _w(4, 5, scale=2.0))], str(tmp_path / f"sm{opset}.onnx"), opset=opset)


@pytest.mark.parametrize("opset,axis", [(17, None), (17, 1), (17, -1), (11, 1)])
def test_softmax_imports_and_matches_onnxruntime(tmp_path, opset, axis):
    path = _softmax_model(tmp_path, opset, axis)
    graph = from_onnx(path)
    assert any(isinstance(n.op, ir.Softmax) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=8, low=-2.0, high=2.0)
    assert rep.max_rel_error <= 1e-5, rep.per_node


def test_softmax_over_the_batch_axis_is_refused(tmp_path):
    with pytest.raises(UnsupportedOpsError, match="Softmax"):
        from_onnx(_softmax_model(tmp_path, 17, 0))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 5.0), st.floats(1.0, 60.0), st.integers(1, 7))
def test_box_rule_contains_every_sampled_softmax_and_is_exact_at_points(seed, width, spread, n):
    gen = torch.Generator().manual_seed(seed)
    c = (torch.rand(2, n, generator=gen) * 2 - 1) * spread
    r = torch.rand(2, n, generator=gen) * width
    box = Box(c - r, c + r)
    op = ir.Softmax(1)
    b = ir.GraphBuilder("x", (n,))
    graph = b.build(b.add("sm", op, ["x"]))
    out = propagate_box(graph, box)["sm"]
    pts = box.sample(3000, gen).reshape(-1, n)
    y = torch.softmax(pts.double(), 1).reshape(3000, 2, n)
    assert ((y >= out.lo.double()) & (y <= out.hi.double())).all()
    assert ((out.lo >= 0) & (out.hi <= 1) & (out.hi > 0)).all()
    point = propagate_box(graph, Box.point(c))["sm"]
    exact = torch.softmax(c.double(), 1)
    assert ((point.lo.double() <= exact) & (exact <= point.hi.double())).all()
    torch.testing.assert_close(point.lo, torch.softmax(c, 1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("domain", ["box", "deeppoly", "crown"])
def test_domains_are_sound_on_softmax_and_milp_refuses_it(domain, tmp_path):
    graph = from_onnx(_softmax_model(tmp_path))
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    spec = Spec.robustness(torch.tensor([int(graph.forward(x).argmax())]), 5)
    box = Box.linf_ball(x, 0.2, None)
    lower = get_domain(domain).bound(graph, box, spec).lower
    pts = box.sample(5000, torch.Generator().manual_seed(4)).reshape(-1, 4)
    with torch.no_grad():
        assert (spec.expand(len(pts)).values(graph.forward(pts)) >= lower - 1e-6).all()
    with pytest.raises(UnsupportedOpsError, match="Softmax"):
        get_domain("milp").bound(graph, box, spec)


def _softmax_graph(shape, axis, seed):
    """x -> Conv-free affine mix (ElementwiseAffine + a permutation) -> Softmax(axis)."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", shape)
    h = b.add("mix", ir.ElementwiseAffine(torch.randn(shape, generator=gen) * 2, torch.randn(shape, generator=gen)), ["x"])
    return b.build(b.add("sm", ir.Softmax(axis), [h]))


def _engine_bounds(graph, box):
    engine = prepare(graph, box, None, None, "crown", 4096)
    n = box.lo[0].numel()
    eye = torch.eye(n).reshape((1, n) + tuple(graph.output_shape))
    lam = torch.cat([eye, -eye], 1).expand((box.lo.shape[0], 2 * n) + tuple(graph.output_shape))
    lb = engine.lower_bound("sm", lam)
    return lb[:, :n], -lb[:, n:]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.001, 8.0), st.sampled_from([((5,), 1), ((3, 4), 1), ((3, 4), 2)]))
def test_engine_lines_through_softmax_hold_on_sampled_points(seed, width, case):
    shape, axis = case
    graph = _softmax_graph(shape, axis, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    c = torch.rand((2,) + shape, generator=gen) * 2 - 1
    r = torch.rand((2,) + shape, generator=gen) * width
    box = Box(c - r, c + r)
    lo, hi = _engine_bounds(graph, box)
    pts = box.sample(3000, gen).reshape((-1,) + shape)
    with torch.no_grad():
        y = graph.forward(pts).reshape(3000, 2, -1).double()
    assert (y >= lo.double() - 1e-6).all() and (y <= hi.double() + 1e-6).all()


def test_engine_lines_beat_the_interval_constants_on_small_boxes(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    b = ir.GraphBuilder("x", (6,))
    h = b.add("fc", ir.Linear(torch.randn(6, 6, generator=gen), torch.randn(6, generator=gen)), ["x"])
    h = b.add("sm", ir.Softmax(1), [h])
    graph = b.build(b.add("out", ir.Linear(torch.randn(3, 6, generator=gen)), [h]))
    x = torch.rand(16, 6, generator=gen) * 2 - 1
    spec = Spec.robustness(graph.forward(x).argmax(1), 3)
    box = Box.linf_ball(x, 0.02, None)
    lines = get_domain("crown").bound(graph, box, spec).lower
    monkeypatch.setattr(softmax_lines, "MAX_DIFFERENCE", -1.0)  # every output on its constants
    consts = get_domain("crown").bound(graph, box, spec).lower
    interval = get_domain("box").bound(graph, box, spec).lower
    torch.testing.assert_close(consts, interval)  # the constants are the Box rule's
    assert (lines >= consts - 1e-6).all() and (lines > consts + 1e-3).float().mean() > 0.5


def test_reciprocal_lines_hold_in_float32():
    gen = torch.Generator().manual_seed(0)
    l = 1 + torch.rand(5000, generator=gen) ** 3 * 1e4
    u = l * (1 + torch.rand(5000, generator=gen) ** 4 * 100)
    u[:50] = l[:50]  # point intervals
    rel = reciprocal_relaxation(l, u)
    t = torch.linspace(0, 1, 101, dtype=torch.float64).reshape(-1, 1)
    s = l.double() + t * (u.double() - l.double())
    f = 1 / s
    assert (rel.lower_slope.double() * s + rel.lower_bias.double() <= f).all()
    assert (rel.upper_slope.double() * s + rel.upper_bias.double() >= f).all()
    with pytest.raises(Exception, match="0 < l"):
        reciprocal_relaxation(torch.tensor([0.0]), torch.tensor([1.0]))
