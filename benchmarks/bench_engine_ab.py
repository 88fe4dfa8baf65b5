"""A/B timing of the CROWN engine's switchable shortcuts (issue 15), in one process, runs
interleaved so that the machine's drift hits every configuration alike:

- upper_first: rows of a layer read by ReLUs only get upper bounds first, lower bounds only
  where the upper bound is still above 0 (domains/row_refinement.py; batch > 1);
- fold_input: a Linear/ReLU chain ending at the input minimises over the input box itself
  (domains/relu_chain.py).

For each net and batch it prints the median time of each configuration, its ratio to the
plain engine ("off", both switches off; > 1: faster) and the largest difference of the output
lower bounds from the plain engine's (rounding only: the shortcuts do not change bounds).

    python benchmarks/bench_engine_ab.py --nets mlp256x2,mlp256x4,mlp9x200 --batches 1,32
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

CONFIGS = {"off": (False, False), "upper_first": (True, False), "fold_input": (False, True), "both": (True, True)}


def time_configs(graph, box, spec, reps: int) -> dict:
    """config -> (median seconds, output lower bounds)."""
    from verikit.domains import get_domain
    from verikit.domains import linear_bounds as lb

    crown = get_domain("crown")
    cls = lb.LinearBoundEngine
    saved = cls.upper_first, cls.fold_input
    times = {c: [] for c in CONFIGS}
    lows = {}
    try:
        for rep in range(reps + 1):  # the first round warms caches and is not counted
            for name, (upper_first, fold_input) in CONFIGS.items():
                cls.upper_first, cls.fold_input = upper_first, fold_input
                t0 = time.perf_counter()
                lows[name] = crown.bound(graph, box, spec).lower
                if rep:
                    times[name].append(time.perf_counter() - t0)
    finally:
        cls.upper_first, cls.fold_input = saved
    return {c: (statistics.median(times[c]), lows[c]) for c in CONFIGS}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,32")
    ab_arguments(p, "mlp256x2,mlp256x4,mlp9x200", 7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import verikit

    nets = chosen_nets(p, args.nets)
    print("median CROWN time per configuration (x: speed-up over 'off', both switches off)")
    print(f"{'net':<14}{'batch':>6}" + "".join(f"{c:>20}" for c in CONFIGS) + f"{'both/off':>10}{'max |dlo|':>11}")
    for name in nets:
        net, shape, eps, x, y = build_net(name, args.cache)
        graph = verikit.from_torch(net, shape)
        for batch in (int(b) for b in args.batches.split(",")):
            box = verikit.Box.linf_ball(x[:batch], eps)
            spec = verikit.Spec.robustness(y[:batch], 10)
            found = time_configs(graph, box, spec, args.reps)
            base_t, base_lo = found["off"]
            cells = "".join(f"{f'{1e3 * t:.1f} ms' + (f' x{base_t / t:.2f}' if c != 'off' else ''):>20}"
                            for c, (t, _) in found.items())
            diff = max(float((lo - base_lo).abs().max()) for _, lo in found.values())
            print(f"{name:<14}{batch:>6}{cells}{base_t / found['both'][0]:>9.2f}x{diff:>11.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
