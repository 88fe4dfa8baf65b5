"""VNN-LIB properties on ONNX networks: decide holds / violated / unknown, write VNN-COMP
result files, and run a whole benchmark from an instances CSV."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from verikit.bounds import Box
from verikit.errors import ShapeError, VerikitError

from .chain import FALSIFIED, VERIFIED, Chain, ChainConfig
from .model import LoadedModel
from .vnnlib import VnnlibProperty
from .vnnlib2 import check_binding

HOLDS, VIOLATED, UNKNOWN = "holds", "violated", "unknown"


@dataclass
class VnnResult:
    answer: str
    seconds: float
    by: list = field(default_factory=list)  # the stage that settled each case
    x: Optional[np.ndarray] = None  # counterexample (flat), when violated
    y: Optional[np.ndarray] = None  # model output there (onnxruntime)
    note: str = ""


def check_property(model: LoadedModel, prop: VnnlibProperty, config: ChainConfig) -> VnnResult:
    """holds iff every case is verified; violated as soon as one case has a re-checked
    counterexample; unknown otherwise (including when the timeout runs out)."""
    graph = model.graph
    check_fits(prop, model)
    t0 = time.perf_counter()
    answer, by, notes = HOLDS, [], []
    dtype, device = graph.dtype, graph.device
    for case in prop.cases:
        left = None if config.timeout is None else config.timeout - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            answer = UNKNOWN
            notes.append("timeout")
            break
        chain = Chain(graph, dataclasses.replace(config, timeout=left))
        shape = (1,) + tuple(graph.input_shape)
        box = Box(_round_out(case.lo, dtype, -1).reshape(shape), _round_out(case.hi, dtype, 1).reshape(shape)).to(device)
        (o,) = chain.run(box, case.spec.expand(1))
        by.append(o.by)
        if o.status == FALSIFIED:
            x = _into_case(case, o.counterexample, dtype)
            y = _confirm(model, case, x) if x is not None else None
            if y is not None:
                return VnnResult(VIOLATED, time.perf_counter() - t0, by, x, y)
            answer = UNKNOWN
            notes.append("counterexample does not re-check inside the exact property")
            continue
        if o.status != VERIFIED:
            answer = UNKNOWN
            if o.note:
                notes.append(o.note)
    return VnnResult(answer, time.perf_counter() - t0, by, note="; ".join(sorted(set(notes))))


def check_fits(prop: VnnlibProperty, model: LoadedModel) -> None:
    """The property speaks about this model: its declaration (2.0) and its element counts."""
    graph = model.graph
    check_binding(prop, model.path, tuple(graph.input_shape), tuple(graph.output_shape))
    n_in, n_out = math.prod(graph.input_shape), math.prod(graph.output_shape)
    if prop.num_inputs != n_in or prop.num_outputs != n_out:
        raise ShapeError(f"{prop.path}: property has {prop.num_inputs} inputs / {prop.num_outputs} outputs, "
                         f"the model has {n_in} / {n_out}")


def _round_out(values: np.ndarray, dtype, direction: int) -> torch.Tensor:
    """The float64 bound as `dtype`, rounded outwards so the box still contains the exact one."""
    t = torch.tensor(values, dtype=dtype)
    exact = torch.tensor(values, dtype=torch.float64)
    inward = (t.double() > exact) if direction < 0 else (t.double() < exact)
    away = torch.full_like(t, -math.inf if direction < 0 else math.inf)
    return torch.where(inward, torch.nextafter(t, away), t)


def _into_case(case, cex, dtype) -> Optional[np.ndarray]:
    """The counterexample moved (by rounding at most) to a point of `dtype` that satisfies the
    case's input constraints exactly as written (strict ones strictly); None if there is none."""
    lo = _round_out(case.inner_lo, dtype, 1)  # inward: the smallest representable >= lo_in
    hi = _round_out(case.inner_hi, dtype, -1)
    if bool((lo > hi).any()):
        return None
    x = torch.minimum(torch.maximum(cex.detach().cpu().to(dtype).reshape(-1), lo), hi)
    x = x.double().numpy()
    return x if case.contains(x) else None


def _confirm(model: LoadedModel, case, x: np.ndarray):
    """onnxruntime's output at x if verikit's forward pass and onnxruntime both violate the
    exact property there (strict comparisons strictly), else None."""
    from verikit.onnx_check import evaluate_with_onnxruntime

    graph = model.graph
    xt = torch.tensor(x, dtype=torch.float64).reshape((1,) + tuple(graph.input_shape))
    with torch.no_grad():
        ours = graph.forward(xt.to(device=graph.device, dtype=graph.dtype)).reshape(1, -1).double().cpu()
    if not bool(case.spec.violated_by(ours)[0]):
        return None
    feed = model.onnx_input(xt) if model.onnx_input is not None else xt
    y = evaluate_with_onnxruntime(model.path, feed)
    violated = case.spec.violated_by(torch.from_numpy(y.astype(np.float64)))
    return y[0] if bool(violated[0]) else None


def result_text(res: VnnResult, sat_unsat: bool = False) -> str:
    """VNN-COMP result file: first line the answer, then for violated the counterexample as
    ((X_0 v) (X_1 v) ... (Y_0 v) ...). `sat_unsat` writes sat/unsat instead of violated/holds."""
    word = {HOLDS: "unsat", VIOLATED: "sat"}.get(res.answer, res.answer) if sat_unsat else res.answer
    lines = [word]
    if res.answer == VIOLATED and res.x is not None:
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(res.x)]
        pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(res.y if res.y is not None else [])]
        lines.append("(" + "\n ".join(pairs) + ")")
    return "\n".join(lines) + "\n"


def read_instances(path: str) -> list[dict]:
    """Rows of an instances CSV: either with a header (benchmark,onnx,vnnlib,timeout_s[,expected])
    or the VNN-COMP form without one (onnx,vnnlib,timeout). Paths are made absolute: relative to
    the CSV's folder, or to its `benchmark` sub-folder when that is where the file is."""
    if not os.path.exists(path):
        raise VerikitError(f"instances file not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise VerikitError(f"{path}: no instances")
    header = [c.strip().lower() for c in rows[0]]
    if "onnx" in header and "vnnlib" in header:
        cols = {name: header.index(name) for name in header}
        body = rows[1:]
    else:
        cols = {"onnx": 0, "vnnlib": 1, "timeout": 2}
        body = rows
    tcol = next((cols[c] for c in ("timeout_s", "timeout") if c in cols), None)
    out = []
    for n, r in enumerate(body, 2 if body is not rows else 1):
        try:
            get = lambda c: r[cols[c]].strip() if c in cols and cols[c] < len(r) else ""
            bench = get("benchmark")
            timeout = float(r[tcol]) if tcol is not None and tcol < len(r) and r[tcol].strip() else None
        except ValueError:
            raise VerikitError(f"{path}:{n}: bad timeout {r[tcol]!r}") from None
        inst = {"benchmark": bench, "onnx": get("onnx"), "vnnlib": get("vnnlib"), "timeout": timeout,
                "expected": get("expected")}
        for key in ("onnx", "vnnlib"):
            inst[key + "_path"] = _locate(base, bench, inst[key], path, n)
        out.append(inst)
    return out


def _locate(base: str, bench: str, rel: str, csv_path: str, line: int) -> str:
    if not rel:
        raise VerikitError(f"{csv_path}:{line}: missing onnx/vnnlib column")
    for cand in ([os.path.join(base, bench, rel)] if bench else []) + [os.path.join(base, rel), rel]:
        if os.path.exists(cand):
            return cand
    raise VerikitError(f"{csv_path}:{line}: file not found: {rel}")


def check_instance(onnx_path: str, vnnlib_path: str) -> int:
    """What VNN-COMP's prepare_instance.sh asks: can verikit take this instance (the model imports
    and matches onnxruntime, the property parses and fits the model)? No analysis. 0 if yes;
    else one line on stderr and 2 (a nonzero exit tells the harness to skip the instance)."""
    import sys

    from .model import load_model
    from .vnnlib import load_vnnlib

    try:
        loaded = load_model(onnx_path)
        prop = load_vnnlib(vnnlib_path)
        check_fits(prop, loaded)
    except VerikitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ok: {onnx_path} and {vnnlib_path} ({len(prop.cases)} input box(es))")
    return 0
