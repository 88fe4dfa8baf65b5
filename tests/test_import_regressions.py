"""Importer regressions of issue 14: every model here was mis-imported (silently wrong axes or
shapes), imported with an attribute ignored, or crashed the importer. Each must now either
match onnxruntime exactly (values *and* shapes, and Box bounds that contain onnxruntime's
outputs) or be refused with the node named; certify refuses a model whose import disagrees."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnx_models import N, make_model, run_ort
from verikit import Box, from_onnx, ir
from verikit.cli import main
from verikit.domains.box import propagate_box
from verikit.errors import ModelLoadError, UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime

RNG = np.random.default_rng(14)


def _w(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _bn_params(shape):
    return [("g", _w(*shape)), ("b", _w(*shape)), ("m", _w(*shape)), ("v", np.abs(_w(*shape)) + 0.5)]


def _assert_matches_onnxruntime(path, low=-1.0, high=1.0):
    """Import, compare every tensor with onnxruntime (values and shapes), and check that Box
    bounds of a small ball contain onnxruntime's outputs at points inside it."""
    graph = from_onnx(path)
    rep = compare_with_onnxruntime(path, graph, num_inputs=3, low=low, high=high)
    assert not getattr(rep, "shape_mismatches", None) and rep.max_rel_error <= 1e-5, rep.per_node
    x = torch.rand((1,) + graph.input_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    box = Box.linf_ball(x, 0.1, None)
    out = propagate_box(graph, box)[graph.output]
    onnx_shape = ((1,) if graph.meta["batched_input"] else ()) + tuple(graph.input_shape)
    for p in box.sample(20, torch.Generator().manual_seed(1)):
        y = torch.from_numpy(run_ort(path, p.numpy().reshape(onnx_shape))).reshape(out.lo.shape)
        assert bool(((y >= out.lo - 1e-5) & (y <= out.hi + 1e-5)).all())
    return graph


# ------------------------------------------------------------------ item 1: axes without a batch dimension
@pytest.mark.parametrize("label,nodes,shape,inits", [
    ("batchnorm-on-4x4", [N("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])], (4, 4), _bn_params((4,))),
    ("batchnorm-on-2x3x5", [N("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])], (2, 3, 5), _bn_params((3,))),
    ("global-average-pool-rank-3", [N("GlobalAveragePool", ["x"], ["y"])], (2, 3, 5), []),
    ("global-average-pool-n2", [N("GlobalAveragePool", ["x"], ["y"])], (2, 3, 4, 4), []),
    ("maxpool-n2", [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2])], (2, 3, 4, 4), []),
    ("averagepool-n2", [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], (2, 3, 4, 4), []),
    ("concat-axis-0-unbatched", [N("Relu", ["x"], ["a"]), N("Concat", ["x", "a"], ["y"], axis=0)], (3, 2), []),
    ("transpose-unbatched", [N("Transpose", ["x"], ["y"], perm=[1, 0])], (3, 2), []),
    ("gemm-row-bias-on-unbatched-matrix", [N("Gemm", ["x", "W", "c"], ["y"])], (4, 3), [("W", _w(3, 4)), ("c", _w(4, 1))]),
    ("flatten-axis-2", [N("Flatten", ["x"], ["f"], axis=2), N("Relu", ["f"], ["y"])], (1, 2, 3, 2), []),
])
def test_unbatched_axes_match_onnxruntime(label, nodes, shape, inits, tmp_path):
    _assert_matches_onnxruntime(make_model(nodes, shape, inits, str(tmp_path / f"{label}.onnx")))


# ------------------------------------------------------------------ item 2: attributes never ignored
def test_averagepool_dilations_are_refused_by_name(tmp_path):
    nodes = [N("AveragePool", ["x"], ["a"], kernel_shape=[2, 2], dilations=[2, 2], name="pool"),
             N("GlobalAveragePool", ["a"], ["y"])]
    path = make_model(nodes, (1, 2, 6, 6), [], str(tmp_path / "dil.onnx"), opset=19)
    with pytest.raises(UnsupportedOpsError, match="pool.*dilations"):
        from_onnx(path)


def test_unknown_attributes_are_refused_by_name(tmp_path):
    # Reshape-1 carries consumed_inputs, an attribute the importer has no rule for
    nodes = [N("Reshape", ["x"], ["y"], shape=[1, 6], consumed_inputs=[0], name="old_reshape")]
    path = make_model(nodes, (1, 2, 3), [], str(tmp_path / "legacy.onnx"), opset=1)
    with pytest.raises(UnsupportedOpsError, match=r"old_reshape \(Reshape: attribute\(s\) consumed_inputs"):
        from_onnx(path)


def test_every_unsupported_node_on_one_path_is_listed(tmp_path):
    nodes = [N("MatMul", ["x", "W"], ["h"]), N("Erf", ["h"], ["e"], name="erf"),
             N("LogSoftmax", ["e"], ["s"], axis=1, name="logsoftmax"), N("Relu", ["s"], ["r"]),
             N("AveragePool", ["r"], ["y"], kernel_shape=[1], dilations=[2], name="pool")]
    path = make_model(nodes, (1, 1, 4), [("W", _w(4, 4))], str(tmp_path / "chain.onnx"), opset=19)
    with pytest.raises(UnsupportedOpsError) as err:
        from_onnx(path)
    listed = {name: why for name, _, why in err.value.nodes}
    assert set(listed) == {"erf", "logsoftmax", "pool"}  # Relu is supported: only its input failed
    assert "dilations" in listed["pool"]  # checked by attributes although its input shape is unknown


def test_downstream_constant_roles_are_checked_without_shapes(tmp_path):
    # the Reshape's shape is computed from a tensor downstream of an unsupported op: that is
    # still a constant (Shape of data), so the Reshape is fine; the Conv with data weights is not
    nodes = [N("Erf", ["x"], ["e"], name="erf"), N("Shape", ["e"], ["s"]), N("Reshape", ["e", "s"], ["r"]),
             N("Conv", ["r", "r"], ["y"], name="conv")]
    path = make_model(nodes, (1, 1, 2, 2), [], str(tmp_path / "roles.onnx"))
    with pytest.raises(UnsupportedOpsError) as err:
        from_onnx(path)
    listed = {name: why for name, _, why in err.value.nodes}
    assert set(listed) == {"erf", "conv"} and "weights" in listed["conv"]


# ------------------------------------------------------------------ item 4: constants broadcasting into the batch
@pytest.mark.parametrize("label,nodes,shape,inits", [
    ("add-2x4", [N("Add", ["x", "c"], ["y"])], (1, 4), [("c", _w(2, 4))]),
    ("sub-2x4", [N("Sub", ["x", "c"], ["y"])], (1, 4), [("c", _w(2, 4))]),
    ("mul-4x1", [N("Mul", ["x", "c"], ["y"])], (1, 4), [("c", _w(4, 1))]),
    ("div-4x1", [N("Div", ["x", "c"], ["y"])], (1, 4), [("c", np.abs(_w(4, 1)) + 0.5)]),
    ("matmul-add-column-bias", [N("MatMul", ["x", "W"], ["h"]), N("Add", ["h", "c"], ["y"])], (1, 3),
     [("W", _w(3, 4)), ("c", _w(4, 1))]),
    ("vector-plus-column", [N("Add", ["x", "c"], ["y"])], (4,), [("c", _w(4, 1))]),
])
def test_constants_broadcasting_into_the_batch_are_refused(label, nodes, shape, inits, tmp_path):
    path = make_model(nodes, shape, inits, str(tmp_path / f"{label}.onnx"))
    with pytest.raises(UnsupportedOpsError, match="batch dimension|dimensions in front"):
        from_onnx(path)


@pytest.mark.parametrize("label,nodes,shape,inits", [
    ("add-leading-one", [N("Add", ["x", "c"], ["y"])], (1, 4), [("c", _w(1, 4))]),
    ("mul-channel", [N("Mul", ["x", "c"], ["y"])], (1, 2, 3), [("c", _w(2, 1))]),
    ("add-unbatched-matrix-column", [N("Add", ["x", "c"], ["y"])], (4, 3), [("c", _w(4, 1))]),
    ("matmul-add-row-bias", [N("MatMul", ["x", "W"], ["h"]), N("Add", ["h", "c"], ["y"])], (1, 3),
     [("W", _w(3, 4)), ("c", _w(1, 4))]),
])
def test_constants_that_keep_the_batch_import_exactly(label, nodes, shape, inits, tmp_path):
    _assert_matches_onnxruntime(make_model(nodes, shape, inits, str(tmp_path / f"{label}.onnx")))


def test_the_check_compares_shapes_not_element_counts(tmp_path):
    """The old import of x(1,4) + c(2,4): an IR graph claiming shape (4,) whose batch-1 output
    is (2, 4). Same element count as onnxruntime's (2, 4), different shape: must be caught."""
    path = make_model([N("Add", ["x", "c"], ["y"])], (1, 4), [("c", _w(2, 4))], str(tmp_path / "m.onnx"))
    b = ir.GraphBuilder("x", (4,))
    out = b.add("y", ir.ElementwiseAffine(None, torch.zeros(2, 4)), ["x"])
    graph = b.build(out)
    graph.meta.update(onnx_map={"x": "x"}, batched_input=True, output_name="y", onnx_batched={"x": True})
    from verikit.onnx_check import check_import

    rep = compare_with_onnxruntime(path, graph, num_inputs=2)
    assert rep.shape_mismatches and "shape" in rep.problem()
    with pytest.raises(ModelLoadError, match="disagrees with onnxruntime"):
        check_import(path, graph)


def test_certify_refuses_a_model_whose_import_disagrees(tmp_path, monkeypatch):
    """certify runs the import check of `verikit info` and exits 2 on a mismatch (here an
    importer bug is simulated by changing a weight after import)."""
    from verikit import onnx_import

    path = make_model([N("Gemm", ["x", "W", "b"], ["y"], transB=1)], (1, 3), [("W", _w(2, 3)), ("b", _w(2))],
                      str(tmp_path / "m.onnx"))
    real = onnx_import.from_onnx

    def buggy(p, *a, **k):
        g = real(p, *a, **k)
        g.nodes[-1].op.weight = g.nodes[-1].op.weight * 1.01
        return g

    monkeypatch.setattr(onnx_import, "from_onnx", buggy)
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)(declare-const X_1 Real)(declare-const X_2 Real)"
                    "(declare-const Y_0 Real)(declare-const Y_1 Real)"
                    "(assert (>= X_0 0))(assert (<= X_0 1))(assert (>= X_1 0))(assert (<= X_1 1))"
                    "(assert (>= X_2 0))(assert (<= X_2 1))(assert (<= Y_0 Y_1))")
    res = CliRunner().invoke(main, ["certify", path, "--vnnlib", str(prop), "--threads", "1"])
    assert res.exit_code == 2 and "disagrees with onnxruntime" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ item 8: importer crashes
@pytest.mark.parametrize("label,nodes,shape,inits,opset", [
    ("reshape-1-shape-attribute", [N("Reshape", ["x"], ["y"], shape=[1, 6])], (1, 2, 3), [], 1),
    ("batchnorm-7-spatial-0", [N("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], spatial=0)], (1, 2, 3),
     _bn_params((2, 3)), 7),
    ("averagepool-pads-over-half-kernel", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[2, 2, 2, 2],
                                             count_include_pad=1)], (1, 1, 5, 5), [], 17),
    ("averagepool-asymmetric-pads", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[0, 1, 2, 0],
                                       count_include_pad=1)], (1, 1, 5, 5), [], 17),
    ("pooling-on-n2-input", [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])], (3, 2, 4, 4), [], 17),
])
def test_former_importer_crashes_now_import_exactly(label, nodes, shape, inits, opset, tmp_path):
    _assert_matches_onnxruntime(make_model(nodes, shape, inits, str(tmp_path / f"{label}.onnx"), opset=opset))


@pytest.mark.parametrize("label,nodes,shape", [
    ("maxpool-pads-over-half-kernel", [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], pads=[2, 2, 2, 2], name="p")],
     (1, 1, 5, 5)),
    ("averagepool-excluding-large-pads", [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[2, 2, 2, 2],
                                            name="p")], (1, 1, 5, 5)),
    ("pooling-rank-3", [N("MaxPool", ["x"], ["y"], kernel_shape=[2], name="p")], (1, 2, 6)),
])
def test_pooling_the_ir_cannot_express_is_refused_in_one_error(label, nodes, shape, tmp_path):
    path = make_model(nodes, shape, [], str(tmp_path / f"{label}.onnx"))
    with pytest.raises(UnsupportedOpsError, match=r"p \("):
        from_onnx(path)
    res = CliRunner().invoke(main, ["info", path])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.output


def test_info_reports_shapes_in_the_check(tmp_path):
    path = make_model([N("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"])], (4, 4), _bn_params((4,)),
                      str(tmp_path / "bn.onnx"))
    res = CliRunner().invoke(main, ["info", path, "--samples", "2"])
    assert res.exit_code == 0, res.output
    err = float(res.stdout.split("max relative error ")[1].split()[0])
    assert err <= 1e-6  # the old import normalised along the wrong axis: error about 1
