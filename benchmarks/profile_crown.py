"""Where CROWN's time and memory go: one verikit CROWN call on a benchmark net of
bench_vs_lirpa.py, profiled by phase (the engine's methods, timed by wrapping them) and by
torch operator (torch.profiler), with the peak memory of each intermediate-layer refinement.

    python benchmarks/profile_crown.py --net mlp9x200 --batch 32
    python benchmarks/profile_crown.py --net cnn7 --batch 1          # ~30 s
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_lirpa import NETS, build_net  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

PHASES = ("refine_intermediate", "refine_node", "bound_rows", "lower_bound", "_affine_backward",
          "_activation_backward", "_window_backward", "relaxation")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", default="mlp256x2", choices=NETS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ops", type=int, default=15, help="torch operators to list")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import verikit
    from verikit.domains import get_domain
    from verikit.domains import linear_bounds as lb
    from verikit.domains.box import propagate_box

    net, shape, eps, x, y = build_net(args.net, args.cache)
    graph = verikit.from_torch(net, shape)
    x, y = x[:args.batch], y[:args.batch]
    box, spec = verikit.Box.linf_ball(x, eps), verikit.Spec.robustness(y, 10)
    crown = get_domain("crown")
    crown.bound(graph, box, spec)  # warm-up

    seconds = collections.Counter()
    calls = collections.Counter()
    refine_mem, refine_rows, per_sample = {}, {}, {}
    engine_cls = lb.LinearBoundEngine

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - t0
                calls[name] += 1
        return wrapper

    originals = {n: getattr(engine_cls, n) for n in PHASES}
    for n, f in originals.items():
        setattr(engine_cls, n, timed(n, f))
    orig_refine = engine_cls.refine_node

    def refine_with_memory(self, name):
        b = self.store[name]
        lo, hi = b.lo.reshape(b.lo.shape[0], -1), b.hi.reshape(b.hi.shape[0], -1)
        unstable = (lo < 0) & (hi > 0)
        per_sample[name] = (float(unstable.sum(1).float().mean()), int(unstable.any(0).sum()), lo.shape[1])
        before = self.rows_bounded
        with PeakRSS() as m:
            out = orig_refine(self, name)
        refine_mem[name] = m.gb
        refine_rows[name] = (self.rows_bounded - before) // 2
        return out

    engine_cls.refine_node = refine_with_memory
    orig_box = lb.propagate_box
    lb.propagate_box = timed("propagate_box (refresh)", propagate_box)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, PeakRSS() as total_mem:
            t0 = time.perf_counter()
            crown.bound(graph, box, spec)
            total = time.perf_counter() - t0
    finally:
        for n, f in originals.items():
            setattr(engine_cls, n, f)
        lb.propagate_box = orig_box

    print(f"{args.net}, batch {args.batch}, eps {eps}: CROWN {total:.3f} s (under the profiler), "
          f"peak memory {total_mem.gb:.2f} GB above the start")
    print("\nphase (inclusive, nested phases overlap)         seconds  share  calls")
    for name, s in seconds.most_common():
        print(f"  {name:45s} {s:8.3f} {100 * s / total:5.1f}% {calls[name]:6d}")
    print("\nrefined node      neurons  unstable per sample  unstable in the batch (bounded for every sample)"
          "  rows bounded  peak GB during its refinement")
    for name in refine_mem:
        mean, union, n = per_sample[name]
        print(f"  {name:14s} {n:8d} {mean:20.1f} {union:22d} {refine_rows[name]:38d} {refine_mem[name]:10.2f}")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
