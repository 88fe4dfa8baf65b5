"""ONNX export of a trained model, checked against the torch model with onnxruntime and
re-imported with verikit's own ONNX importer (so `verikit certify` can use it directly)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from verikit.errors import VerikitError

EXPORT_TOL = 1e-4  # max |onnxruntime - torch| relative to the logits' scale


def export_onnx(model: nn.Module, input_shape, path: str, check_inputs: torch.Tensor | None = None) -> float:
    """Write `model` (in eval mode, on CPU) to `path`; returns the max abs difference between
    onnxruntime and torch on `check_inputs` (random inputs in [0, 1] if None). Raises
    VerikitError if they disagree beyond EXPORT_TOL or verikit cannot import the file."""
    import copy

    from verikit.onnx_check import evaluate_with_onnxruntime
    from verikit.onnx_import import from_onnx

    m = copy.deepcopy(model).cpu().eval()
    dummy = torch.zeros((1,) + tuple(input_shape))
    torch.onnx.export(m, (dummy,), path, dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    x = check_inputs if check_inputs is not None else torch.rand((8,) + tuple(input_shape),
                                                                 generator=torch.Generator().manual_seed(0))
    x = x.detach().cpu().float()
    with torch.no_grad():
        ref = m(x).numpy()
    got = evaluate_with_onnxruntime(path, x)
    diff = float(np.abs(np.asarray(got).reshape(ref.shape) - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not diff <= EXPORT_TOL * scale:
        raise VerikitError(f"ONNX export of {path} disagrees with the torch model (max difference {diff:.2e})")
    graph = from_onnx(path)
    with torch.no_grad():
        diff_ir = float((graph.forward(x) - torch.from_numpy(ref)).abs().max())
    if not diff_ir <= EXPORT_TOL * scale:
        raise VerikitError(f"verikit's import of {path} disagrees with the torch model (max difference {diff_ir:.2e})")
    return max(diff, diff_ir)
