"""What a Ray worker runs: plain functions that `certify/parallel.py` submits as Ray tasks.

They only compute and return results; the driver writes every record. A worker process
loads each model once and keeps it (`_MODELS`) for all the tasks it runs, and sets its torch
thread count before working, so N workers on N cores do not oversubscribe them. Nothing here
imports Ray: the functions run unchanged in a test or a debugger.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

_MODELS: dict = {}  # (path, mean, std, device) -> LoadedModel, per worker process
_VNN_MODELS: dict = {}  # the `models` cache of decide_instance, per worker process
_ALLOCATOR_SET = False  # the allocator setting is taken once per worker process


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model the driver loaded (a path every worker can read)."""

    path: str  # absolute
    record_name: str  # the `model` field of the records: what the serial run writes
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    device: str = "cpu"


def _threads(n: int) -> None:
    """A task's set-up in its worker: the torch thread count, and the allocator setting of the
    command that started the workers (verikit/allocator.py: VERIKIT_KEEP_FREED_MEMORY=1)."""
    global _ALLOCATOR_SET
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if not _ALLOCATOR_SET:
        from verikit.allocator import keep_freed_memory_from_env

        keep_freed_memory_from_env(default=False)
        _ALLOCATOR_SET = True


def _device(device: str) -> str:
    # a GPU task sees only the GPUs Ray gave it (CUDA_VISIBLE_DEVICES): "cuda" is the first of them
    return "cuda" if device.startswith("cuda") else device


def loaded_model(spec: ModelSpec):
    from .model import load_model

    key = (spec.path, spec.mean, spec.std, spec.device)
    if key not in _MODELS:
        _MODELS[key] = load_model(spec.path, list(spec.mean) if spec.mean else None,
                                  list(spec.std) if spec.std else None, _device(spec.device))
    return _MODELS[key]


def certify_batch(spec: ModelSpec, cfg, eps: float, batch: list, x: torch.Tensor, y: torch.Tensor,
                  data_range: tuple, threads: int) -> list:
    """The records of one batch of dataset samples at one eps, in the order they finished."""
    from .chain import Chain
    from .robustness import _certify_batch

    _threads(threads)
    model = loaded_model(spec)
    graph = model.graph
    cfg = dataclasses.replace(cfg, onnx_path=model.path, onnx_input=model.onnx_input)
    records = []
    _certify_batch(Chain(graph, cfg), model, x.to(graph.device, graph.dtype), y, batch, eps,
                   math.prod(graph.output_shape), data_range, records.append)
    for r in records:
        r["model"] = spec.record_name
    return records


def vnncomp_instance(inst: dict, settings, threads: int) -> tuple:
    """(results row, result text) of one VNN-COMP instance; the driver writes both."""
    from .benchmark import decide_instance

    _threads(threads)
    settings = dataclasses.replace(settings, device=_device(settings.device), result_dir=None)
    return decide_instance(inst, settings, _VNN_MODELS)


def vnnlib_case(spec: ModelSpec, prop, cfg, threads: int):
    """The VnnResult of a property with one case (one input box of a --vnnlib property)."""
    from .vnn import check_property

    _threads(threads)
    model = loaded_model(spec)
    return check_property(model, prop, dataclasses.replace(cfg, onnx_path=model.path, onnx_input=model.onnx_input))
