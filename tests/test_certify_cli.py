"""`verikit certify` end to end: CliRunner and the installed console script."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from certify_tiny_model import tiny_mnist_model
from cli_run import console_script as _verikit, invoke
from verikit.certify.records import read_records


@pytest.fixture(scope="module")
def model():
    return tiny_mnist_model()


def _run(*args):
    # one torch thread: these networks are tiny, and the test machine is shared
    args = [str(a) for a in args]
    if args and args[0] in ("certify", "vnncomp") and "--threads" not in args:
        args += ["--threads", "1"]
    return invoke(*args)


def _recount(records, stages):
    """The summary recomputed independently from the raw records."""
    out = {}
    for r in records:
        e = out.setdefault(r["eps"], {"samples": 0, "statuses": {}, "by": {}})
        e["samples"] += 1
        e["statuses"][r["status"]] = e["statuses"].get(r["status"], 0) + 1
        if r["by"]:
            e["by"][(r["status"], r["by"])] = e["by"].get((r["status"], r["by"]), 0) + 1
    return out


def test_summary_counts_agree_with_records(model, tmp_path):
    out = tmp_path / "r.jsonl"
    res = _run("certify", model, "--eps", "0.02,8/255", "--num-samples", 12, "--domains", "box,deeppoly",
               "-o", out, "--json", "--batch-size", 8)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    recs = read_records(str(out))
    assert len(recs) == 24 and {r["index"] for r in recs} == set(range(12))
    counts = _recount(recs, ["attack", "box", "deeppoly"])
    assert [s["eps"] for s in summary["results"]] == [0.02, 8 / 255]
    for s in summary["results"]:
        c = counts[s["eps"]]
        assert s["samples"] == c["samples"] == 12
        for st in ("verified", "falsified", "unknown", "misclassified"):
            assert s[st] == c["statuses"].get(st, 0)
        assert s["certified_accuracy"] == pytest.approx(c["statuses"].get("verified", 0) / 12)
        cum = 0
        for row in s["stages"]:
            assert row["verified"] == c["by"].get(("verified", row["stage"]), 0)
            assert row["falsified"] == c["by"].get(("falsified", row["stage"]), 0)
            cum += row["verified"]
            assert row["certified_accuracy"] == pytest.approx(cum / 12)
    # something happened in every category, so the comparisons above are not vacuous
    first = counts[0.02]["statuses"]
    assert first.get("verified", 0) > 0 and sum(counts[8 / 255]["statuses"].get(k, 0) for k in ("falsified", "unknown")) > 0
    assert all(r["status"] != "verified" or r["margin"] > 0 for r in recs)
    assert all(r["status"] != "misclassified" or r["label"] != r["prediction"] for r in recs)


def test_text_summary_sweep_table_and_plot(model, tmp_path):
    png = tmp_path / "sweep.png"
    res = _run("certify", model, "--eps", "1/255,0.02", "--num-samples", 6, "--domains", "box", "--plot", png,
               "--attack-steps", 5)
    assert res.exit_code == 0, res.output
    assert "eps = 1/255" in res.stdout and "certified accuracy versus eps" in res.stdout
    assert "certifying" not in res.stdout  # the progress bar goes to stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_keeps_finished_records(model, tmp_path, monkeypatch):
    import verikit.certify.robustness as rob

    real = rob.certify_samples

    def interrupted(model_, images, labels, indices, *a, **k):
        real(model_, images, labels, indices[:3], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(rob, "certify_samples", interrupted)
    out = tmp_path / "r.jsonl"
    res = _run("certify", model, "--eps", "0.01", "--num-samples", 10, "--domains", "box", "-o", out, "--json")
    assert res.exit_code == 130
    assert len(read_records(str(out))) == 3
    assert json.loads(res.stdout)["interrupted"] is True and "--resume" in res.stderr


def _stable(summary):
    """The summary without timings (which differ run to run)."""
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    return [{**drop(s), "stages": [drop(r) for r in s["stages"]]} for s in summary["results"]]


@pytest.mark.skipif(_verikit() is None, reason="verikit console script not installed")
def test_resume_after_killed_run_gives_the_same_summary(model, tmp_path):
    args = ["certify", model, "--eps", "0.03", "--num-samples", "16", "--domains", "box,deeppoly",
            "--batch-size", "1", "--json", "--threads", "1"]
    full = _run(*args, "-o", tmp_path / "full.jsonl")  # the uninterrupted reference, in-process
    assert full.exit_code == 0, full.output
    part = tmp_path / "part.jsonl"
    proc = subprocess.Popen([_verikit(), *args, "-o", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or part.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_records(str(part)))
    assert 3 <= done < 16  # really interrupted part-way
    resumed = subprocess.run([_verikit(), *args, "-o", str(part), "--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _stable(json.loads(resumed.stdout)) == _stable(json.loads(full.stdout))
    assert json.loads(resumed.stdout)["results"][0]["samples"] == 16
    recs = read_records(str(part))
    assert sorted(r["index"] for r in recs) == list(range(16))  # nothing repeated, nothing missing


def test_vnnlib_violated_writes_a_checked_counterexample(tmp_path, test_data):
    result = tmp_path / "out.txt"
    res = _run("certify", os.path.join(test_data, "test_sat.onnx"), "--vnnlib",
               os.path.join(test_data, "test_prop.vnnlib"), "--result-file", result, "--domains", "box")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "violated"
    lines = result.read_text().splitlines()
    assert lines[0] == "violated"
    body = " ".join(lines[1:]).replace("(", " ").replace(")", " ").split()
    vals = dict(zip(body[::2], map(float, body[1::2])))
    xs = np.array([vals[f"X_{i}"] for i in range(sum(k.startswith("X_") for k in vals))])
    ys = np.array([vals[f"Y_{j}"] for j in range(sum(k.startswith("Y_") for k in vals))])
    from verikit.certify.vnnlib import load_vnnlib
    from verikit.onnx_check import evaluate_with_onnxruntime
    import torch

    prop = load_vnnlib(os.path.join(test_data, "test_prop.vnnlib"))
    case = prop.cases[0]
    assert np.all(xs >= case.lo) and np.all(xs <= case.hi)
    y_ort = evaluate_with_onnxruntime(os.path.join(test_data, "test_sat.onnx"), torch.tensor(xs)[None])[0]
    assert np.allclose(ys, y_ort, atol=1e-6)
    assert bool(case.spec.violated_by(torch.tensor(y_ort, dtype=torch.float64)[None])[0])
    sat = _run("certify", os.path.join(test_data, "test_unsat.onnx"), "--vnnlib",
               os.path.join(test_data, "test_prop.vnnlib"), "--sat-unsat", "--result-file", result)
    assert sat.exit_code == 0 and sat.stdout.strip() == "unsat" and result.read_text() == "unsat\n"


def _bad(args, match):
    res = _run(*args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1 and match in res.stderr, res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize("eps,match", [("-1", ">= 0"), ("abc", "abc"), ("1/0", "division by zero"),
                                       ("", "empty")])
def test_bad_eps(model, eps, match):
    _bad(["certify", model, "--eps", eps], match)


def test_unknown_domain_lists_the_available_ones(model):
    res = _run("certify", model, "--eps", "0.1", "--domains", "box,octagon")
    assert res.exit_code == 2 and "octagon" in res.stderr and "available: " in res.stderr and "box" in res.stderr


def test_other_bad_inputs(model, tmp_path):
    npz = tmp_path / "cifar_like.npz"
    np.savez(npz, x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, np.int64))
    _bad(["certify", model, "--eps", "0.1", "--dataset", npz], "the model expects")
    _bad(["certify", model, "--eps", "0.1", "--dataset", tmp_path / "none.npz"], "not found")
    _bad(["certify", tmp_path / "missing.onnx", "--eps", "0.1"], "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    _bad(["certify", junk, "--eps", "0.1"], "junk.onnx")
    _bad(["certify", model], "--eps")
    _bad(["certify", model, "--eps", "0.1", "--data-range", "1,0"], "data-range")
    _bad(["certify", model, "--eps", "0.1", "--resume"], "--output")
    _bad(["certify", model, "--eps", "0.1", "--mean", "0.1,0.2", "--std", "1,1"], "channels")
    raw = tmp_path / "raw.npz"
    np.savez(raw, x=np.full((2, 1, 28, 28), 200, np.float32), y=np.zeros(2, np.int64))
    _bad(["certify", model, "--eps", "0.1", "--dataset", raw], "--data-range")
    _bad(["certify", model, "--vnnlib", tmp_path / "none.vnnlib"], "not found")


def test_property_model_mismatch_is_bad_input(test_data):
    from conftest import SHARED

    vnn = os.path.join(SHARED, "vnncomp2021", "mnistfc", "prop_0_0.03.vnnlib")
    if not os.path.exists(vnn):
        pytest.skip("shared files missing")
    _bad(["certify", os.path.join(test_data, "test_nano.onnx"), "--vnnlib", vnn], "784 inputs")


def test_third_party_domain_is_usable_from_the_cli(model, tmp_path):
    import torch

    from verikit.domains import Domain, DomainResult, register_domain
    from verikit.domains.base import unregister_domain

    @register_domain
    class Plugin(Domain):
        name, description = "plugin", "proves samples whose box-domain margin is positive (delegates)"

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            from verikit.domains import get_domain

            return get_domain("box").bound(graph, inputs, spec, store, ctx)

    try:
        out = tmp_path / "r.jsonl"
        res = _run("certify", model, "--eps", "0.001", "--num-samples", 5, "--domains", "plugin", "--no-attack",
                   "-o", out)
    finally:
        unregister_domain("plugin")
    assert res.exit_code == 0, res.output
    assert "plugin" in res.stdout
    recs = read_records(str(out))
    assert any(r["by"] == "plugin" for r in recs)
    assert all(r["by"] in ("plugin", None) for r in recs)
