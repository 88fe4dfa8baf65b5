"""Sigmoid/Tanh networks: CROWN against alpha-CROWN with optimised tangent points
(domains/s_shaped.py), and input splitting on low-dimensional Sigmoid MLPs, in the same run.

Part 1: random MLPs (784-100-100-10 shaped inputs replaced by a small `--inputs` dimension so
it runs on a laptop), robustness specs at the centre's own label; prints the mean lower bound
and the number of samples verified by each, and the time ratio.
Part 2: 2-input Sigmoid MLPs, threshold just below the grid minimum minus a Lipschitz slack
(so the property holds): is it verified by CROWN, alpha-CROWN, and input splitting?

    python benchmarks/bench_s_shaped.py [--threads 1] [--alpha-steps 20]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_milp import mlp  # noqa: E402  (the tests' seeded MLP builder)


def main(argv=None):
    from verikit.bounds import Box
    from verikit.domains import get_domain
    from verikit.domains.bab_input import input_split_search
    from verikit.spec import Spec
    from verikit.torch_import import from_torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--alpha-steps", type=int, default=20)
    p.add_argument("--inputs", type=int, default=20)
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    print("part 1: CROWN vs alpha-CROWN (tangent points optimised)")
    print(f"{'act':8s} {'eps':>5s} {'crown mean lb':>14s} {'alpha mean lb':>14s} {'crown ok':>8s} {'alpha ok':>8s} "
          f"{'time ratio':>10s}")
    for name, act in (("sigmoid", torch.nn.Sigmoid), ("tanh", torch.nn.Tanh)):
        graph = from_torch(mlp(0, [args.inputs, 64, 64, 10], act), (args.inputs,))
        x = torch.rand(args.samples, args.inputs, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            labels = graph.forward(x).argmax(1)
        spec = Spec.robustness(labels, 10)
        for eps in (0.05, 0.2, 0.5):
            box = Box(x - eps, x + eps)
            t0 = time.perf_counter()
            plain = get_domain("crown").bound(graph, box, spec)
            t1 = time.perf_counter()
            alpha = get_domain("crown", alpha_steps=args.alpha_steps).bound(graph, box, spec)
            t2 = time.perf_counter()
            print(f"{name:8s} {eps:5.2f} {float(plain.lower.mean()):14.4f} {float(alpha.lower.mean()):14.4f} "
                  f"{int(plain.verified(spec).sum()):8d} {int(alpha.verified(spec).sum()):8d} "
                  f"{(t2 - t1) / max(t1 - t0, 1e-9):10.1f}")

    print("\npart 2: 2-input Sigmoid MLPs (2-16-16-2), property holds by construction")
    decided, times = 0, []
    rows = []
    for seed in range(10):
        model = mlp(seed, [2, 16, 16, 2], torch.nn.Sigmoid)
        graph = from_torch(model, (2,))
        box = Box(torch.full((1, 2), -1.5), torch.full((1, 2), 1.5))
        c = torch.tensor([1.0, -1.0])
        k = 401
        g = torch.linspace(-1.5, 1.5, k)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        with torch.no_grad():
            vals = graph.forward(grid) @ c
        L = float(c.norm()) * 0.25 ** 2
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                L *= float(torch.linalg.matrix_norm(layer.weight.detach(), 2))
        slack = L * (3.0 / (k - 1)) * math.sqrt(2) / 2
        spec = Spec(c[None], torch.tensor([float(vals.min()) - slack - 0.01 * float(vals.max() - vals.min())]))
        crown_ok = bool(get_domain("crown").bound(graph, box, spec).verified(spec)[0])
        alpha_ok = bool(get_domain("crown", alpha_steps=args.alpha_steps).bound(graph, box, spec).verified(spec)[0])
        t0 = time.perf_counter()
        res = input_split_search(graph, spec, box, deadline=time.perf_counter() + 60)
        times.append(time.perf_counter() - t0)
        decided += res.status == "verified"
        rows.append((seed, crown_ok, alpha_ok, res.status, res.visited, times[-1]))
    print(f"{'seed':>4s} {'crown':>6s} {'alpha':>6s} {'split':>9s} {'boxes':>6s} {'time_s':>7s}")
    for seed, a, b, st, n, t in rows:
        print(f"{seed:4d} {str(a):>6s} {str(b):>6s} {st:>9s} {n:6d} {t:7.2f}")
    print(f"input splitting verified {decided}/10, median {statistics.median(times):.2f} s "
          f"(threads {args.threads}; timings on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
