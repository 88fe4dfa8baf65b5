"""ConvTranspose and Resize (nearest / linear) on data: imported models against onnxruntime,
Box sound by sampling and at eps = 0, the back-substitution and MILP domains exact on them
(affine: through the VJP and the basis), one-line refusals of what is not implemented."""
import numpy as np
import pytest
import torch

from test_onnx_import import IMG, N, _model, _w
from verikit import ir
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime
from verikit.onnx_import import from_onnx
from verikit.spec import Spec

F32 = lambda *v: np.array(v, dtype=np.float32)  # noqa: E731
SMALL = (1, 2, 3, 4)

CASES = {  # label -> (nodes, input shape, initializers)
    "convtranspose-strides-asymmetric-pads-output-padding": (
        [N("ConvTranspose", ["x", "W", "b"], ["y"], strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2])], SMALL,
        [("W", _w(2, 3, 3, 3)), ("b", _w(3))]),
    "convtranspose-groups-dilations": (
        [N("ConvTranspose", ["x", "W"], ["y"], group=2, dilations=[2, 1], strides=[1, 2])], SMALL,
        [("W", _w(2, 2, 2, 3))]),
    "convtranspose-then-relu": (
        [N("ConvTranspose", ["x", "W", "b"], ["h"], strides=[2, 2], pads=[1, 1, 1, 1]), N("Relu", ["h"], ["y"])], IMG,
        [("W", _w(2, 1, 4, 4)), ("b", _w(1))]),
    "resize-nearest-scales-asymmetric-floor": (
        [N("Resize", ["x", "", "s"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
           nearest_mode="floor")], SMALL, [("s", F32(1, 1, 2, 3))]),
    "resize-nearest-half-pixel-default": ([N("Resize", ["x", "", "s"], ["y"])], SMALL, [("s", F32(1, 1, 3, 1.5))]),
    "resize-linear-half-pixel-sizes": (
        [N("Resize", ["x", "", "", "sz"], ["y"], mode="linear")], SMALL,
        [("sz", np.array([1, 2, 7, 5], dtype=np.int64))]),
    "resize-linear-align-corners": (
        [N("Resize", ["x", "", "s"], ["y"], mode="linear", coordinate_transformation_mode="align_corners")], SMALL,
        [("s", F32(1, 1, 2, 2))]),
    "resize-linear-pytorch-half-pixel-downsample": (
        [N("Resize", ["x", "", "s"], ["y"], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")], IMG,
        [("s", F32(1, 1, 0.5, 0.75))]),
}


@pytest.mark.parametrize("label", sorted(CASES))
def test_import_matches_onnxruntime_and_box_is_sound(label, tmp_path):
    nodes, shape, inits = CASES[label]
    path = _model(nodes, shape, None, inits, str(tmp_path / f"{label}.onnx"))
    graph = from_onnx(path)
    assert any(isinstance(n.op, (ir.ConvTranspose2d, ir.Resample)) for n in graph.nodes)
    rep = compare_with_onnxruntime(path, graph, num_inputs=3, low=-1.0, high=1.0)
    assert rep.max_rel_error <= 1e-5, rep.per_node
    x = torch.rand((2,) + graph.input_shape) * 2 - 1
    box = Box.linf_ball(x, 0.3, None)
    out = propagate_box(graph, box)[graph.output]
    pts = box.sample(500, torch.Generator().manual_seed(0)).reshape((-1,) + graph.input_shape)
    y = graph.forward(pts).reshape((500, 2) + graph.output_shape)
    assert bool(((y >= out.lo - 1e-5) & (y <= out.hi + 1e-5)).all())
    zero = propagate_box(graph, Box.point(x))[graph.output]
    torch.testing.assert_close(zero.lo, graph.forward(x), rtol=1e-5, atol=1e-6)


def _upsample_net():
    """ConvTranspose (output (2, 4, 3)) -> ReLU -> Resample (H linear 4 -> 5, W nearest 3 -> 4) -> Linear."""
    from verikit.onnx_upsample_ops import resize_matrix

    gen = torch.Generator().manual_seed(2)
    dt = torch.float64
    b = ir.GraphBuilder("x", (1, 2, 2), dt)
    up = ir.ConvTranspose2d(torch.randn(1, 2, 2, 2, generator=gen, dtype=dt), torch.randn(2, generator=gen, dtype=dt),
                            (2, 2), (1, 1), 1, (1, 0), (0, 1, 1, 0))
    h = b.add("up", up, ["x"])
    h = b.add("relu", ir.ReLU(), [h])
    mh = torch.tensor(resize_matrix(4, 5, 1.25, "linear", "half_pixel", "round_prefer_floor"), dtype=dt)
    mw = torch.tensor(resize_matrix(3, 4, 4 / 3, "nearest", "half_pixel", "round_prefer_floor"), dtype=dt)
    h = b.add("resize", ir.Resample((2, 3), (mh, mw)), [h])
    h = b.add("flat", ir.Reshape((40,)), [h])
    h = b.add("out", ir.Linear(torch.randn(3, 40, generator=gen, dtype=dt), None), [h])
    return b.build(h)


@pytest.mark.parametrize("domain", ["milp", "crown", "deeppoly"])
def test_bounds_against_the_exact_oracle(domain):
    from exact_oracle import exact_min

    graph = _upsample_net()
    x = torch.rand((2,) + graph.input_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    box = Box.linf_ball(x, 0.3, None)
    spec = Spec.robustness(torch.tensor([1, 2]), 3, dtype=torch.float64)
    opts = {"solver": "highs", "exact_bounds": True, "input_split": False} if domain == "milp" else {}
    res = get_domain(domain, **opts).bound(graph, box, spec)
    for b in range(2):
        for r in range(spec.num_rows):
            c = spec.C[b, r].numpy()
            exact = exact_min(graph, box.lo[b].numpy().reshape(-1), box.hi[b].numpy().reshape(-1), c) - float(spec.d[b, r])
            assert float(res.lower[b, r]) <= exact + 1e-6
            if domain == "milp":
                assert float(res.lower[b, r]) == pytest.approx(exact, abs=2e-5)


@pytest.mark.parametrize("node,fragment", [
    (N("Resize", ["x", "", "s"], ["y"], mode="cubic", name="rz"), "mode=cubic is not supported"),
    (N("Resize", ["x", "", "s"], ["y"], coordinate_transformation_mode="tf_half_pixel_for_nn", name="rz"),
     "coordinate_transformation_mode=tf_half_pixel_for_nn"),
    (N("ConvTranspose", ["x", "W"], ["y"], output_shape=[7, 9], strides=[2, 2], name="ct"), "output_shape"),
])
def test_unimplemented_settings_are_refused_by_name(tmp_path, node, fragment):
    inits = [("s", F32(1, 1, 2, 2)), ("W", _w(2, 3, 3, 3))]
    used = [(k, v) for k, v in inits if k in node.input]
    path = _model([node], SMALL, None, used, str(tmp_path / "m.onnx"))
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(path)
    assert fragment in str(e.value) and node.name in str(e.value)
