"""`--workers` / `--ray`: a local Ray cluster with 2 workers gives the serial run's records;
killed workers cost only their task; a killed driver is resumed; without Ray, one clear line."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from cli_run import console_script as _verikit, invoke as _run
from conftest import SHARED
from verikit.certify.records import read_records

VNN = os.path.join(SHARED, "vnncomp2021")
MNIST = ["certify", "mnist-ibp-0.1", "--eps", "0.15", "--num-samples", "40", "--batch-size", "4", "--threads", "1",
         "--json", "--quiet"]


@pytest.fixture(scope="module")
def cluster():
    """One local 2-CPU Ray instance for the module; the CLI joins it instead of starting its own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The serial reference run of MNIST: (records by index, JSON summary)."""
    out = tmp_path_factory.mktemp("serial") / "serial.jsonl"
    res = _run(*MNIST, "-o", out)
    assert res.exit_code == 0, res.output
    return {r["index"]: r for r in read_records(str(out))}, json.loads(res.stdout)




def _stable(summary):
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}
    return [{**drop(s), "stages": [drop(r) for r in s["stages"]]} for s in summary["results"]]


def _same_records(got, want):
    assert sorted(got) == sorted(want)
    for i, r in got.items():
        w = want[i]
        assert (r["status"], r["by"], r["label"], r["prediction"], r["model"]) == \
            (w["status"], w["by"], w["label"], w["prediction"], w["model"]), (r, w)
        assert (r["margin"] is None) == (w["margin"] is None)
        if r["margin"] is not None:
            assert abs(r["margin"] - w["margin"]) <= 1e-6, (r, w)


def test_two_workers_give_the_serial_records_and_summary(cluster, serial, tmp_path):
    recs, summary = serial
    assert {r["status"] for r in recs.values()} >= {"verified", "falsified", "unknown"}  # a real mix
    out = tmp_path / "par.jsonl"
    res = _run(*MNIST, "-o", out, "--workers", "2")
    assert res.exit_code == 0, res.output
    _same_records({r["index"]: r for r in read_records(str(out))}, recs)
    assert _stable(json.loads(res.stdout)) == _stable(summary)


def _vnn_rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


@pytest.mark.skipif(not os.path.isdir(VNN), reason="shared VNN-COMP instances not present")
def test_vnncomp_with_two_workers_gives_the_serial_rows_and_result_files(cluster, tmp_path):
    args = ["vnncomp", os.path.join(VNN, "instances.csv"), "--benchmark", "test", "--domains", "box,crown",
            "--threads", "1", "--quiet"]
    ser = _run(*args, "-o", tmp_path / "s.csv", "--result-dir", tmp_path / "rs")
    par = _run(*args, "-o", tmp_path / "p.csv", "--result-dir", tmp_path / "rp", "--workers", "2")
    assert ser.exit_code == 0 and par.exit_code == 0, par.output
    key = lambda r: (r["onnx"], r["vnnlib"])
    assert sorted(_vnn_rows(tmp_path / "p.csv"), key=key) == sorted(_vnn_rows(tmp_path / "s.csv"), key=key)
    assert len(_vnn_rows(tmp_path / "p.csv")) == 5
    names = sorted(os.listdir(tmp_path / "rs"))
    assert names == sorted(os.listdir(tmp_path / "rp")) and len(names) == 5
    for n in names:
        assert (tmp_path / "rs" / n).read_text() == (tmp_path / "rp" / n).read_text()
    assert ser.stdout.split("; total")[0] == par.stdout.split("; total")[0]


def test_a_task_whose_worker_is_killed_is_retried_and_one_that_keeps_dying_is_an_error(cluster, tmp_path):
    from verikit.certify.parallel import ParallelOptions, run_units

    marker = str(tmp_path / "died-once")

    def work(n, marker):  # defined here: Ray ships it to the workers by value
        import os as _os
        import signal as _signal

        if n == 1 and not _os.path.exists(marker):
            open(marker, "w").close()
            _os.kill(_os.getpid(), _signal.SIGKILL)  # the worker process dies mid-task
        if n == 3:
            _os.kill(_os.getpid(), _signal.SIGKILL)  # every time
        return n * 10

    got, failed = {}, {}
    run_units(ParallelOptions(workers=2, max_retries=2), work, range(5), lambda ray, n: (n, marker),
              lambda n, v: got.__setitem__(n, v), lambda n, why: failed.__setitem__(n, why))
    assert got == {0: 0, 1: 10, 2: 20, 4: 40} and os.path.exists(marker)
    assert list(failed) == [3] and "worker failed 3 times" in failed[3]


def test_an_exception_in_a_task_is_an_error_but_bad_input_stops_the_run(cluster):
    from verikit.certify.parallel import ParallelOptions, run_units
    from verikit.errors import VerikitError

    def work(n):
        if n == 1:
            raise ZeroDivisionError("boom")
        if n == 9:
            raise VerikitError("bad input in a worker")
        return n

    got, failed = [], {}
    run_units(ParallelOptions(workers=2), work, range(3), lambda ray, n: (n,), lambda n, v: got.append(v),
              lambda n, why: failed.__setitem__(n, why))
    assert sorted(got) == [0, 2] and failed == {1: "ZeroDivisionError: boom"}
    with pytest.raises(VerikitError, match="bad input in a worker"):
        run_units(ParallelOptions(workers=2), work, [9], lambda ray, n: (n,), lambda n, v: None, lambda n, w: None)


def _busy_certify_workers():
    """pids of Ray worker processes running a certify task right now (Ray titles them ray::<task>)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::certify_batch"):
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def test_killing_a_worker_during_a_certify_run_loses_no_record(cluster, serial, tmp_path):
    recs, summary = serial
    killed = []

    def killer():
        deadline = time.time() + 120
        while not killed and time.time() < deadline:
            for pid in _busy_certify_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = tmp_path / "par.jsonl"
    res = _run(*MNIST, "-o", out, "--workers", "2")
    t.join(1)
    killed.append(None)  # stop the thread if it found nothing
    assert killed[0] is not None, "no busy worker was found to kill"
    assert res.exit_code == 0, res.output
    got = read_records(str(out))
    assert len(got) == 40 and not [r for r in got if r["status"] == "error"]
    _same_records({r["index"]: r for r in got}, recs)
    assert _stable(json.loads(res.stdout)) == _stable(summary)


@pytest.mark.skipif(_verikit() is None, reason="verikit console script not installed")
def test_a_killed_driver_resumes_on_the_cluster_to_the_uninterrupted_summary(cluster, serial, tmp_path):
    recs, summary = serial
    part = tmp_path / "part.jsonl"
    args = [_verikit(), *MNIST, "-o", str(part), "--ray", cluster]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and (not part.exists() or part.read_text().count("\n") < 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_records(str(part)))
    assert 8 <= done < 40  # really killed part-way
    res = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert _stable(json.loads(res.stdout)) == _stable(summary)
    got = read_records(str(part))
    assert sorted(r["index"] for r in got) == list(range(40))  # nothing repeated, nothing missing
    _same_records({r["index"]: r for r in got}, recs)


def _split_property(path):
    """tests/data/test_prop.vnnlib with X_3 and X_4 each cut in halves: 4 input boxes (cases)."""
    from conftest import TEST_DATA

    fixed = {0: (-0.30353115613746867, -0.29855281193475053), 1: (-0.009549296585513092, 0.009549296585513092),
             2: (0.4933803235848431, 0.49999999998567607)}
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(5)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(5))
    out = " ".join(f"(<= Y_0 Y_{j})" for j in range(1, 5))
    cases = []
    for lo3, hi3 in ((0.3, 0.4), (0.4, 0.5)):
        for lo4, hi4 in ((0.3, 0.4), (0.4, 0.5)):
            box = {**fixed, 3: (lo3, hi3), 4: (lo4, hi4)}
            cons = " ".join(f"(>= X_{i} {lo!r}) (<= X_{i} {hi!r})" for i, (lo, hi) in sorted(box.items()))
            cases.append(f"(and {cons} {out})")
    path.write_text(head + "(assert (or " + " ".join(cases) + "))\n")
    return str(path), TEST_DATA


@pytest.mark.parametrize("net,answer", [("test_unsat.onnx", "holds"), ("test_sat.onnx", "violated")])
def test_a_vnnlib_property_with_several_input_boxes_on_two_workers(cluster, tmp_path, net, answer):
    from verikit.certify.vnnlib import load_vnnlib

    prop, data = _split_property(tmp_path / "split.vnnlib")
    assert len(load_vnnlib(prop).cases) == 4
    args = ["certify", os.path.join(data, net), "--vnnlib", prop, "--domains", "box,crown", "--threads", "1", "--json"]
    ser = _run(*args, "--result-file", tmp_path / "s.txt")
    par = _run(*args, "--result-file", tmp_path / "p.txt", "--workers", "2")
    assert ser.exit_code == 0 and par.exit_code == 0, par.output
    assert json.loads(par.stdout)["result"] == json.loads(ser.stdout)["result"] == answer
    assert (tmp_path / "p.txt").read_text().splitlines()[0] == answer
    if answer == "holds":
        assert json.loads(par.stdout)["settled_by"] == json.loads(ser.stdout)["settled_by"]
    else:  # the counterexample lies in one of the boxes and violates the output property
        import numpy as np

        text = (tmp_path / "p.txt").read_text()
        vals = dict((k, float(v)) for k, v in (t.strip("() \n").split() for t in text.split("\n", 1)[1].split(")")
                                              if t.strip("() \n")))
        y = np.array([vals[f"Y_{j}"] for j in range(5)])
        assert all(y[0] <= y[j] for j in range(1, 5))
        assert 0.3 <= vals["X_3"] <= 0.5 and 0.3 <= vals["X_4"] <= 0.5


def test_workers_without_ray_say_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    for args in (["certify", "mnist-ibp-0.1", "--eps", "0.1", "--workers", "2", "-o", tmp_path / "x.jsonl"],
                 ["vnncomp", os.path.join(VNN, "instances.csv"), "--workers", "2", "-o", tmp_path / "x.csv"]):
        res = _run(*args)
        assert res.exit_code == 2
        assert res.stderr.strip().splitlines() == [
            'error: --workers 2 needs Ray, which is not installed; install it with: pip install "verikit[ray]"']
    assert not os.listdir(tmp_path)  # nothing was written
    res = _run("certify", "mnist-ibp-0.1", "--eps", "0.1", "--num-samples", "2", "--workers", "1", "--threads", "1",
               "--quiet")
    assert res.exit_code == 0, res.output  # one worker is this process: no Ray needed
