"""`verikit vnncomp` streams one row per finished instance, survives a crashing instance, keeps
its rows through Ctrl-C and SIGKILL, and `--resume` finishes what a killed run started."""
import csv
import os
import signal
import subprocess
import time

import pytest

from cli_run import console_script as _verikit, invoke as _run
from conftest import TEST_DATA
from verikit.certify.benchmark import COLUMNS, ResultsCsv, read_results

# (onnx, vnnlib, expected) from tests/data: answered in well under a second each by box,crown
INSTANCES = [("test_nano.onnx", "test_nano.vnnlib", "holds"), ("test_tiny.onnx", "test_tiny.vnnlib", "holds"),
             ("test_small.onnx", "test_small.vnnlib", "holds"), ("test_sat.onnx", "test_prop.vnnlib", "violated"),
             ("test_unsat.onnx", "test_prop.vnnlib", "holds")]
CHAIN = ["--domains", "box,crown", "--threads", "1", "--quiet"]


def _instances_csv(folder, rows=INSTANCES):
    path = folder / "instances.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["benchmark", "onnx", "vnnlib", "timeout_s", "expected"])
        for onnx, vnnlib, expected in rows:
            w.writerow(["t", os.path.join(TEST_DATA, onnx), os.path.join(TEST_DATA, vnnlib), 60, expected])
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _answers(rows):
    return sorted((os.path.basename(r["onnx"]), os.path.basename(r["vnnlib"]), r["result"]) for r in rows)


def test_an_unexpected_exception_in_one_instance_is_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    import verikit.certify.vnn as vnn

    real = vnn.check_property

    def flaky(model, prop, cfg):
        if prop.path.endswith("test_tiny.vnnlib"):
            raise MemoryError("CUDA out of memory (simulated)")
        return real(model, prop, cfg)

    monkeypatch.setattr(vnn, "check_property", flaky)
    out = tmp_path / "r.csv"
    res = _run("vnncomp", _instances_csv(tmp_path), "-o", out, *CHAIN)
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert [os.path.basename(r["onnx"]) for r in rows] == [i[0] for i in INSTANCES]  # every later instance ran
    bad = [r for r in rows if r["result"] == "error"]
    assert len(bad) == 1 and bad[0]["onnx"].endswith("test_tiny.onnx")
    assert bad[0]["note"] == "MemoryError: CUDA out of memory (simulated)"
    assert all(r["result"] == r["expected"] for r in rows if r is not bad[0])
    assert "1 error;" in res.stdout and "error on" in res.stderr


def test_ctrl_c_exits_130_keeping_the_finished_rows_and_says_how_to_resume(tmp_path, monkeypatch):
    import verikit.certify.benchmark as benchmark

    real, calls = benchmark.decide_instance, []

    def interrupted(inst, settings, models):
        calls.append(inst["onnx"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(inst, settings, models)

    monkeypatch.setattr(benchmark, "decide_instance", interrupted)
    out = tmp_path / "r.csv"
    res = _run("vnncomp", _instances_csv(tmp_path), "-o", out, *CHAIN)
    assert res.exit_code == 130
    assert len(_rows(out)) == 2 and "--resume" in res.stderr
    monkeypatch.setattr(benchmark, "decide_instance", real)
    again = _run("vnncomp", _instances_csv(tmp_path), "-o", out, *CHAIN, "--resume")
    assert again.exit_code == 0, again.output
    assert _answers(_rows(out)) == _answers([{"onnx": o, "vnnlib": v, "result": e} for o, v, e in INSTANCES])
    assert "5 instances: 4 holds, 1 violated" in again.stdout


def test_resume_cuts_a_half_written_last_line_and_reruns_only_the_missing_instances(tmp_path, monkeypatch):
    import verikit.certify.benchmark as benchmark

    out = tmp_path / "r.csv"
    full = _run("vnncomp", _instances_csv(tmp_path), "-o", tmp_path / "full.csv", *CHAIN)
    assert full.exit_code == 0, full.output
    lines = (tmp_path / "full.csv").read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:17])  # header, two rows, a row cut in the middle
    real, ran = benchmark.decide_instance, []
    monkeypatch.setattr(benchmark, "decide_instance", lambda inst, *a: ran.append(inst["onnx"]) or real(inst, *a))
    res = _run("vnncomp", _instances_csv(tmp_path), "-o", out, *CHAIN, "--resume")
    assert res.exit_code == 0, res.output
    assert [os.path.basename(p) for p in ran] == [i[0] for i in INSTANCES[2:]]
    rows = _rows(out)
    assert len(rows) == 5 and _answers(rows) == _answers(_rows(tmp_path / "full.csv"))
    assert res.stdout.split("; total")[0] == full.stdout.split("; total")[0]  # the same summary


def test_an_instance_listed_twice_needs_two_rows(tmp_path):
    twice = [INSTANCES[0], INSTANCES[3], INSTANCES[0]]
    out = tmp_path / "r.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow({"benchmark": "t", "onnx": os.path.join(TEST_DATA, "test_nano.onnx"),
                    "vnnlib": os.path.join(TEST_DATA, "test_nano.vnnlib"), "result": "holds", "seconds": "0.1",
                    "expected": "holds", "agrees": "True", "note": ""})
    res = _run("vnncomp", _instances_csv(tmp_path, twice), "-o", out, *CHAIN, "--resume")
    assert res.exit_code == 0, res.output
    assert [os.path.basename(r["onnx"]) for r in _rows(out)] == ["test_nano.onnx", "test_sat.onnx", "test_nano.onnx"]


def test_results_csv_reads_back_and_refuses_foreign_files_untouched(tmp_path):
    good = tmp_path / "good.csv"
    with ResultsCsv(str(good)) as _:
        pass
    assert read_results(str(good)) == []
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b,c\n1,2,3\n4,5")
    from verikit.errors import VerikitError

    with pytest.raises(VerikitError, match="not a verikit vnncomp results file"):
        ResultsCsv(str(foreign), resume=True)
    assert foreign.read_text() == "a,b,c\n1,2,3\n4,5"  # not cut, not appended to


@pytest.mark.skipif(_verikit() is None, reason="verikit console script not installed")
def test_sigkill_keeps_every_finished_row_and_resume_completes_the_run(tmp_path):
    many = INSTANCES * 3  # 15 instances, a few seconds in all
    inst = _instances_csv(tmp_path, many)
    ref = _run("vnncomp", inst, "-o", tmp_path / "full.csv", *CHAIN)
    assert ref.exit_code == 0, ref.output
    out = tmp_path / "part.csv"
    proc = subprocess.Popen([_verikit(), "vnncomp", str(inst), "-o", str(out), *CHAIN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = read_results(str(out))
    assert 3 <= len(kept) < len(many)  # really killed part-way
    full = _rows(tmp_path / "full.csv")
    # complete up to the last finished instance: the rows are the first ones, in order, with the reference answers
    assert [(r["onnx"], r["vnnlib"], r["result"]) for r in kept] == \
        [(r["onnx"], r["vnnlib"], r["result"]) for r in full[:len(kept)]]
    res = subprocess.run([_verikit(), "vnncomp", str(inst), "-o", str(out), *CHAIN, "--resume"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert _answers(_rows(out)) == _answers(full)
    assert res.stdout.split("; total")[0] == ref.stdout.split("; total")[0]
