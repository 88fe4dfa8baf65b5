"""What do interruptible solver calls cost?

HiGHS solves run in highspy's helper thread (with its user-interrupt callbacks) so that Ctrl-C
can cancel them; Gurobi solves get an (empty) callback, signal handlers and stdout redirected
around `optimize()`. This times the milp domain on the first 16 MNIST test images of the tiny
test MLP (eps 0.03) with those wrappers and with the plain calls (`h.run()`, `m.optimize()`),
taking turns round by round, and prints the ratio wrapped / plain (medians and minima).

    python benchmarks/bench_solver_interrupts.py --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--solvers", default="highs,gurobi")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import verikit
    import verikit.domains.milp_solvers as ms
    from verikit.datasets import load_mnist
    from verikit.domains import get_domain

    here = os.path.dirname(os.path.abspath(__file__))
    graph = verikit.from_onnx(os.path.join(here, "..", "tests", "data", "tiny_mnist_mlp.onnx"))
    x, y = load_mnist("test")
    x, y = x[:16].reshape((16,) + graph.input_shape), y[:16]
    box, spec = verikit.Box.linf_ball(x, 0.03), verikit.Spec.robustness(y, 10)
    variants = {
        "highs": {"wrapped": ("_run_highs", ms._run_highs), "plain": ("_run_highs", lambda h: h.run())},
        "gurobi": {"wrapped": ("_optimize_interruptible", ms._optimize_interruptible),
                   "plain": ("_optimize_interruptible", lambda m: m.optimize())},
    }
    for solver in args.solvers.split(","):
        times = {"wrapped": [], "plain": []}
        for _ in range(args.rounds):
            for name, (attr, fn) in variants[solver].items():
                setattr(ms, attr, fn)
                t0 = time.perf_counter()
                res = get_domain("milp", solver=solver, time_limit=30).bound(graph, box, spec)
                times[name].append(time.perf_counter() - t0)
        setattr(ms, *variants[solver]["wrapped"])
        w, p = times["wrapped"], times["plain"]
        print(f"{solver}: wrapped median {statistics.median(w):.3f} s, plain {statistics.median(p):.3f} s, "
              f"ratio {statistics.median(w) / statistics.median(p):.3f} (minima: {min(w) / min(p):.3f}); "
              f"{res.status.count('verified')} of 16 verified, solver {res.info['solver']}")


if __name__ == "__main__":
    main()
