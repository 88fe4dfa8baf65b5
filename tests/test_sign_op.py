"""ONNX Sign (-1 / 0 / 1, Sign(0) = 0): imported as the IR's Sign, matching onnxruntime; every
domain sound by sampling and exact at eps = 0 (also through tests/op_graphs.py,
backsub_graphs.py and the relaxation-table tests); the MILP's two-binary encoding decides
properties exactly against a dense sampling reference, with real counterexamples."""
import pytest
import torch

from test_onnx_import import N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.relaxations import sign_relaxation
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec


def _sign_model(tmp_path, n_in=2, hidden=5):
    nodes = [N("Gemm", ["x", "W1", "b1"], ["h"]), N("Sign", ["h"], ["s"]), N("Gemm", ["s", "W2"], ["y"])]
    inits = [("W1", _w(n_in, hidden)), ("b1", _w(hidden, scale=0.2)), ("W2", _w(hidden, 2))]
    return _model(nodes, (1, n_in), None, inits, str(tmp_path / "sign.onnx"))


def test_sign_imports_and_matches_onnxruntime_zero_included(tmp_path):
    path = _sign_model(tmp_path)
    graph = from_onnx(path)
    assert any(isinstance(n.op, ir.Sign) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=16, low=-2.0, high=2.0)
    assert rep.max_rel_error <= 1e-6, rep.per_node
    assert ir.Sign().forward(torch.tensor([-0.5, 0.0, 2.0])).tolist() == [-1.0, 0.0, 1.0]


def _sampled(graph, box, spec, n=200_000, seed=0):
    pts = box.sample(n, torch.Generator().manual_seed(seed)).reshape((-1,) + tuple(graph.input_shape))
    with torch.no_grad():
        return spec.expand(len(pts)).values(graph.forward(pts))


@pytest.mark.parametrize("domain", ["box", "deeppoly", "crown", "milp"])
def test_every_domain_is_sound_on_sign_and_exact_at_eps_zero(domain, tmp_path):
    graph = from_onnx(_sign_model(tmp_path))
    x = torch.tensor([[0.3, -0.2]])
    spec = Spec(torch.tensor([[1.0, -1.0]]), torch.tensor([0.0]))
    box = Box.linf_ball(x, 0.8, None)
    lower = get_domain(domain).bound(graph, box, spec).lower
    assert (_sampled(graph, box, spec, 20_000) >= lower - 1e-6).all()
    point = get_domain(domain).bound(graph, Box.point(x), spec).lower
    with torch.no_grad():
        torch.testing.assert_close(point, spec.values(graph.forward(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_milp_decides_like_the_dense_reference(seed, tmp_path):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6))
    b = ir.GraphBuilder("x", (2,))
    h = b.add("fc1", ir.Linear(net[0].weight.detach(), net[0].bias.detach()), ["x"])
    h = b.add("sign", ir.Sign(), [h])
    h = b.add("fc2", ir.Linear(torch.randn(1, 6), torch.zeros(1)), [h])
    graph = b.build(h)
    box = Box(torch.full((1, 2), -1.0), torch.full((1, 2), 1.0))
    probe = Spec(torch.ones(1, 1), torch.zeros(1))
    low = float(_sampled(graph, box, probe, seed=seed).min())  # the regions are wide: sampling finds the minimum
    holds = Spec(torch.ones(1, 1), torch.tensor([low - 0.05]))
    violated = Spec(torch.ones(1, 1), torch.tensor([low + 0.05]))
    # one MILP over the whole box (the input-splitting fallback's interval guard charges a
    # possible sign flip, 2, to every sub-box a Sign input crosses, so it rarely proves anything)
    milp = dict(solver="highs", input_split=False)
    assert get_domain("milp", **milp).bound(graph, box, holds).status == ["verified"]
    res = get_domain("milp", **milp).bound(graph, box, violated)  # optimum on a hyperplane: moved off it
    assert res.status == ["falsified"]
    with torch.no_grad():
        assert bool(violated.violated_by(graph.forward(res.counterexamples[0].reshape(1, 2)))[0])


def test_lines_never_steeper_than_the_cap_and_hold_on_tiny_intervals():
    l = torch.tensor([-1e-9, 0.0, -2.0, -1e-9, 3.0, -4.0])
    u = torch.tensor([1e-9, 1e-9, 0.0, 0.0, 5.0, -1.0])
    rel = sign_relaxation(l, u)
    assert float(rel.lower_slope.abs().max()) <= 1e4 and float(rel.upper_slope.abs().max()) <= 1e4
    for k in range(len(l)):
        xs = torch.linspace(float(l[k]), float(u[k]), 101)
        f = torch.sign(xs)
        assert (rel.lower_slope[k] * xs + rel.lower_bias[k] <= f).all()
        assert (rel.upper_slope[k] * xs + rel.upper_bias[k] >= f).all()
