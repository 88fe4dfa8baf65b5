"""The public VNN-COMP 2021 instances: verikit's answers must match the agreed `expected`
answer wherever verikit answers (unknown is allowed, a wrong answer never)."""
import csv
import os
import shutil

import pytest

from cli_run import invoke
from conftest import SHARED

VNN = os.path.join(SHARED, "vnncomp2021")
pytestmark = pytest.mark.skipif(not os.path.isdir(VNN), reason="shared VNN-COMP instances not present")
FAST_MNIST = ["prop_2_0.03.vnnlib", "prop_6_0.03.vnnlib", "prop_7_0.03.vnnlib"]


def _run(*args):
    return invoke(*args, "--threads", "1")


def _results(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check(rows, min_answered):
    answered = [r for r in rows if r["result"] != "unknown"]
    assert len(answered) >= min_answered
    for r in answered:
        assert r["result"] == r["expected"], r
        assert r["agrees"] == "True"


def test_test_benchmark_is_answered_correctly(tmp_path):
    out = tmp_path / "results.csv"
    res = _run("vnncomp", os.path.join(VNN, "instances.csv"), "--benchmark", "test", "-o", out,
               "--domains", "box,crown", "--result-dir", tmp_path / "res")
    assert res.exit_code == 0, res.output
    rows = _results(out)
    assert len(rows) == 5
    _check(rows, min_answered=5)
    files = sorted(os.listdir(tmp_path / "res"))
    assert len(files) == 5
    sat = (tmp_path / "res" / "test_test_sat_test_prop.txt").read_text()
    assert sat.startswith("violated\n((X_0 ") and "(Y_0 " in sat


def test_a_few_mnistfc_instances_with_box_and_crown(tmp_path):
    csv_path = tmp_path / "instances.csv"
    with open(os.path.join(VNN, "instances.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == "mnistfc" and r["vnnlib"] in FAST_MNIST]
    # the VNN-COMP form: no header, paths relative to the CSV's folder
    os.symlink(os.path.join(VNN, "mnistfc"), tmp_path / "mnistfc")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        for r in rows:
            w.writerow([f"mnistfc/{r['onnx']}", f"mnistfc/{r['vnnlib']}", r["timeout_s"]])
    out = tmp_path / "results.csv"
    res = _run("vnncomp", csv_path, "-o", out, "--domains", "box,crown")
    assert res.exit_code == 0, res.output
    got = {os.path.basename(r["vnnlib"]): r["result"] for r in _results(out)}
    expected = {r["vnnlib"]: r["expected"] for r in rows}
    assert set(got) == set(FAST_MNIST)
    answered = {k: v for k, v in got.items() if v != "unknown"}
    assert len(answered) >= 2 and all(v == expected[k] for k, v in answered.items())
    assert got["prop_7_0.03.vnnlib"] == "violated"  # found by the attack, confirmed by onnxruntime


def test_wrong_answers_are_flagged_with_exit_code_1(tmp_path):
    csv_path = tmp_path / "instances.csv"
    shutil.copy(os.path.join(VNN, "test", "test_sat.onnx"), tmp_path)
    shutil.copy(os.path.join(VNN, "test", "test_prop.vnnlib"), tmp_path)
    csv_path.write_text("benchmark,onnx,vnnlib,timeout_s,expected\nx,test_sat.onnx,test_prop.vnnlib,60,holds\n")
    res = _run("vnncomp", csv_path, "-o", tmp_path / "r.csv", "--domains", "box")
    assert res.exit_code == 1 and "WRONG ANSWER" in res.stdout


def test_bad_instances_input(tmp_path):
    res = _run("vnncomp", tmp_path / "none.csv")
    assert res.exit_code == 2 and "not found" in res.stderr
    res = _run("vnncomp", os.path.join(VNN, "instances.csv"), "--benchmark", "imagenet")
    assert res.exit_code == 2 and "imagenet" in res.stderr and "acasxu" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("missing.onnx,missing.vnnlib,10\n")
    res = _run("vnncomp", bad)
    assert res.exit_code == 2 and "missing.onnx" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["mnistfc", "acasxu"])
def test_full_benchmarks_with_every_domain(tmp_path, bench):
    from verikit.domains import available_domains

    chain = ",".join(d for d in ("box", "deeppoly", "crown", "milp") if d in available_domains())
    out = tmp_path / "results.csv"
    res = _run("vnncomp", os.path.join(VNN, "instances.csv"), "--benchmark", bench, "-o", out, "--domains", chain,
               "--max-timeout", "120")
    assert res.exit_code == 0, res.output
    rows = _results(out)
    assert not [r for r in rows if r["result"] == "error"], [r["note"] for r in rows if r["result"] == "error"][:1]
    _check(rows, min_answered=1)


def test_input_boxes_are_rounded_outwards_to_float32():
    import numpy as np
    import torch

    from verikit.certify.vnn import _round_out

    vals = np.array([0.1, 1 / 3, -0.7, 0.5, 1e-9])
    lo, hi = _round_out(vals, torch.float32, -1), _round_out(vals, torch.float32, 1)
    assert lo.dtype == torch.float32 and bool((lo.double() <= torch.tensor(vals)).all())
    assert bool((hi.double() >= torch.tensor(vals)).all())
    ulp = torch.from_numpy(np.spacing(np.abs(vals).astype(np.float32)).astype(np.float64))
    assert bool((hi.double() - lo.double() <= 2 * ulp).all())  # at most an ulp each way
    assert float(lo[3]) == float(hi[3]) == 0.5  # exactly representable: unchanged


def test_an_instance_a_domain_cannot_handle_is_an_error_row_not_a_crash(tmp_path):
    import torch

    from verikit.domains import Domain, register_domain
    from verikit.domains.base import unregister_domain

    @register_domain
    class Broken(Domain):
        name, description = "brokenvnn", "always fails"

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            raise RuntimeError("no rule for this op")

    try:
        out = tmp_path / "r.csv"
        res = _run("vnncomp", os.path.join(VNN, "instances.csv"), "--benchmark", "test", "-o", out,
                   "--domains", "box,brokenvnn", "--no-attack")
    finally:
        unregister_domain("brokenvnn")
    assert res.exit_code == 0, res.output
    rows = _results(out)
    assert len(rows) == 5
    for r in rows:  # box alone settles some; the rest reach the broken domain and become errors
        assert r["result"] in ("holds", "error")
        assert r["result"] != "error" or "brokenvnn" in r["note"]
    assert any(r["result"] == "error" for r in rows) and "error on" in res.stderr


def test_acasxu_property_2_violations_are_found_by_the_parallel_restarts(tmp_path):
    out = tmp_path / "r.csv"
    csv_path = tmp_path / "acas.csv"
    with open(os.path.join(VNN, "instances.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == "acasxu" and r["vnnlib"] == "prop_2.vnnlib"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.symlink(os.path.join(VNN, "acasxu"), tmp_path / "acasxu")
    res = _run("vnncomp", csv_path, "-o", out, "--domains", "box")
    assert res.exit_code == 0, res.output
    got = _results(out)
    assert sum(r["expected"] == "violated" for r in got) == 2
    for r in got:  # both known violations found (and re-checked), the safe instance never called violated
        assert r["result"] == ("violated" if r["expected"] == "violated" else "unknown")
