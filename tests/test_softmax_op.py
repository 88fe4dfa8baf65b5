"""ONNX Softmax: imported as the IR's Softmax along the ONNX axis, matching onnxruntime; its
Box rule is the exact interval (each output increasing in its own input, decreasing in the
others), sound by sampling (with far-apart and saturated inputs too) and exact at eps = 0; the
back-substitution domains bound it by those constants (also through tests/op_graphs.py and
backsub_graphs.py); the MILP refuses it in one line."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_onnx_import import N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
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
