"""Ctrl-C, SIGTERM and SIGKILL with real signals: honoured within seconds even inside a MILP
solve (HiGHS and Gurobi), exit codes 130 / 143, and every finished result kept, for `certify`,
`vnncomp` and `train`, in-process (CliRunner) and through the installed console script.

The slow MILP comes from tests/data/hard_milp_20x40x3.onnx (see tests/hard_milp_model.py):
both solvers need minutes for its robustness query on the whole input cube.
"""
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli_run import console_script as _verikit
from conftest import TEST_DATA
from verikit.certify.records import read_records
from verikit.cli import main
from verikit.interrupts import Terminated, sigterm_raises

HARD = os.path.join(TEST_DATA, "hard_milp_20x40x3.onnx")
TINY = os.path.join(TEST_DATA, "tiny_mnist_mlp.onnx")
REACT = 3.0  # seconds allowed from the signal to the end of the command (a busy 2-core machine)


needs_script = pytest.mark.skipif(_verikit() is None, reason="verikit console script not installed")


def _gurobi():
    try:
        import gurobipy  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture
def hard_data(tmp_path):
    """Sample 0 is misclassified (finished before any bound), sample 1 needs a long MILP."""
    path = tmp_path / "hard.npz"
    np.savez(path, x=np.full((2, 20), 0.5, np.float32), y=np.array([1, 0], np.int64))
    return str(path)


def _hard_args(data, solver, out):
    return ["certify", HARD, "--dataset", str(data), "--eps", "0.5", "--domains", "box,milp", "--no-attack",
            "--milp-solver", solver, "--timeout", "120", "--threads", "1", "-o", str(out), "--json"]


def _signal_later(delay, sig, when=None):
    """Send `sig` to this process after `delay` seconds (after `when()` first holds, if given)."""
    sent = {}

    def fire():
        deadline = time.time() + 120
        while when is not None and not when() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        sent["t"] = time.time()
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return sent, t


# ------------------------------------------------------------------ the solver layer
@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=pytest.mark.skipif(not _gurobi(),
                                                                                                reason="no gurobipy"))])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_running_milp_stops_on_the_signal(solver, sig):
    import verikit
    from verikit.domains import get_domain

    graph = verikit.from_onnx(HARD)
    box = verikit.Box.linf_ball(torch.full((1, 20), 0.5), 0.5)
    spec = verikit.Spec.robustness(torch.tensor([0]), 2)
    milp = get_domain("milp", solver=solver, time_limit=30, bounds_from="none")
    sent, thread = _signal_later(1.0, sig)
    with sigterm_raises():
        with pytest.raises(KeyboardInterrupt) as err:
            milp.bound(graph, box, spec)
    thread.join()
    assert time.time() - sent["t"] < REACT  # before the fix: the solve ran to its 30 s limit
    assert isinstance(err.value, Terminated) == (sig == signal.SIGTERM)


# ------------------------------------------------------------------ certify
@pytest.mark.parametrize("solver", ["highs", pytest.param("gurobi", marks=pytest.mark.skipif(not _gurobi(),
                                                                                                reason="no gurobipy"))])
def test_ctrl_c_during_milp_in_process_keeps_the_finished_sample(solver, hard_data, tmp_path):
    out = tmp_path / "r.jsonl"
    sent, thread = _signal_later(1.5, signal.SIGINT, when=lambda: out.exists() and out.read_text().count("\n") >= 1)
    res = CliRunner().invoke(main, _hard_args(hard_data, solver, out))
    thread.join()
    assert res.exit_code == 130, res.output
    assert time.time() - sent["t"] < REACT
    recs = read_records(str(out))  # written as soon as it was final, not at the end of the batch
    assert [(r["index"], r["status"]) for r in recs] == [(0, "misclassified")]
    summary = json.loads(res.stdout)  # nothing of the solver on stdout
    assert summary["interrupted"] is True and summary["results"][0]["samples"] == 1
    assert "--resume" in res.stderr and "interrupted after 1 of 2 samples" in res.stderr


def _popen(args, **kw):
    return subprocess.Popen([_verikit(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(cond, proc, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


@needs_script
@pytest.mark.parametrize("solver,sig,code", [
    ("highs", signal.SIGINT, 130),
    pytest.param("gurobi", signal.SIGTERM, 143, marks=pytest.mark.skipif(not _gurobi(), reason="no gurobipy")),
    pytest.param("highs", signal.SIGTERM, 143, marks=pytest.mark.slow),
    pytest.param("gurobi", signal.SIGINT, 130, marks=[pytest.mark.slow,
                                                      pytest.mark.skipif(not _gurobi(), reason="no gurobipy")]),
])
def test_console_script_stops_within_seconds_during_milp(solver, sig, code, hard_data, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = _popen(_hard_args(hard_data, solver, out))
    _wait_for(lambda: out.exists() and out.read_text().count("\n") >= 1, proc)
    time.sleep(1.5)  # now inside the MILP of sample 1
    t = time.time()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t < REACT, stderr
    assert proc.returncode == code, stderr
    assert json.loads(stdout)["interrupted"] is True
    assert [r["status"] for r in read_records(str(out))] == ["misclassified"]
    assert ("stopped by SIGTERM" if sig == signal.SIGTERM else "interrupted") in stderr
    assert "verikit certify" in stderr and "--resume" in stderr and "Traceback" not in stderr


def _stable(summary):
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    return [{**drop(s), "stages": [drop(r) for r in s["stages"]]} for s in summary["results"]]


@needs_script
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                 pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL])
def test_certify_killed_mid_batch_resumes_to_the_same_summary(sig, tmp_path):
    """Records are written one by one inside a batch of 32; whatever signal ends the run, a
    --resume finishes it with exactly the summary of an uninterrupted run. (1000 samples: at
    ~1 ms each on an idle machine, 40 were all written before the 50 ms poll could kill.)"""
    n = 1000
    args = ["certify", TINY, "--eps", "0.03", "--num-samples", str(n), "--domains", "box,deeppoly", "--batch-size", "32",
            "--json", "--threads", "1"]
    full = CliRunner().invoke(main, args + ["-o", str(tmp_path / "full.jsonl")])
    assert full.exit_code == 0, full.output
    part = tmp_path / "part.jsonl"
    proc = _popen(args + ["-o", str(part)])
    _wait_for(lambda: part.exists() and part.read_text().count("\n") >= 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], stderr
    done = len(read_records(str(part)))
    assert 2 <= done < n
    resumed = subprocess.run([_verikit(), *args, "-o", str(part), "--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _stable(json.loads(resumed.stdout)) == _stable(json.loads(full.stdout))
    assert sorted(r["index"] for r in read_records(str(part))) == list(range(n))


# ------------------------------------------------------------------ vnncomp
@pytest.fixture
def vnn_instances(tmp_path):
    """Instance 1 is quick (violated), instance 2 a long MILP."""
    shutil.copy(os.path.join(TEST_DATA, "test_sat.onnx"), tmp_path)
    shutil.copy(os.path.join(TEST_DATA, "test_prop.vnnlib"), tmp_path)
    shutil.copy(HARD, tmp_path)
    lines = [f"(declare-const X_{i} Real)" for i in range(20)] + ["(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    lines += [f"(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))" for i in range(20)] + ["(assert (<= Y_0 Y_1))"]
    (tmp_path / "hard.vnnlib").write_text("\n".join(lines) + "\n")
    csv = tmp_path / "instances.csv"
    csv.write_text("onnx,vnnlib,timeout_s,expected\ntest_sat.onnx,test_prop.vnnlib,60,violated\n"
                   "hard_milp_20x40x3.onnx,hard.vnnlib,120,\n")
    return csv


@needs_script
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)])
def test_vnncomp_keeps_the_finished_rows(sig, vnn_instances, tmp_path):
    out = tmp_path / "results.csv"
    proc = _popen(["vnncomp", str(vnn_instances), "-o", str(out), "--domains", "box,milp", "--milp-solver", "highs",
                   "--no-attack", "--threads", "1"])
    _wait_for(lambda: out.exists() and out.read_text().count("\n") >= 2, proc)
    time.sleep(1.0)
    t = time.time()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t < REACT
    rows = out.read_text().splitlines()
    assert rows[0].startswith("benchmark,onnx,vnnlib,result") and len(rows) == 2
    assert rows[1].split(",")[3] == "violated"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr
        assert "1 of 2 instances: 0 holds, 1 violated" in stdout and "interrupted after 1 of 2" in stderr


# ------------------------------------------------------------------ train
def _train_args(out):
    return ["train", "--model", "cnn-small", "--epochs", "1", "--warmup-epochs", "0", "--train-samples", "512",
            "--batch-size", "16", "--eval-samples", "16", "--threads", "1", "--out", str(out)]


@needs_script
def test_train_stopped_in_its_first_epoch_resumes_bit_identically(tmp_path):
    """SIGTERM in the middle of the first epoch: a mid-epoch checkpoint, the resume command, and
    a resumed run whose weights and metrics equal an uninterrupted run's."""
    from verikit.train.loop import read_checkpoint

    run = tmp_path / "run"
    env = {**os.environ, "VERIKIT_PROGRESS_INTERVAL": "0.1"}
    proc = subprocess.Popen([_verikit(), *_train_args(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = []

    def reader():
        for line in proc.stderr:
            seen.append(line)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    started = lambda: any("epoch 1/1:" in ln and " 0/32" not in ln and "steps done" in ln for ln in seen)
    _wait_for(started, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    th.join()
    err = "".join(seen)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM in epoch 1 at step" in err and f"verikit train --resume {run}" in err
    state = read_checkpoint(str(run / "checkpoint.pt"))
    assert state["epoch"] == 0 and 0 < state["partial"]["step"] < 32
    resumed = subprocess.run([_verikit(), "train", "--resume", str(run), "--quiet"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    straight = CliRunner().invoke(main, _train_args(tmp_path / "straight") + ["--quiet"])
    assert straight.exit_code == 0, straight.output
    a, b = read_checkpoint(str(run / "checkpoint.pt")), read_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))
    assert a["epoch"] == b["epoch"] == 1 and a["partial"] is None
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert [m["loss"] for m in a["metrics"]] == [m["loss"] for m in b["metrics"]]
