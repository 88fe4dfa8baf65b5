"""The milp domain on the public VNN-COMP 2021 instances (shared/vnncomp2021/instances.csv).

Every answer must match `expected`; every "violated" must come with an input inside the
property's box whose onnxruntime output violates the property. Unknown (timeout) is allowed
but never a wrong answer. The test nets and a 1 s time-limit check run by default; ACAS-Xu and
MNIST 256x2 at their VNN-COMP timeouts are marked slow (benchmarks/bench_vnncomp.py runs them).
"""
import csv
import os
import time

import numpy as np
import pytest
import torch

from conftest import SHARED
from verikit.certify.vnnlib import load_vnnlib
from verikit.domains.vnnlib_verify import verify_vnnlib
from verikit.onnx_check import evaluate_with_onnxruntime
from verikit.onnx_import import from_onnx

ROOT = os.path.join(SHARED, "vnncomp2021")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "instances.csv")),
                                reason="shared/vnncomp2021 not present")


def instances(benchmarks):
    if not os.path.exists(os.path.join(ROOT, "instances.csv")):
        return []
    with open(os.path.join(ROOT, "instances.csv")) as f:
        return [r for r in csv.DictReader(f) if r["benchmark"] in benchmarks]


def run(row, time_limit=None, **opts):
    onnx_path = os.path.join(ROOT, row["benchmark"], row["onnx"])
    graph = from_onnx(onnx_path)
    prop = load_vnnlib(os.path.join(ROOT, row["benchmark"], row["vnnlib"]))
    limit = float(row["timeout_s"]) if time_limit is None else time_limit
    ans = verify_vnnlib(graph, prop, time_limit=limit, **opts)
    if ans.answer != "unknown":
        assert ans.answer == row["expected"], f"{row['onnx']} {row['vnnlib']}: wrong answer {ans.answer}"
    if ans.answer == "violated":
        case = prop.cases[ans.case]
        x = ans.counterexample.detach().double().reshape(-1).numpy()
        assert np.all(x >= case.lo) and np.all(x <= case.hi)
        y = evaluate_with_onnxruntime(onnx_path, ans.counterexample.reshape((1,) + tuple(graph.input_shape)), graph)
        assert case.spec.violated_by(torch.from_numpy(y).double())[0]
    return ans


@pytest.mark.parametrize("row", instances({"test"}), ids=lambda r: f"{r['onnx']}-{r['vnnlib']}")
def test_vnncomp_test_nets_answer_as_expected(row):
    ans = run(row, solver="highs")
    assert ans.answer == row["expected"]


def test_one_second_limit_returns_quickly_and_never_wrong():
    # ACAS-Xu 1_1 with property 2 holds but takes minutes to prove
    row = {"benchmark": "acasxu", "onnx": "ACASXU_run2a_1_1_batch_2000.onnx", "vnnlib": "prop_2.vnnlib",
           "timeout_s": "1", "expected": "holds"}
    run(row, time_limit=0.01, pre=("crown",))  # warm-up: lazy imports (torch._dynamo via crown) are not solving time
    t = time.perf_counter()
    ans = run(row, pre=("crown",))
    assert time.perf_counter() - t < 5
    assert ans.answer == "unknown"


@pytest.mark.slow
@pytest.mark.parametrize("row", instances({"acasxu", "mnistfc"}), ids=lambda r: f"{r['onnx']}-{r['vnnlib']}")
def test_vnncomp_instances_answer_as_expected(row):
    run(row, pre=("crown",), tighten="lp", tighten_time=30.0)
