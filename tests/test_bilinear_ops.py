"""Products of two data tensors (ONNX Mul, MatMul): imported as the IR's bilinear Mul (MatMul as
Reshape + Mul + a summing Linear), matching onnxruntime; Box exact on one product and the
engine's plane exactly as documented; every domain sound by sampling and exact at eps = 0 on
an attention block (Q K^T, Softmax, S V); the MILP refuses it in one line and the chain skips
it; shape combinations that are not supported are one-line errors."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_run import invoke
from test_onnx_import import N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.linear_bounds import prepare
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec
from vnnlib_files import robustness_vnnlib

S64 = lambda *v: np.array(v, dtype=np.int64)


def _gated(path):
    # x -> two Gemms -> their product -> Relu -> Gemm (a gated unit)
    nodes = [N("Gemm", ["x", "W1"], ["a"]), N("Gemm", ["x", "W2"], ["b"]), N("Mul", ["a", "b"], ["p"]),
             N("Relu", ["p"], ["r"]), N("Gemm", ["r", "W3"], ["y"])]
    return _model(nodes, (1, 4), None, [("W1", _w(4, 6)), ("W2", _w(4, 6)), ("W3", _w(6, 3))], path)


def _attention(path):
    # tokens x (1, 4, 3): softmax(Q K^T) V with Q, K, V = x Wq, x Wk, x Wv, then a Gemm head
    nodes = [N("MatMul", ["x", "Wq"], ["q"]), N("MatMul", ["x", "Wk"], ["k"]), N("MatMul", ["x", "Wv"], ["v"]),
             N("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), N("MatMul", ["q", "kt"], ["s"]),
             N("Softmax", ["s"], ["a"], axis=-1), N("MatMul", ["a", "v"], ["o"]), N("Flatten", ["o"], ["f"]),
             N("Gemm", ["f", "Wo"], ["y"])]
    inits = [("Wq", _w(3, 3)), ("Wk", _w(3, 3)), ("Wv", _w(3, 3)), ("Wo", _w(12, 3))]
    return _model(nodes, (1, 4, 3), None, inits, path)


def _heads(path):
    # (1, 2, 4, 3) per-head queries times keys of head 0 only: the leading dimension broadcasts
    nodes = [N("MatMul", ["x", "W"], ["q"]), N("Slice", ["x", "st", "en", "ax"], ["x0"]),
             N("Transpose", ["x0"], ["kt"], perm=[0, 1, 3, 2]), N("MatMul", ["q", "kt"], ["y"])]
    inits = [("W", _w(3, 3)), ("st", S64(0)), ("en", S64(1)), ("ax", S64(1))]
    return _model(nodes, (1, 2, 4, 3), None, inits, path)


def _broadcast(path):
    # a (1, 2, 4) times its first row (1, 1, 4): a size-1 dimension broadcast
    nodes = [N("MatMul", ["x", "W"], ["a"]), N("Slice", ["a", "st", "en", "ax"], ["a0"]), N("Mul", ["a", "a0"], ["y"])]
    return _model(nodes, (1, 2, 3), None, [("W", _w(3, 4)), ("st", S64(0)), ("en", S64(1)), ("ax", S64(1))], path)


def _unbatched(path):
    # an input without a batch dimension: (2, 3) @ (3, 2) and a rank-1 factor broadcast in front
    nodes = [N("Reshape", ["x", "s23"], ["m"]), N("Reshape", ["x", "s32"], ["mt"]), N("MatMul", ["m", "mt"], ["g"]),
             N("Slice", ["x", "st", "en", "ax"], ["row"]), N("Mul", ["m", "row"], ["h"]), N("Flatten", ["h"], ["hf"]),
             N("Flatten", ["g"], ["gf"]), N("Concat", ["hf", "gf"], ["y"], axis=1)]
    inits = [("s23", S64(2, 3)), ("s32", S64(3, 2)), ("st", S64(0)), ("en", S64(3)), ("ax", S64(0))]
    return _model(nodes, (6,), None, inits, path)


MODELS = {"gated": _gated, "attention": _attention, "heads": _heads, "broadcast": _broadcast, "unbatched": _unbatched}


@pytest.mark.parametrize("label", sorted(MODELS))
def test_products_import_and_match_onnxruntime(label, tmp_path):
    path = MODELS[label](str(tmp_path / f"{label}.onnx"))
    graph = from_onnx(path)
    assert any(isinstance(n.op, ir.Mul) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=6, low=-2.0, high=2.0)
    assert rep.max_rel_error <= 1e-5, rep.per_node


def _one_product():
    b = ir.GraphBuilder("x", (2,))
    x0 = b.add("x0", ir.Take(1, torch.tensor([0]), (1,)), ["x"])
    x1 = b.add("x1", ir.Take(1, torch.tensor([1]), (1,)), ["x"])
    return b.build(b.add("p", ir.Mul(), [x0, x1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=2, max_size=2), st.lists(st.floats(0, 2), min_size=2, max_size=2))
def test_box_is_exact_and_the_plane_is_the_documented_one(centre, radius):
    graph = _one_product()
    c, r = torch.tensor([centre]), torch.tensor([radius])
    box = Box(c - r, c + r)
    got = get_domain("box").bound(graph, box).lower, get_domain("box").bound(graph, box).upper
    lo, hi = box.lo[0].double(), box.hi[0].double()
    corners = torch.stack([lo[0] * lo[1], lo[0] * hi[1], hi[0] * lo[1], hi[0] * hi[1]])
    torch.testing.assert_close(got[0].double().flatten(), corners.min().reshape(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1].double().flatten(), corners.max().reshape(1), rtol=1e-6, atol=1e-6)
    # the engine: min over the box of cy x + cx y - cx cy - rx ry, and the same plane from above
    engine = prepare(graph, box, None, None, "crown", 4096)
    eye = torch.tensor([[[1.0], [-1.0]]])
    plane_lo, neg_hi = engine.lower_bound("p", eye)[0].double()
    (cx, cy), (rx, ry) = c[0].double(), r[0].double()
    want_lo = cx * cy - cy.abs() * rx - cx.abs() * ry - rx * ry
    want_hi = cx * cy + cy.abs() * rx + cx.abs() * ry + rx * ry
    torch.testing.assert_close(plane_lo, want_lo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(-neg_hi, want_hi, rtol=1e-5, atol=1e-5)
    assert plane_lo <= corners.min() + 1e-6 and -neg_hi >= corners.max() - 1e-6


DOMAINS = [("box", {}), ("deeppoly", {}), ("crown", {}), ("crown", {"alpha_steps": 5}), ("bab", {})]


@pytest.mark.parametrize("label", ["gated", "attention"])
@pytest.mark.parametrize("domain,options", DOMAINS, ids=[d + ("-alpha" if o else "") for d, o in DOMAINS])
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.02, 0.1, 0.3]))
def test_every_domain_is_sound_on_products_and_exact_at_eps_zero(label, domain, options, seed, eps, tmp_path_factory):
    path = MODELS[label](str(tmp_path_factory.mktemp(label) / "m.onnx"))
    graph = from_onnx(path)
    shape = (1,) + tuple(graph.input_shape)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 2 - 1
    spec = Spec.robustness(torch.tensor([int(graph.forward(x).argmax())]), 3)
    box = Box.linf_ball(x, eps, None)
    res = get_domain(domain, **options).bound(graph, box, spec)
    pts = box.sample(3000, torch.Generator().manual_seed(seed + 1)).reshape((-1,) + tuple(graph.input_shape))
    with torch.no_grad():
        vals = spec.expand(len(pts)).values(graph.forward(pts))
    assert (vals >= res.lower - 1e-5).all()
    if domain != "bab":  # a point box: the bound is the value itself
        point = get_domain(domain, **options).bound(graph, Box.point(x), spec).lower
        with torch.no_grad():
            torch.testing.assert_close(point, spec.values(graph.forward(x)), rtol=1e-5, atol=1e-5)


def test_back_substitution_is_tighter_than_intervals_through_products(tmp_path):
    graph = from_onnx(_gated(str(tmp_path / "g.onnx")))
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    box = Box.linf_ball(x, 0.05, None)
    spec = Spec.robustness(graph.forward(x).argmax(1), 3)
    widths = {d: get_domain(d).bound(graph, box, spec) for d in ("box", "crown")}
    gap = lambda r: (r.upper - r.lower).sum()
    assert gap(widths["crown"]) < 0.9 * gap(widths["box"])


def test_milp_refuses_products_in_one_line_and_the_chain_skips_it(tmp_path):
    path = _gated(str(tmp_path / "g.onnx"))
    graph = from_onnx(path)
    x = torch.zeros(1, 4)
    label = int(graph.forward(x).argmax())
    with pytest.raises(UnsupportedOpsError, match="Mul.*bilinear"):
        get_domain("milp").bound(graph, Box.linf_ball(x, 0.1, None), Spec.robustness(torch.tensor([label]), 3))
    vnnlib = robustness_vnnlib(tmp_path / "p.vnnlib", 4, 3, label, 0.01)
    done = invoke("certify", path, "--vnnlib", vnnlib, "--domains", "box,crown,milp", "--quiet")
    assert done.exit_code == 0, done.output
    assert done.output.splitlines()[0] in ("holds", "violated", "unknown")


def test_unsupported_product_shapes_are_one_line_errors(tmp_path):
    # a batched tensor times an un-batched one (a constant-free reshape drops the batch dimension)
    nodes = [N("Reshape", ["x", "s"], ["flat"]), N("Mul", ["x", "flat"], ["y"], name="mixed")]
    path = _model(nodes, (1, 4), None, [("s", S64(4))], str(tmp_path / "mixed.onnx"))
    with pytest.raises(UnsupportedOpsError, match="mixed.*batched and an un-batched"):
        from_onnx(path)
    # MatMul with a batched 2-D factor: its rows would be the batch dimension
    path = _model([N("MatMul", ["x", "x"], ["y"], name="outer")], (1, 1), None, [], str(tmp_path / "outer.onnx"))
    with pytest.raises(UnsupportedOpsError, match="outer.*rank >= 3"):
        from_onnx(path)
    done = invoke("certify", path, "--eps", "0.1")
    assert done.exit_code == 2 and "Traceback" not in done.output and "outer" in done.output
