"""The benchmark scripts still run against the current API (bench_train broke once when the
training config began to refuse --sabr-lambda outside SABR, and no test noticed)."""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_train  # noqa: E402
import flops  # noqa: E402
import torch  # noqa: E402


def test_bench_train_times_every_method_on_a_small_model():
    best, peak, work = bench_train.time_methods("cnn-small", 4, 1)
    assert set(best) == set(peak) == set(work) == {kind for kind, _ in bench_train.METHODS}
    assert all(0 < t < math.inf for t in best.values())
    assert all(math.isfinite(gb) for gb in peak.values())
    # an attack of 8 gradient steps costs more arithmetic than one standard step, the box step too
    assert work["pgd"] > 5 * work["standard"] and work["ibp"] > 1.5 * work["standard"]


def test_flop_count_of_products_convolutions_and_their_gradients():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(5, 3, generator=g)
    assert flops.gflop(torch.mm, a, b) * 1e9 == 2 * 7 * 5 * 3
    conv = torch.nn.Conv2d(2, 4, 3, bias=False)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    forward = 2 * 4 * 4 * 4 * 2 * 9  # outputs x (in-channels x kernel) multiply-adds
    assert flops.gflop(conv, x) * 1e9 == forward
    # d/dx only (as the PGD attack asks): one more convolution's worth, no weight gradient
    conv.weight.requires_grad_(False)
    assert flops.gflop(lambda: torch.autograd.grad(conv(x).sum(), x)) * 1e9 == 2 * forward
    # elementwise work is not counted
    assert flops.gflop(torch.relu, x) == 0


def test_bench_bab_children_runs_and_its_verdicts_agree(capsys):
    import bench_bab_children

    assert bench_bab_children.main(["--nets", "mnist-sabr-0.1", "--images", "2", "--timeout", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "downstream" in out and "contradicting verdicts: 0" in out
