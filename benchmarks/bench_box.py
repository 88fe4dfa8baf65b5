"""Time of one Box propagation over time of one plain forward pass (same model, same batch).

Interval arithmetic needs about two operator applications per affine layer (centre and |W|
radius), so the target is a ratio at or under 2.2. Both passes run without autograd (the
inference/certification setting) and with autograd (the training setting: forward + backward).
The box pass bounds the robustness margins (the spec folded into the last layer), starting from
the input box's lo/hi (a fresh Box per call, as the certifier builds one per batch).

The two passes take turns call by call, so load from other processes hits both alike; the
ratio is that of the minima over the repeats (medians are printed too).

    python benchmarks/bench_box.py                           # cnn7 at batch 128, mlp at 128 and 1024
    python benchmarks/bench_box.py --models mlp --batches 128,1024 --repeats 50
"""
import argparse
import statistics
import time

import torch

from verikit import Box, Spec, from_torch
from verikit.domains import get_domain
from verikit.models.architectures import build_model

TARGET = 2.2


def _interleaved(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()  # warm-up (allocations, kernel selection)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return times


def bench(name, model, batch, repeats, grad):
    model.eval()
    graph = from_torch(model, (1, 28, 28))
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
    labels = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(batch + 1))
    spec = Spec.robustness(labels, 10)
    box_domain = get_domain("box")
    ball = Box.linf_ball(x, 0.1)

    def forward():
        y = model(x)
        if grad:
            y.sum().backward()

    def box():
        res = box_domain.bound(graph, Box(ball.lo, ball.hi), spec)
        if grad:
            res.lower.sum().backward()

    with torch.set_grad_enabled(grad):
        times = _interleaved({"forward": forward, "box": box}, repeats)
    t_fwd, t_box = min(times["forward"]), min(times["box"])
    m_fwd, m_box = statistics.median(times["forward"]), statistics.median(times["box"])
    mode = "train (fwd+bwd)" if grad else "inference"
    print(f"{name:6s} {mode:16s} batch {batch:4d}  forward {t_fwd * 1e3:8.2f} ms   box {t_box * 1e3:8.2f} ms   "
          f"ratio {t_box / t_fwd:5.2f} (min of {repeats}; medians {m_fwd * 1e3:.2f} / {m_box * 1e3:.2f} ms: "
          f"{m_box / m_fwd:.2f})", flush=True)
    return t_box / t_fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn7,mlp")
    ap.add_argument("--batches", default=None, help="comma list (default: 128 for cnn7, 128,1024 for mlp)")
    ap.add_argument("--repeats", type=int, default=None, help="default: 10 for cnn7, 50 for mlp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", default="inference,train")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="the allocator setting the verikit command uses (verikit/allocator.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        from verikit.allocator import keep_freed_memory

        print(f"keep freed memory: {keep_freed_memory()}")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); target: box pass <= {TARGET}x a forward pass")
    for name in args.models.split(","):
        model = build_model(name, "mnist")
        batches = args.batches or ("128" if name == "cnn7" else "128,1024")
        repeats = args.repeats or (10 if name == "cnn7" else 50)
        for batch in (int(b) for b in batches.split(",")):
            for mode in args.modes.split(","):
                bench(name, model, batch, repeats, grad=(mode == "train"))


if __name__ == "__main__":
    main()
