"""Seconds per training step for standard, PGD (λ=0), IBP (λ=1) and SABR (λ=0.4) training on
the same model and batch, printed as ratios to a standard step measured in the same run.

Targets (issue 15): a SABR step at most 7× a plain step on CNN7 at batch 128 (the reference SABR
code takes 12× on this machine), IBP ~3.6× or better; the peak memory of an IBP and of a SABR
step at most 1.5 GB above that of a plain step (the reference code: 3.7-4.0 GB in total). Peak
memory is the resident set's peak during one step above its level before the step, measured in
this process after the timed rounds. Arithmetic: the floating point operations of one step's
matrix products and convolutions (flops.py), as a multiple of a standard step's, and the rate
they ran at: a time ratio below the arithmetic ratio needs the step to run its products faster
than a standard step does.

    python benchmarks/bench_train.py                       # cnn-small and cnn7, batch 128
    python benchmarks/bench_train.py --models cnn7 --steps 3 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import gflop  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402


def make_trainer(model_name: str, kind: str, lam: float, x, y):
    from verikit.train.config import TrainConfig
    from verikit.train.loop import Trainer

    # PGD and IBP as SABR's end points (λ 0 and 1); λ is an option of SABR only
    cfg = TrainConfig(model=model_name, method="standard" if kind == "standard" else "sabr",
                      sabr_lambda=None if kind == "standard" else lam,
                      eps=0.1, epochs=2, warmup_epochs=0, ramp_epochs=0, batch_size=x.shape[0], device="cpu")
    return Trainer(cfg, "/tmp/verikit-bench-train", data=(x, y, x[:8], y[:8]), log=lambda s: None)


def time_methods(model_name: str, batch: int, rounds: int) -> dict:
    """Min seconds per step of each method. The methods take turns, one step each per round, so
    that load from other processes hits them alike; the minimum over rounds filters the spikes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    trainers = {kind: make_trainer(model_name, kind, lam, x, y) for kind, lam in METHODS}
    best = {kind: float("inf") for kind in trainers}
    for r in range(rounds + 1):
        for kind, tr in trainers.items():
            t0 = time.perf_counter()
            tr.step(x, y, 0.1, 1, torch.Generator().manual_seed(1))
            if r > 0:  # round 0 warms up
                best[kind] = min(best[kind], time.perf_counter() - t0)
    peak, work = {}, {}
    for kind, tr in trainers.items():
        with PeakRSS() as p:
            tr.step(x, y, 0.1, 1, torch.Generator().manual_seed(1))
        peak[kind] = p.gb
        work[kind] = gflop(tr.step, x, y, 0.1, 1, torch.Generator().manual_seed(1))
    return best, peak, work


METHODS = (("standard", 0.0), ("pgd", 0.0), ("ibp", 1.0), ("sabr", 0.4))


def forward_and_box(model_name: str, batch: int, reps: int) -> tuple[float, float]:
    """(seconds of a train-mode forward, seconds of a box pass) for the same model and batch."""
    import verikit
    from verikit.domains.box import propagate_box
    from verikit.models.architectures import build_model

    model = build_model(model_name).train()
    graph = verikit.from_torch(model, (1, 28, 28))
    x = torch.rand(batch, 1, 28, 28)
    box = verikit.Box.linf_ball(x, 0.1)
    ctx = verikit.EvalContext(bn_mode="batch")
    graph.forward(x, ctx=ctx)
    model(x)
    propagate_box(graph, box, ctx=ctx)
    t_fwd = t_box = float("inf")
    for _ in range(reps):  # interleaved, min over repetitions (robust to load spikes)
        t0 = time.perf_counter()
        model(x)
        t_fwd = min(t_fwd, time.perf_counter() - t0)
        t0 = time.perf_counter()
        propagate_box(graph, box, ctx=ctx)
        t_box = min(t_box, time.perf_counter() - t0)
    return t_fwd, t_box


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn-small,cnn7")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (one step per method each; default: 20 small, 3 cnn7)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="the allocator setting the verikit command uses (verikit/allocator.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from verikit.allocator import keep_freed_memory

        print(f"keep freed memory: {keep_freed_memory()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for name in args.models.split(","):
        steps = args.steps or (3 if name == "cnn7" else 20)
        t_fwd, t_box = forward_and_box(name, args.batch, max(3, steps))
        print(f"\n{name}: forward {t_fwd * 1e3:.1f} ms, box pass {t_box * 1e3:.1f} ms "
              f"({t_box / t_fwd:.2f}x a forward; target <= ~2x)")
        best, peak, work = time_methods(name, args.batch, steps)
        for kind, t in best.items():
            print(f"  {kind:<8} {t:8.3f} s/step  {t / best['standard']:5.2f}x standard (min of {steps} rounds)   "
                  f"peak memory {peak[kind]:5.2f} GB ({peak[kind] - peak['standard']:+.2f} GB vs standard)   "
                  f"arithmetic {work[kind]:7.1f} GFLOP ({work[kind] / work['standard']:5.2f}x standard, "
                  f"{work[kind] / t:5.1f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
