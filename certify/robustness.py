"""Certify L-inf robustness of dataset samples: classify, then run the chain on the correctly
classified ones, streaming one record per sample."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch

from verikit.bounds import Box
from verikit.errors import ShapeError, VerikitError
from verikit.spec import Spec

from .chain import MISCLASSIFIED, Chain, ChainConfig
from .model import LoadedModel
from .records import RecordWriter


def certify_samples(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
                    eps_list: Sequence[float], config: ChainConfig, writer: RecordWriter,
                    data_range=(0.0, 1.0), batch_size: int = 32,
                    on_done: Optional[Callable[[Optional[dict]], None]] = None) -> None:
    """Certify images[indices] at every eps; records go to `writer` (samples it already holds
    are skipped) one by one as each sample finishes, so an interrupted batch keeps its finished
    samples. `on_done(record)` follows every written record (progress), `on_done(None)` every
    skipped sample."""
    validate_samples(model, images, labels, indices, data_range)
    graph = model.graph
    num_classes = math.prod(graph.output_shape)
    chain = Chain(graph, config)
    dtype, device = graph.dtype, graph.device

    def emit(rec):
        writer.write(rec)
        if on_done:
            on_done(rec)

    for eps in eps_list:
        todo = [i for i in indices if not writer.is_done(eps, i)]
        if on_done:
            for _ in range(len(indices) - len(todo)):
                on_done(None)
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            _certify_batch(chain, model, images[batch].to(device, dtype), labels[batch], batch, eps,
                           num_classes, data_range, emit)


def validate_samples(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int],
                     data_range=(0.0, 1.0)) -> None:
    """Labels must index the model's outputs and data must lie in the data range."""
    num_classes = math.prod(model.graph.output_shape)
    if not len(indices):
        return
    sel_y = labels[list(indices)]
    if int(sel_y.max()) >= num_classes or int(sel_y.min()) < 0:
        raise ShapeError(f"dataset has label {int(sel_y.max())}, the model has only {num_classes} outputs")
    lo, hi = data_range
    sel = images[list(indices)]
    if float(sel.min()) < lo - 1e-6 or float(sel.max()) > hi + 1e-6:
        raise VerikitError(f"dataset values lie in [{float(sel.min()):g}, {float(sel.max()):g}], outside "
                           f"--data-range [{lo:g}, {hi:g}] (is the data normalised? use --mean/--std instead)")


def _certify_batch(chain: Chain, model: LoadedModel, x, y, batch, eps, num_classes, data_range,
                   emit: Callable[[dict], None]) -> None:
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = model.graph.forward(x).reshape(x.shape[0], -1).argmax(dim=1).cpu()
    correct = [k for k in range(len(batch)) if int(pred[k]) == int(y[k])]
    clf_time = (time.perf_counter() - t0) / len(batch)

    def record(k: int) -> dict:
        return {"model": model.path, "index": int(batch[k]), "eps": float(eps), "label": int(y[k]),
                "prediction": int(pred[k])}

    for k in range(len(batch)):
        if k not in correct:  # final already: written before the chain starts on the others
            emit({**record(k), "status": MISCLASSIFIED, "by": None, "margin": None, "note": "", "times": {},
                  "time": round(clf_time, 6)})
    if not correct:
        return

    def finished(j: int, o) -> None:
        k = correct[j]
        rec = {**record(k), "status": o.status, "by": o.by, "margin": o.margin, "note": o.note,
               "times": {s: round(t, 6) for s, t in o.times.items()}, "time": round(clf_time + o.seconds, 6)}
        if o.search:  # a search domain (bab): sub-domains visited and depth, per domain
            rec["search"] = o.search
        emit(rec)

    box = Box.linf_ball(x[correct], eps, data_range)
    spec = Spec.robustness(y[correct], num_classes, dtype=x.dtype)
    chain.run(box, spec, on_outcome=finished)
