"""Check an imported graph against onnxruntime, node by node.

Every ONNX tensor that maps to an IR node is added as an extra model output, both runtimes are
fed the same random inputs, and the largest relative error (max |a - b| / max(|b|, 1)) is
reported per node. This is how `verikit info` and the importer tests validate an import.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .ir import Graph


@dataclass
class CheckReport:
    max_rel_error: float
    per_node: list = field(default_factory=list)  # (onnx tensor, IR node, rel error)
    num_inputs: int = 0


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0)) if b.size else 0.0


def compare_with_onnxruntime(model_path: str, graph: Graph, num_inputs: int = 4, seed: int = 0,
                             low: float = 0.0, high: float = 1.0) -> CheckReport:
    import onnx
    import onnxruntime as ort

    model = onnx.load(model_path)
    existing = {o.name for o in model.graph.output}
    onnx_map = graph.meta.get("onnx_map", {})
    produced = {o for n in model.graph.node for o in n.output}
    probe = [name for name, node in onnx_map.items() if name in produced and (node in graph._by_name) and name not in existing]
    for name in probe:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the graph as written
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batched = graph.meta.get("batched_input", True)
    onnx_shape = ((1,) if batched else ()) + tuple(graph.input_shape)
    names = [o.name for o in sess.get_outputs()]
    out_name = graph.meta.get("output_name", names[0])
    gen = np.random.default_rng(seed)
    worst: dict[str, float] = {}
    for _ in range(num_inputs):
        x = gen.uniform(low, high, size=onnx_shape).astype(np.float32)
        ref = dict(zip(names, sess.run(names, {inp.name: x})))
        with torch.no_grad():
            vals = graph.forward(torch.from_numpy(x).reshape((1,) + tuple(graph.input_shape)).to(graph.dtype),
                                 return_all=True)
        for name in probe + [out_name]:
            node = graph.output if name == out_name else onnx_map[name]
            if node not in vals:
                continue
            r = np.asarray(ref[name], dtype=np.float64)
            mine = vals[node].detach().double().numpy().reshape(r.shape) if vals[node].numel() == r.size else None
            err = float("inf") if mine is None else _rel_err(mine, r)
            worst[name] = max(worst.get(name, 0.0), err)
    per_node = [(n, graph.output if n == out_name else onnx_map[n], e) for n, e in worst.items()]
    return CheckReport(max((e for _, _, e in per_node), default=0.0), per_node, num_inputs)


def evaluate_with_onnxruntime(model_path: str, x: torch.Tensor, graph: Graph | None = None) -> np.ndarray:
    """Run the ONNX file on a batch of inputs x (B, *sample_shape), one sample at a time (VNN-COMP
    models have a fixed batch of 1). Returns outputs flattened per sample: (B, num_outputs).
    Used to re-check counterexamples independently of verikit's own evaluation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batched = graph.meta.get("batched_input", True) if graph is not None else len(inp.shape) >= 2
    outs = []
    for xi in x.detach().cpu().double().numpy():
        feed = xi[None] if batched else xi
        feed = feed.reshape([d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]) \
            if all(isinstance(d, int) for d in inp.shape) else feed
        outs.append(np.asarray(sess.run(None, {inp.name: feed.astype(np.float32)})[0]).reshape(-1))
    return np.stack(outs)
