"""Load the network to certify: an ONNX path or the name of a shipped model, optionally with
input normalisation prepended as an exact affine node (so bounds stay exact)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from verikit.errors import ModelLoadError, ShapeError, VerikitError
from verikit.ir import ElementwiseAffine, Graph, Node

RAW_INPUT = "__verikit_raw_input__"


@dataclass
class LoadedModel:
    graph: Graph  # takes inputs in data space (normalisation, if any, is its first node)
    path: str  # the ONNX file (onnxruntime re-checks run on it)
    onnx_input: Optional[Callable[[Tensor], Tensor]] = None  # data space -> the file's input space


def resolve_model_path(model: str) -> str:
    """A path, or the name of a model shipped with verikit (`verikit models`)."""
    from verikit.models.zoo import shipped_model_path

    if os.path.exists(model):
        return model
    found = shipped_model_path(model)
    if found:
        return found
    raise ModelLoadError(f"model file not found: {model} (neither a file nor a shipped model name; see `verikit models`)")


def load_model(model: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
               device: str = "cpu", check: bool = True) -> LoadedModel:
    """Import the model and (with `check`) run the import check of `verikit info`: verikit's
    graph and onnxruntime must agree on every mapped tensor's values and shapes for two random
    inputs, else `ModelLoadError` (a proof about a mis-imported network proves nothing)."""
    from verikit.onnx_check import check_import
    from verikit.onnx_import import from_onnx

    path = resolve_model_path(model)
    graph = from_onnx(path)
    graph.source = path
    if check:
        check_import(path, graph, num_inputs=2)
    onnx_input = None
    if mean is not None or std is not None:
        graph, onnx_input = with_normalisation(graph, mean or [0.0], std or [1.0])
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VerikitError(f"device {device!r} requested but CUDA is not available")
        try:
            graph = graph.to(torch.device(device))
        except (RuntimeError, ValueError) as e:
            raise VerikitError(f"bad --device {device!r}: {e}") from None
    return LoadedModel(graph, path, onnx_input)


def _per_channel(values: Sequence[float], input_shape: tuple, what: str) -> Tensor:
    v = torch.tensor([float(a) for a in values], dtype=torch.float32)
    if v.numel() == 1:
        return v
    if len(input_shape) >= 1 and input_shape[0] == v.numel():
        return v.reshape((-1,) + (1,) * (len(input_shape) - 1))
    raise ShapeError(f"--{what} has {v.numel()} values, but the model input {tuple(input_shape)} "
                     f"has {input_shape[0] if input_shape else 1} channels")


def with_normalisation(graph: Graph, mean: Sequence[float], std: Sequence[float]):
    """A graph computing model((x - mean) / std): an ElementwiseAffine node named like the old
    input takes a new raw input, so every existing node now reads the normalised value."""
    m = _per_channel(mean, graph.input_shape, "mean").to(graph.dtype)
    s = _per_channel(std, graph.input_shape, "std").to(graph.dtype)
    if bool((s <= 0).any()):
        raise VerikitError("--std values must be positive")
    norm = Node(graph.input_name, ElementwiseAffine(scale=1.0 / s, shift=-m / s), (RAW_INPUT,))
    shapes = {**graph.shapes, RAW_INPUT: tuple(graph.input_shape)}
    wrapped = Graph(RAW_INPUT, graph.input_shape, [norm] + list(graph.nodes), graph.output, shapes,
                    graph.source, dict(graph.meta))
    return wrapped, lambda x: norm.op.forward(x.to(m.device, m.dtype))
