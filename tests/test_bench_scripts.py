"""The benchmark scripts still run against the current API (bench_train broke once when the
training config began to refuse --sabr-lambda outside SABR, and no test noticed)."""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_train  # noqa: E402


def test_bench_train_times_every_method_on_a_small_model():
    best, peak = bench_train.time_methods("cnn-small", 4, 1)
    assert set(best) == set(peak) == {kind for kind, _ in bench_train.METHODS}
    assert all(0 < t < math.inf for t in best.values())
    assert all(math.isfinite(gb) for gb in peak.values())


def test_bench_bab_children_runs_and_its_verdicts_agree(capsys):
    import bench_bab_children

    assert bench_bab_children.main(["--nets", "mnist-sabr-0.1", "--images", "2", "--timeout", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "downstream" in out and "contradicting verdicts: 0" in out
