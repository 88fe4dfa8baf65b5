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
                    on_done: Optional[Callable[[int], None]] = None) -> None:
    """Certify images[indices] at every eps; records go to `writer` (samples it already holds
    are skipped). `on_done(k)` is called after k more samples finished (progress bar)."""
    validate_samples(model, images, labels, indices, data_range)
    graph = model.graph
    num_classes = math.prod(graph.output_shape)
    chain = Chain(graph, config)
    dtype, device = graph.dtype, graph.device
    for eps in eps_list:
        todo = [i for i in indices if not writer.is_done(eps, i)]
        skipped = len(indices) - len(todo)
        if skipped and on_done:
            on_done(skipped)
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            recs = _certify_batch(chain, model, images[batch].to(device, dtype), labels[batch], batch, eps,
                                  num_classes, data_range)
            writer.write_all(recs)
            if on_done:
                on_done(len(batch))


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


def _certify_batch(chain: Chain, model: LoadedModel, x, y, batch, eps, num_classes, data_range) -> list[dict]:
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = model.graph.forward(x).reshape(x.shape[0], -1).argmax(dim=1).cpu()
    correct = [k for k in range(len(batch)) if int(pred[k]) == int(y[k])]
    clf_time = (time.perf_counter() - t0) / len(batch)
    outcomes = {}
    if correct:
        box = Box.linf_ball(x[correct], eps, data_range)
        spec = Spec.robustness(y[correct], num_classes, dtype=x.dtype)
        outcomes = dict(zip(correct, chain.run(box, spec)))
    recs = []
    for k, idx in enumerate(batch):
        rec = {"model": model.path, "index": int(idx), "eps": float(eps), "label": int(y[k]),
               "prediction": int(pred[k])}
        if k in outcomes:
            o = outcomes[k]
            rec.update(status=o.status, by=o.by, margin=o.margin, note=o.note,
                       times={s: round(t, 6) for s, t in o.times.items()}, time=round(clf_time + o.seconds, 6))
        else:
            rec.update(status=MISCLASSIFIED, by=None, margin=None, note="", times={}, time=round(clf_time, 6))
        recs.append(rec)
    return recs
