"""Check an imported graph against onnxruntime, node by node.

Every ONNX tensor that maps to an IR node is added as an extra model output, both runtimes are
fed the same random inputs, and the largest relative error (max |a - b| / max(|b|, 1)) is
reported per node. This is how `verikit info` and the importer tests validate an import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .ir import Graph


@dataclass
class CheckReport:
    max_rel_error: float
    per_node: list = field(default_factory=list)  # (onnx tensor, IR node, rel error)
    num_inputs: int = 0
    shape_mismatches: list = field(default_factory=list)  # (onnx tensor, verikit's shape, onnxruntime's shape)

    def problem(self, tol: float = 1e-4) -> Optional[str]:
        """A one-line description of the disagreement, or None when the import matches."""
        if self.shape_mismatches:
            name, ours, theirs = self.shape_mismatches[0]
            more = f" (and {len(self.shape_mismatches) - 1} more)" if len(self.shape_mismatches) > 1 else ""
            return f"tensor {name} has shape {list(theirs)} in onnxruntime but {list(ours)} in verikit's import{more}"
        if self.max_rel_error > tol:
            worst = max(self.per_node, key=lambda r: r[2])
            return f"relative error {self.max_rel_error:.2e} at {worst[0]}"
        return None


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0)) if b.size else 0.0


def compare_with_onnxruntime(model_path: str, graph: Graph, num_inputs: int = 4, seed: int = 0,
                             low: float = 0.0, high: float = 1.0) -> CheckReport:
    """Run both on the same random inputs and compare every mapped tensor: values (relative
    error) and shapes (the ONNX shape of each IR node must be exactly onnxruntime's). The
    inputs are also run through verikit as one batch: every sample must come out as it does
    alone (an import that mixes samples of a batch would not)."""
    import onnx
    import onnxruntime as ort

    if num_inputs < 1:
        raise ValueError("the onnxruntime check needs at least one input")
    model = onnx.load(model_path)
    existing = {o.name for o in model.graph.output}
    onnx_map = graph.meta.get("onnx_map", {})
    onnx_batched = graph.meta.get("onnx_batched", {})
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
    mismatches: dict[str, tuple] = {}
    xs, singles = [], []
    for _ in range(num_inputs):
        x = gen.uniform(low, high, size=onnx_shape).astype(np.float32)
        ref = dict(zip(names, sess.run(names, {inp.name: x})))
        x_ir = torch.from_numpy(x).reshape((1,) + tuple(graph.input_shape)).to(graph.dtype)
        with torch.no_grad():
            vals = graph.forward(x_ir, return_all=True)
        xs.append(x_ir)
        singles.append(vals[graph.output])
        for name in probe + [out_name]:
            node = graph.output if name == out_name else onnx_map[name]
            if node not in vals:
                continue
            r = np.asarray(ref[name], dtype=np.float64)
            mine = vals[node]
            ours = ((1,) if onnx_batched.get(name, True) else ()) + tuple(graph.shapes[node])
            if tuple(mine.shape) != (1,) + tuple(graph.shapes[node]) or tuple(r.shape) != ours:
                mismatches[name] = (ours if tuple(mine.shape)[0] == 1 else tuple(mine.shape), tuple(r.shape))
                worst[name] = float("inf")
                continue
            err = _rel_err(mine.detach().double().numpy().reshape(r.shape), r)
            worst[name] = max(worst.get(name, 0.0), err)
    with torch.no_grad():
        together = graph.forward(torch.cat(xs))
    if together.shape[0] != len(xs):
        mismatches["<batch>"] = (tuple(together.shape), (len(xs),) + tuple(graph.output_shape))
    else:
        worst["<batch>"] = max(_rel_err(together[k:k + 1].double().numpy(), singles[k].double().numpy())
                               for k in range(len(xs)))
    per_node = [(n, graph.output if n in (out_name, "<batch>") else onnx_map[n], e) for n, e in worst.items()]
    return CheckReport(max((e for _, _, e in per_node), default=0.0), per_node, num_inputs,
                       [(n, o, t) for n, (o, t) in mismatches.items()])


def check_import(model_path: str, graph: Graph, num_inputs: int = 2, tol: float = 1e-4) -> CheckReport:
    """The check `verikit info` runs, as a gate: raise `ModelLoadError` when verikit's import of
    the file disagrees with onnxruntime (values beyond `tol` relative, or any shape)."""
    from .errors import ModelLoadError

    try:
        rep = compare_with_onnxruntime(model_path, graph, num_inputs=num_inputs)
    except Exception as e:  # onnxruntime cannot run the file: nothing to trust the import against
        raise ModelLoadError(f"{model_path}: onnxruntime cannot run the model to check the import "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    problem = rep.problem(tol)
    if problem is not None:
        raise ModelLoadError(f"{model_path}: verikit's import disagrees with onnxruntime: {problem}; refusing "
                             f"to verify a network other than the file's")
    return rep


def onnx_feed(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """What the ONNX file itself receives for graph input x: the value of the node named like the
    file's input (with --mean/--std the graph starts with the normalisation in front of it)."""
    name = graph.meta.get("onnx_input", graph.input_name)
    if name == graph.input_name:
        return x
    with torch.no_grad():
        return graph.forward(x, return_all=True)[name]


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
