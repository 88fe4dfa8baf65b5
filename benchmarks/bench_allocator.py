"""CROWN with glibc's default allocator settings against `verikit.allocator.keep_freed_memory`
(large allocations from the heap, freed memory kept), toggled in one process and interleaved
call by call, so that both see the same machine. Prints the median time of each, the ratio
(> 1: keeping freed memory is faster) and the peak resident memory above the level before a
call (free heap memory handed back first, so retained pages are not counted as free).

    python benchmarks/bench_allocator.py                       # CNN7 at batch 1, ~2 minutes
    python benchmarks/bench_allocator.py --nets mlp256x4,oval21-cifar --batch 32 --reps 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_lirpa import ab_arguments, build_net, chosen_nets  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    ab_arguments(p, "cnn7", 3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import verikit
    from verikit.allocator import keep_freed_memory
    from verikit.domains import get_domain

    nets = chosen_nets(p, args.nets)
    if not keep_freed_memory(False):
        print("the C library is not glibc: nothing to compare")
        return 0
    crown = get_domain("crown")
    print(f"{'net':<14}{'batch':>6}{'glibc default':>16}{'keep freed':>14}{'speed-up':>10}{'peak GB default/keep':>24}")
    for name in nets:
        net, shape, eps, x, y = build_net(name, args.cache)
        graph = verikit.from_torch(net, shape)
        box = verikit.Box.linf_ball(x[:args.batch], eps)
        spec = verikit.Spec.robustness(y[:args.batch], 10)
        crown.bound(graph, box, spec)  # warm-up (graph caches)
        times, peaks, lows = {False: [], True: []}, {False: 0.0, True: 0.0}, {}
        for _ in range(args.reps):
            for keep in (False, True):
                keep_freed_memory(keep)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    lows[keep] = crown.bound(graph, box, spec).lower
                    times[keep].append(time.perf_counter() - t0)
                peaks[keep] = max(peaks[keep], mem.gb)
        keep_freed_memory(False)
        assert torch.equal(lows[False], lows[True])  # the allocator cannot change a bound
        base, kept = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name:<14}{args.batch:>6}{base:>14.3f} s{kept:>12.3f} s{base / kept:>9.2f}x"
              f"{peaks[False]:>15.2f} / {peaks[True]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
