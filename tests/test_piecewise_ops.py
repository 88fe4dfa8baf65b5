"""Clip / Relu6, Abs, Max / Min imported as exact ReLU compositions: against onnxruntime, Box
sound by sampling and at eps = 0, every domain sound and the MILP exact against the
enumeration oracle."""
import numpy as np
import pytest
import torch
from onnx import helper

from exact_oracle import exact_min
from test_onnx_import import N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec

F32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
V4 = (1, 4)

CASES = {  # label -> (nodes, input shape, initializers, opset)
    "clip-relu6": ([N("Gemm", ["x", "W"], ["h"]), N("Clip", ["h", "lo", "hi"], ["y"])], V4,
                   [("W", _w(4, 5, scale=4.0)), ("lo", F32(0.0)), ("hi", F32(6.0))], 17),
    "clip-max-only": ([N("Clip", ["x", "", "hi"], ["y"])], V4, [("hi", F32(0.25))], 17),
    "clip-min-only-opset-6-attributes": ([N("Clip", ["x"], ["y"], min=-0.3)], V4, [], 6),
    "abs": ([N("Gemm", ["x", "W"], ["h"]), N("Abs", ["h"], ["y"])], V4, [("W", _w(4, 3))], 17),
    "max-min-of-two-data-tensors": ([N("Gemm", ["x", "W"], ["a"]), N("Gemm", ["x", "W2"], ["b"]),
                                     N("Max", ["a", "b"], ["m"]), N("Min", ["a", "b"], ["n"]),
                                     N("Sub", ["m", "n"], ["y"])], V4, [("W", _w(4, 3)), ("W2", _w(4, 3))], 17),
    "max-min-with-constants": ([N("Max", ["x", "c"], ["m"]), N("Min", ["m", "d"], ["y"])], V4,
                               [("c", _w(4)), ("d", _w(1, 4) + 0.5)], 17),
}


def _path(label, tmp_path):
    nodes, shape, inits, opset = CASES[label]
    return _model(nodes, shape, None, inits, str(tmp_path / f"{label}.onnx"), opset=opset)


@pytest.mark.parametrize("label", sorted(CASES))
def test_import_matches_onnxruntime_and_box_is_sound(label, tmp_path):
    path = _path(label, tmp_path)
    graph = from_onnx(path)
    rep = compare_with_onnxruntime(path, graph, num_inputs=4, low=-2.0, high=2.0)
    assert rep.max_rel_error <= 1e-5, rep.per_node
    x = torch.rand((2,) + graph.input_shape) * 4 - 2
    box = Box.linf_ball(x, 0.5, None)
    out = propagate_box(graph, box)[graph.output]
    pts = box.sample(500, torch.Generator().manual_seed(0)).reshape((-1,) + graph.input_shape)
    y = graph.forward(pts).reshape((500, 2) + graph.output_shape)
    assert bool(((y >= out.lo - 1e-5) & (y <= out.hi + 1e-5)).all())
    zero = propagate_box(graph, Box.point(x))[graph.output]
    torch.testing.assert_close(zero.lo, graph.forward(x), rtol=1e-5, atol=1e-6)


def _chain(*layers):
    """A float64 chain graph from [(W, b) | 'relu'] (the enumeration oracle handles chains only)."""
    b = ir.GraphBuilder("x", (layers[0][0].shape[1],), torch.float64)
    h = "x"
    for k, layer in enumerate(layers):
        op = ir.ReLU() if layer == "relu" else ir.Linear(torch.tensor(layer[0], dtype=torch.float64),
                                                         torch.tensor(layer[1], dtype=torch.float64))
        h = b.add(f"l{k}", op, [h])
    return b.build(h)


def _chain_equivalent(label):
    """The same function as the imported DAG, written as a chain of Linear and ReLU layers."""
    inits = dict(CASES[label][2])
    if label == "clip-relu6":  # relu(h) - relu(h - 6)
        W = inits["W"].T.astype(np.float64)
        n = W.shape[0]
        return _chain((np.vstack([W, W]), np.r_[np.zeros(n), -6 * np.ones(n)]), "relu",
                      (np.hstack([np.eye(n), -np.eye(n)]), np.zeros(n)))
    if label == "abs":  # relu(h) + relu(-h)
        W = inits["W"].T.astype(np.float64)
        n = W.shape[0]
        return _chain((np.vstack([W, -W]), np.zeros(2 * n)), "relu", (np.hstack([np.eye(n), np.eye(n)]), np.zeros(n)))
    if label == "max-min-of-two-data-tensors":  # max(a, b) - min(a, b) = |a - b|
        D = (inits["W"].astype(np.float64) - inits["W2"].astype(np.float64)).T
        n = D.shape[0]
        return _chain((np.vstack([D, -D]), np.zeros(2 * n)), "relu", (np.hstack([np.eye(n), np.eye(n)]), np.zeros(n)))
    c, d = inits["c"].astype(np.float64), inits["d"].reshape(-1).astype(np.float64)  # min(c + relu(x - c), d)
    n = c.size
    return _chain((np.eye(n), -c), "relu", (-np.eye(n), d - c), "relu", (-np.eye(n), d))


@pytest.mark.parametrize("label", ["clip-relu6", "abs", "max-min-of-two-data-tensors", "max-min-with-constants"])
@pytest.mark.parametrize("domain", ["milp", "crown", "deeppoly"])
def test_domains_against_the_exact_oracle(label, domain, tmp_path):
    graph = from_onnx(_path(label, tmp_path), dtype=torch.float64)
    chain = _chain_equivalent(label)
    m = graph.output_shape[-1]
    x = torch.rand((2,) + graph.input_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(graph.forward(x), chain.forward(x), rtol=0, atol=1e-12)  # the same function
    box = Box.linf_ball(x, 0.6, None)
    spec = Spec.robustness(torch.tensor([0, m - 1]), m, dtype=torch.float64)
    opts = {"solver": "highs", "exact_bounds": True, "input_split": False} if domain == "milp" else {}
    res = get_domain(domain, **opts).bound(graph, box, spec)
    for b in range(2):
        for r in range(spec.num_rows):
            exact = exact_min(chain, box.lo[b].numpy().reshape(-1), box.hi[b].numpy().reshape(-1),
                              spec.C[b, r].numpy()) - float(spec.d[b, r])
            assert float(res.lower[b, r]) <= exact + 1e-6
            if domain == "milp":
                assert float(res.lower[b, r]) == pytest.approx(exact, abs=2e-5)


def test_unsupported_forms_are_refused_in_one_line(tmp_path):
    nodes = [N("Clip", ["x", "lo", "hi"], ["a"], name="badclip"), N("Max", ["a", "x", "x"], ["y"], name="max3")]
    path = _model(nodes, V4, None, [("lo", F32(1.0)), ("hi", F32(0.0))], str(tmp_path / "bad.onnx"))
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(path)
    msg = str(e.value)
    assert "badclip" in msg and "min 1.0 > max 0.0" in msg and "\n" not in msg
