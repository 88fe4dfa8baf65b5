"""Slice / Gather / Split on data tensors (IR `Take`): imported models against onnxruntime (with
and without a batch dimension), Box soundness by sampling and at eps = 0, the MILP exact
against the enumeration oracle through its basis mechanism, and one-line rejections."""
import numpy as np
import pytest
import torch
from onnx import helper

from exact_oracle import exact_min
from test_onnx_import import IMG, VEC, N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec

I64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
BIG = np.iinfo(np.int64).max

CASES = {  # label -> (nodes, input shape, initializers)
    "slice-negative-steps-axes-and-indices": (
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], IMG,
        [("st", I64(-1, 0, 0)), ("en", I64(-BIG, 6, 1)), ("ax", I64(3, -2, 0)), ("sp", I64(-2, 4, 1))]),
    "slice-default-axes-and-steps": ([N("Slice", ["x", "st", "en"], ["y"])], IMG,
                                     [("st", I64(0, 1, -4, 2)), ("en", I64(1, 2, -1, 100))]),
    "slice-then-relu-then-concat-of-parts": (
        [N("Slice", ["x", "a0", "a1", "ax"], ["p"]), N("Slice", ["x", "b0", "b1", "ax"], ["q"]),
         N("Relu", ["q"], ["r"]), N("Concat", ["r", "p"], ["y"], axis=3)], IMG,
        [("a0", I64(0)), ("a1", I64(2)), ("b0", I64(3)), ("b1", I64(6)), ("ax", I64(3))]),
    "gather-2d-negative-indices": ([N("Gather", ["x", "i"], ["g"], axis=1), N("Relu", ["g"], ["y"])], VEC,
                                   [("i", I64(-1, 0, 2, 2).reshape(2, 2))]),
    "gather-scalar-index-drops-the-axis": ([N("Gather", ["x", "i"], ["y"], axis=-2)], IMG, [("i", np.array(-2))]),
    "split-given-sizes": ([N("Split", ["x", "s"], ["a", "b"], axis=2), N("Relu", ["a"], ["ra"]),
                           N("Concat", ["b", "ra"], ["y"], axis=2)], IMG, [("s", I64(2, 4))]),
    "split-equal-parts-added": ([N("Split", ["x"], ["a", "b", "c"], axis=3), N("Add", ["a", "c"], ["y"])], IMG, []),
    "unbatched-rank-1-slice-gather": ([N("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
                                       N("Gather", ["s", "i"], ["y"], axis=0)], (6,),
                                      [("st", I64(5)), ("en", I64(-BIG)), ("ax", I64(0)), ("sp", I64(-1)),
                                       ("i", I64(0, 2, 4, 1))]),
}


@pytest.mark.parametrize("label", sorted(CASES))
def test_import_matches_onnxruntime_and_box_is_sound(label, tmp_path):
    nodes, shape, inits = CASES[label]
    path = _model(nodes, shape, None, inits, str(tmp_path / f"{label}.onnx"))
    graph = from_onnx(path)
    assert any(isinstance(n.op, ir.Take) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=3, low=-1.0, high=1.0)
    assert rep.max_rel_error == 0.0, rep.per_node  # selection only: bit-exact
    x = torch.rand((2,) + graph.input_shape) * 2 - 1
    box = Box.linf_ball(x, 0.3, None)
    out = propagate_box(graph, box)[graph.output]
    pts = box.sample(500, torch.Generator().manual_seed(0)).reshape((-1,) + graph.input_shape)
    y = graph.forward(pts).reshape((500, 2) + graph.output_shape)
    assert bool(((y >= out.lo - 1e-6) & (y <= out.hi + 1e-6)).all())  # float32 centre/radius rounding
    zero = propagate_box(graph, Box.point(x))[graph.output]
    assert torch.equal(zero.lo, graph.forward(x)) and torch.equal(zero.hi, graph.forward(x))


def _take_relu_net():
    gen = torch.Generator().manual_seed(7)
    b = ir.GraphBuilder("x", (4,), torch.float64)
    h = b.add("fc", ir.Linear(torch.randn(6, 4, generator=gen, dtype=torch.float64),
                              torch.randn(6, generator=gen, dtype=torch.float64)), ["x"])
    h = b.add("rev", ir.Take(1, torch.tensor([5, 3, 1, 0]), (4,)), [h])
    h = b.add("relu", ir.ReLU(), [h])
    h = b.add("g", ir.Take(1, torch.tensor([3, 0, 0, 2, 1, 3]), (2, 3)), [h])
    h = b.add("flat", ir.Reshape((6,)), [h])
    h = b.add("out", ir.Linear(torch.randn(3, 6, generator=gen, dtype=torch.float64), None), [h])
    return b.build(h)


@pytest.mark.parametrize("domain", ["milp", "crown", "deeppoly"])
def test_bounds_against_the_exact_oracle(domain):
    graph = _take_relu_net()
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    box = Box.linf_ball(x, 0.4, None)
    spec = Spec.robustness(torch.tensor([0, 2]), 3, dtype=torch.float64)
    opts = {"solver": "highs", "exact_bounds": True, "input_split": False} if domain == "milp" else {}
    res = get_domain(domain, **opts).bound(graph, box, spec)
    for b in range(2):
        for r in range(spec.num_rows):
            c = spec.C[b, r].double().numpy()
            exact = exact_min(graph, box.lo[b].numpy(), box.hi[b].numpy(), c) - float(spec.d[b, r])
            lower = float(res.lower[b, r])
            assert lower <= exact + 1e-6
            if domain == "milp":
                assert lower == pytest.approx(exact, abs=2e-5)


@pytest.mark.parametrize("nodes,out_shape,fragment", [
    ([N("Cast", ["x"], ["xi"], to=7), N("Gather", ["w", "xi"], ["y"], name="gx")], [1, 6],
     "indices (input 1) must be a constant"),
    ([N("Cast", ["x"], ["xi"], to=7), N("Shape", ["x"], ["s"]), N("Slice", ["x", "xi", "s"], ["y"], name="sx")],
     ["a", "b"], "starts (input 1) must be a constant"),
])
def test_data_dependent_positions_are_rejected_in_one_line(tmp_path, nodes, out_shape, fragment):
    import onnx

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 6])],
                          [helper.make_tensor_value_info("y", 1, out_shape)],
                          [onnx.numpy_helper.from_array(_w(6), "w")])
    path = str(tmp_path / "bad.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(path)
    assert fragment in str(e.value) and ("gx" in str(e.value) or "sx" in str(e.value))
