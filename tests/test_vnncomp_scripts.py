"""The VNN-COMP tool scripts (vnncomp/*.sh) end to end: argument checks, prepare + run on public
instances with the result file checked against `expected`, the counterexample re-checked
with onnxruntime, error / unsupported instances, and a VNN-LIB 2.0 property."""
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED
from verikit.certify.vnnlib import load_vnnlib

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
SCRIPTS = os.path.join(ROOT, "vnncomp")
VNN = os.path.join(SHARED, "vnncomp2021")
ENV = dict(os.environ, VERIKIT_VENV=sys.prefix)
needs_shared = pytest.mark.skipif(not os.path.isdir(VNN), reason="shared VNN-COMP files not present")


def _script(name, *args, timeout=300):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _instances():
    if not os.path.isdir(VNN):
        return []
    with open(os.path.join(VNN, "instances.csv")) as f:
        return list(csv.DictReader(f))


def _counterexample(text):
    pairs = re.findall(r"\((X|Y)_(\d+)\s+(\S+?)\)", text)
    xs = {int(i): float(v) for k, i, v in pairs if k == "X"}
    ys = {int(i): float(v) for k, i, v in pairs if k == "Y"}
    return np.array([xs[i] for i in range(len(xs))]), np.array([ys[i] for i in range(len(ys))])


def check_result(result_file, onnx_path, vnnlib_path, expected):
    """The result file against the agreed answer: unsat for holds; sat for violated, with a
    counterexample inside the property whose outputs onnxruntime reproduces and which violates it."""
    text = open(result_file).read()
    word = text.split("\n", 1)[0].strip()
    assert word == {"holds": "unsat", "violated": "sat"}[expected], text
    if word == "sat":
        from verikit.onnx_check import evaluate_with_onnxruntime
        import torch

        x, y = _counterexample(text)
        prop = load_vnnlib(vnnlib_path)
        import onnx

        shape = [d.dim_value or 1 for d in onnx.load(onnx_path).graph.input[0].type.tensor_type.shape.dim]
        ort_y = evaluate_with_onnxruntime(onnx_path, torch.tensor(x.reshape(shape), dtype=torch.float32))
        assert np.allclose(ort_y.reshape(-1), y, rtol=0, atol=1e-6)
        yt = torch.tensor(ort_y.reshape(1, -1), dtype=torch.float64)
        assert any(case.contains(x) and bool(case.spec.violated_by(yt)[0]) for case in prop.cases)


def _prepare_and_run(tmp_path, bench, onnx_path, vnnlib_path, timeout):
    prep = _script("prepare_instance.sh", "v1", bench, onnx_path, vnnlib_path)
    assert prep.returncode == 0, prep.stderr
    out = tmp_path / "result.txt"
    out.write_text("stale result from an earlier run\n")
    run = _script("run_instance.sh", "v1", bench, onnx_path, vnnlib_path, out, timeout, timeout=float(timeout) + 60)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


# each script call starts Python and torch (~5-10 s on a shared 2-core machine): one instance by default
FAST = [("test", "test_sat.onnx", "test_prop.vnnlib")]
ROWS = [pytest.param(r, marks=() if (r["benchmark"], r["onnx"], r["vnnlib"]) in FAST else pytest.mark.slow,
                     id=f"{r['benchmark']}-{r['onnx']}-{r['vnnlib']}") for r in _instances()]


@needs_shared
@pytest.mark.parametrize("row", ROWS)
def test_public_instances_prepare_run_and_match_expected(tmp_path, row):
    onnx_path = os.path.join(VNN, row["benchmark"], row["onnx"])
    vnnlib_path = os.path.join(VNN, row["benchmark"], row["vnnlib"])
    out = _prepare_and_run(tmp_path, row["benchmark"], onnx_path, vnnlib_path, row["timeout_s"])
    check_result(out, onnx_path, vnnlib_path, row["expected"])


@pytest.mark.slow
@needs_shared
def test_a_vnnlib_2_0_property_runs_like_its_1_0_original(tmp_path):
    from test_vnnlib2 import as_vnnlib2

    onnx_path = os.path.join(VNN, "test", "test_sat.onnx")
    v2 = tmp_path / "prop2.vnnlib"
    v2.write_text(as_vnnlib2(open(os.path.join(VNN, "test", "test_prop.vnnlib")).read()))
    out = _prepare_and_run(tmp_path, "test", onnx_path, v2, 60)
    check_result(out, onnx_path, str(v2), "violated")


@pytest.mark.parametrize("name,nargs", [("install_tool.sh", 1), ("prepare_instance.sh", 4), ("run_instance.sh", 6)])
def test_wrong_version_or_argument_count_exits_1(name, nargs):
    res = _script(name, "v2", *["x"] * (nargs - 1))
    assert res.returncode == 1 and "Expected first argument (version string) 'v1', got 'v2'" in res.stderr
    if nargs > 1:
        res = _script(name, "v1", *["x"] * (nargs - 2))
        assert res.returncode == 1 and "usage:" in res.stderr


def test_run_instance_rejects_a_bad_timeout(tmp_path):
    res = _script("run_instance.sh", "v1", "c", "a.onnx", "b.vnnlib", tmp_path / "r.txt", "soon")
    assert res.returncode == 1 and "TIMEOUT must be a number" in res.stderr and not (tmp_path / "r.txt").exists()


@pytest.mark.slow
@needs_shared
def test_unsupported_instances_fail_prepare_and_run_writes_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    prop = os.path.join(VNN, "test", "test_prop.vnnlib")
    prep = _script("prepare_instance.sh", "v1", "c", junk, prop)
    assert prep.returncode != 0 and prep.stderr.strip().startswith("error:") and "Traceback" not in prep.stderr
    out = tmp_path / "r.txt"
    run = _script("run_instance.sh", "v1", "c", junk, prop, out, 30)
    assert run.returncode == 0 and out.read_text() == "error\n"


@pytest.mark.slow
@needs_shared
def test_a_property_that_does_not_fit_the_network_fails_prepare():
    mnist_prop = os.path.join(VNN, "mnistfc", "prop_0_0.03.vnnlib")  # 784 inputs for a 5-input network
    prep = _script("prepare_instance.sh", "v1", "c", os.path.join(VNN, "test", "test_sat.onnx"), mnist_prop)
    assert prep.returncode != 0 and "784 inputs" in prep.stderr
