"""bab on Sigmoid/Tanh MNIST MLPs (784 inputs, so no input splitting): CROWN vs alpha-CROWN vs
bab with splits of the neurons' input intervals (domains/bab_activation_split.py), in one run.

Trains a small MLP per activation on the bundled MNIST data (seeded, a few seconds), then asks
the robustness property of the first `--images` correctly classified test images at each eps.
Prints per (activation, eps) the samples verified by each method, what bab falsified (with a
re-checked counterexample) and left unknown, the time per sample, and the number of
contradictions (a sample verified by one method and falsified by another: must be 0).

    python benchmarks/bench_genbab.py [--threads 1] [--images 20] [--timeout 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def train_mlp(act, hidden, seed, epochs, train_images):
    from verikit.datasets import load_mnist

    x, y = load_mnist("train")
    x, y = x[:train_images].reshape(train_images, -1), y[:train_images]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, hidden), act(), torch.nn.Linear(hidden, hidden), act(),
                                torch.nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for i in torch.randperm(train_images).split(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model.eval()


def main(argv=None):
    from verikit.bounds import Box
    from verikit.datasets import load_mnist
    from verikit.domains import get_domain
    from verikit.spec import Spec
    from verikit.torch_import import from_torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--timeout", type=float, default=10.0, help="bab seconds per sample")
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--eps", default="0.01,0.02,0.03")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    eps_list = [float(e) for e in args.eps.split(",")]
    xt, yt = load_mnist("test")
    xt = xt.reshape(len(xt), -1)
    print(f"{'act':8s} {'eps':>5s} {'n':>3s} {'crown':>5s} {'alpha':>5s} {'bab ver':>7s} {'bab fals':>8s} "
          f"{'bab unk':>7s} {'crown s':>7s} {'alpha s':>7s} {'bab s':>6s} {'contra':>6s}")
    contradictions = 0
    for name, act in (("sigmoid", torch.nn.Sigmoid), ("tanh", torch.nn.Tanh)):
        model = train_mlp(act, args.hidden, 0, 2, 10_000)
        graph = from_torch(model, (784,))
        with torch.no_grad():
            right = (graph.forward(xt[:200]).argmax(1) == yt[:200]).nonzero().flatten()[: args.images]
        for eps in eps_list:
            counts = dict(crown=0, alpha=0, ver=0, fals=0, unk=0)
            times = dict(crown=[], alpha=[], bab=[])
            for i in right.tolist():
                x = xt[i:i + 1]
                box = Box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
                spec = Spec.robustness(yt[i:i + 1], 10)
                verdicts = set()
                for key, domain in (("crown", get_domain("crown")), ("alpha", get_domain("crown", alpha_steps=20))):
                    t0 = time.perf_counter()
                    ok = bool(spec.holds_given_lower(domain.bound(graph, box, spec).lower)[0])
                    times[key].append(time.perf_counter() - t0)
                    counts[key] += int(ok)
                    verdicts |= {"verified"} if ok else set()
                t0 = time.perf_counter()
                res = get_domain("bab", timeout=args.timeout).bound(graph, box, spec)
                times["bab"].append(time.perf_counter() - t0)
                status = res.status[0]
                counts[{"verified": "ver", "falsified": "fals"}.get(status, "unk")] += 1
                verdicts.add(status)
                contradictions += int({"verified", "falsified"} <= verdicts)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:8s} {eps:5.3f} {len(right):3d} {counts['crown']:5d} {counts['alpha']:5d} {counts['ver']:7d} "
                  f"{counts['fals']:8d} {counts['unk']:7d} {med['crown']:7.2f} {med['alpha']:7.2f} {med['bab']:6.2f} "
                  f"{contradictions:6d}", flush=True)
    return 1 if contradictions else 0


if __name__ == "__main__":
    sys.exit(main())
