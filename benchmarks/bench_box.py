"""Time of one Box propagation over time of one plain forward pass (same model, same batch).

Interval arithmetic needs about two operator applications per affine layer (centre and |W|
radius), so the target is a ratio at or under 2.5. Both passes run without autograd (the
inference/certification setting) and with autograd (the training setting: forward + backward).

    python benchmarks/bench_box.py [--batch 128] [--repeats 10]
"""
import argparse
import time

import torch

from verikit import Box, Spec, from_torch
from verikit.domains import get_domain
from verikit.models.architectures import build_model


def _time(fn, repeats):
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(name, model, batch, repeats, grad):
    model.eval()
    graph = from_torch(model, (1, 28, 28))
    x = torch.rand(batch, 1, 28, 28)
    labels = torch.randint(0, 10, (batch,))
    spec = Spec.robustness(labels, 10)
    box_domain = get_domain("box")
    ball = Box.linf_ball(x, 0.1)

    def forward():
        y = model(x)
        if grad:
            y.sum().backward()

    def box():
        res = box_domain.bound(graph, ball, spec)
        if grad:
            res.lower.sum().backward()

    with torch.set_grad_enabled(grad):
        t_fwd, t_box = _time(forward, repeats), _time(box, repeats)
    mode = "train (fwd+bwd)" if grad else "inference"
    print(f"{name:6s} {mode:16s} batch {batch:4d}  forward {t_fwd * 1e3:8.1f} ms   box {t_box * 1e3:8.1f} ms   "
          f"ratio {t_box / t_fwd:5.2f}")
    return t_box / t_fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("cnn7", "mlp"):
        model = build_model(name, "mnist")
        for grad in (False, True):
            bench(name, model, args.batch, args.repeats, grad)


if __name__ == "__main__":
    main()
