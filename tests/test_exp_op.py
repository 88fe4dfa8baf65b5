"""ONNX Exp: imported as the IR's Exp (monotone, convex), matching onnxruntime; every bounding
domain sound by sampling and at eps = 0 (also through tests/op_graphs.py, backsub_graphs.py and
the relaxation-table tests); the MILP refuses it in one line and the chain skips it; inputs
whose exp would overflow float32 are refused with one line, never bounded by inf."""
import subprocess
import sys

import pytest
import torch

from test_onnx_import import N, _model, _w
from vnnlib_files import robustness_vnnlib
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.relaxations import exp_relaxation
from verikit.errors import UnsupportedOpsError, VerikitError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec


def _exp_model(tmp_path, scale=0.5):
    # x -> Gemm -> Exp -> Gemm: a softmax-free "exp features" layer between two affine ones
    nodes = [N("Gemm", ["x", "W1"], ["h"]), N("Exp", ["h"], ["e"]), N("Gemm", ["e", "W2"], ["y"])]
    inits = [("W1", _w(4, 6, scale=scale)), ("W2", _w(6, 3))]
    return _model(nodes, (1, 4), None, inits, str(tmp_path / "exp.onnx"))


def test_exp_imports_and_matches_onnxruntime(tmp_path):
    path = _exp_model(tmp_path)
    graph = from_onnx(path)
    assert any(isinstance(n.op, ir.Exp) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=8, low=-2.0, high=2.0)
    assert rep.max_rel_error <= 1e-5, rep.per_node


@pytest.mark.parametrize("domain", ["box", "deeppoly", "crown", "bab"])
def test_every_domain_is_sound_on_exp_and_exact_at_eps_zero(domain, tmp_path):
    graph = from_onnx(_exp_model(tmp_path))
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    spec = Spec.robustness(torch.tensor([int(graph.forward(x).argmax())]), 3)
    box = Box.linf_ball(x, 0.3, None)
    res = get_domain(domain).bound(graph, box, spec)
    pts = box.sample(4000, torch.Generator().manual_seed(1)).reshape(-1, 4)
    with torch.no_grad():
        vals = spec.expand(len(pts)).values(graph.forward(pts))
    assert (vals >= res.lower - 1e-5).all()
    if domain != "bab":  # a point box: the bound is the value itself
        point = get_domain(domain).bound(graph, Box.point(x), spec).lower
        with torch.no_grad():
            torch.testing.assert_close(point, spec.values(graph.forward(x)), rtol=1e-5, atol=1e-5)


def test_milp_refuses_exp_in_one_line_and_the_chain_skips_it(tmp_path):
    path = _exp_model(tmp_path)
    graph = from_onnx(path)
    x = torch.zeros(1, 4)
    spec = Spec.robustness(torch.tensor([int(graph.forward(x).argmax())]), 3)
    with pytest.raises(UnsupportedOpsError, match="Exp"):
        get_domain("milp").bound(graph, Box.linf_ball(x, 0.1, None), spec)
    vnnlib = robustness_vnnlib(tmp_path / "p.vnnlib", 4, 3, int(graph.forward(x).argmax()), 0.01)
    done = subprocess.run([sys.executable, "-m", "verikit", "certify", path, "--vnnlib", str(vnnlib), "--domains",
                           "box,crown,milp", "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] in ("holds", "violated", "unknown") and "Traceback" not in done.stderr


def test_lines_hold_in_float32_and_overflowing_inputs_are_refused():
    gen = torch.Generator().manual_seed(0)
    l = torch.rand(5000, generator=gen) * 100 - 60
    u = torch.minimum(l + torch.rand(5000, generator=gen) * 30, torch.tensor(79.0))
    l = torch.minimum(l, u)
    rel = exp_relaxation(l, u)
    t = torch.linspace(0, 1, 101, dtype=torch.float64).reshape(-1, 1)
    xs = l.double() + t * (u.double() - l.double())
    f = torch.exp(xs)
    assert (rel.lower_slope.double() * xs + rel.lower_bias.double() <= f * (1 + 1e-12)).all()
    assert (rel.upper_slope.double() * xs + rel.upper_bias.double() >= f * (1 - 1e-12)).all()
    with pytest.raises(VerikitError, match="overflow"):
        exp_relaxation(torch.tensor([0.0]), torch.tensor([90.0]))


def test_exp_of_torch_modules_imports():
    from verikit.torch_import import from_torch

    class ExpNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return torch.exp(self.fc(x))

    net = ExpNet().eval()
    graph = from_torch(net, (3,))
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(graph.forward(x), net(x))
