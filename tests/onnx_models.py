"""Build small ONNX files with onnx.helper for tests: one float input "x", one output "y" whose
shape is filled in from onnxruntime (so the file passes the full ONNX checker), any opset."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

N = helper.make_node


def run_ort(model_or_path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def make_model(nodes, in_shape, inits=(), path=None, opset=17, ir_version=None) -> str:
    """Write the graph x -> nodes -> y to `path` (initializers: (name, array) pairs)."""
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version or (8 if opset <= 17 else 9)
    y = run_ort(m, np.zeros(in_shape, dtype=np.float32))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape)))
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def const(name: str, value) -> onnx.NodeProto:
    return N("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))
