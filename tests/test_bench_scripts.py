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
