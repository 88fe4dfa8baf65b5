"""The engine's forward-mode pre-screen (domains/forward_bounds.py) against the engine without
it, in one run: CROWN time, peak memory above the level before the call, back-substituted rows
and the output bounds, with `forward_prescreen` "auto" (the default) and "off" (the engine as
it was before), on the nets of bench_vs_lirpa.py.

    python benchmarks/bench_prescreen.py                        # CNN7 at batch 1, 1 thread
    python benchmarks/bench_prescreen.py --nets cnn7,cnn-avgpool,mlp9x200 --batches 1,32 --threads 2

Each figure is the median of --repeats calls after one warm-up call (the two settings take
turns call by call); the ratio is off / auto (> 1: faster with the pre-screen). "max |diff|"
is the largest difference between the two settings' lower bounds of the robustness margins.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_lirpa import NETS, build_net  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="cnn7", help=f"comma-separated, from {','.join(NETS)}")
    p.add_argument("--batches", default="1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default="auto,off",
                   help="which forward_prescreen settings to run (auto alone: CNN7 at batch 32 in minutes, not ~20)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import verikit
    from verikit.domains import get_domain

    settings = [s for s in args.settings.split(",") if s]
    if not settings or any(s not in ("auto", "off") for s in settings):
        p.error("--settings: a comma list of auto, off")
    timed = f"median of {args.repeats} calls" if args.repeats else "the first call (--repeats 0)"
    print(f"CROWN, forward_prescreen {' vs '.join(settings)}, {args.threads} thread(s), {timed}")
    print(f"{'net':14s} {'batch':>5s} {'auto s':>8s} {'off s':>8s} {'off/auto':>8s} {'auto GB':>8s} {'off GB':>7s}"
          f" {'rows auto':>10s} {'rows off':>9s} {'max |diff|':>10s} {'worst margin':>12s}")
    for name in args.nets.split(","):
        net, shape, eps, x, y = build_net(name, args.cache)
        graph = verikit.from_torch(net, shape)
        for batch in (int(b) for b in args.batches.split(",")):
            box = verikit.Box.linf_ball(x[:batch], eps)
            spec = verikit.Spec.robustness(y[:batch], 10)
            domains = {s: get_domain("crown", forward_prescreen=s) for s in settings}
            times = {s: [] for s in domains}
            mem, rows, lower = {}, {}, {}
            for i in range(args.repeats + 1):
                for setting, dom in domains.items():
                    with PeakRSS() as m:
                        t0 = time.perf_counter()
                        res = dom.bound(graph, box, spec)
                        dt = time.perf_counter() - t0
                    if i == 0:  # the warm-up call: memory, rows and bounds, timed only with --repeats 0
                        mem[setting], rows[setting] = m.gb, res.info["rows_bounded"]
                        lower[setting] = spec.margin(res.lower)
                    if i > 0 or args.repeats == 0:
                        times[setting].append(dt)
            med = {s: statistics.median(t) for s, t in times.items()}
            both = len(settings) == 2
            cell = lambda s, f: f(s) if s in med else "-"
            diff = f"{float((lower['auto'] - lower['off']).abs().max()):.2e}" if both else "-"
            worst = float(lower[settings[0]].reshape(batch, -1).min(1).values.mean())
            ratio = f"{med['off'] / med['auto']:.2f}" if both else "-"
            print(f"{name:14s} {batch:5d} {cell('auto', lambda s: f'{med[s]:.3f}'):>8s} {cell('off', lambda s: f'{med[s]:.3f}'):>8s}"
                  f" {ratio:>8s} {cell('auto', lambda s: f'{mem[s]:.2f}'):>8s} {cell('off', lambda s: f'{mem[s]:.2f}'):>7s}"
                  f" {cell('auto', lambda s: str(rows[s])):>10s} {cell('off', lambda s: str(rows[s])):>9s} {diff:>10s}"
                  f" {worst:12.4f}", flush=True)


if __name__ == "__main__":
    main()
