"""Seconds per training step for standard, PGD (λ=0), IBP (λ=1) and SABR (λ=0.4) training on
the same model and batch, printed as ratios to a standard step measured in the same run.

Targets (DESIGN.md): a SABR step at most ~8× a plain step on CNN7 (the reference SABR code
takes 12× on this machine), IBP ~3.6× or better.

    python benchmarks/bench_train.py                       # cnn-small and cnn7, batch 128
    python benchmarks/bench_train.py --models cnn7 --steps 3 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch


def time_steps(model_name: str, kind: str, lam: float, batch: int, steps: int, warmup: int = 1) -> float:
    from verikit.train.config import TrainConfig
    from verikit.train.loop import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    cfg = TrainConfig(model=model_name, method="standard" if kind == "standard" else "sabr", sabr_lambda=lam,
                      eps=0.1, epochs=2, warmup_epochs=0, ramp_epochs=0, batch_size=batch, device="cpu")
    tr = Trainer(cfg, "/tmp/verikit-bench-train", data=(x, y, x[:8], y[:8]), log=lambda s: None)
    eps = 0.1
    for _ in range(warmup):
        tr.step(x, y, eps, 1, torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.step(x, y, eps, 1, torch.Generator().manual_seed(1))
    return (time.perf_counter() - t0) / steps


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
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x)
    t_fwd = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        propagate_box(graph, box, ctx=ctx)
    return t_fwd, (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn-small,cnn7")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default: 20 small, 3 cnn7)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for name in args.models.split(","):
        steps = args.steps or (3 if name == "cnn7" else 20)
        t_fwd, t_box = forward_and_box(name, args.batch, max(2, steps))
        print(f"\n{name}: forward {t_fwd * 1e3:.1f} ms, box pass {t_box * 1e3:.1f} ms "
              f"({t_box / t_fwd:.2f}x a forward; target <= ~2x)")
        base = None
        for kind, lam in (("standard", 0.0), ("pgd", 0.0), ("ibp", 1.0), ("sabr", 0.4)):
            t = time_steps(name, kind, lam, args.batch, steps)
            base = base or t
            print(f"  {kind:<8} {t:8.3f} s/step  {t / base:5.2f}x standard", flush=True)


if __name__ == "__main__":
    main()
