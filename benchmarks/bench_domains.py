"""Seconds per sample, peak memory and tightness of box, deeppoly, crown and alpha-crown.

Nets: the VNN-COMP 2021 MNIST 256x2 MLP and a CNN7-shaped MNIST net (SABR's CNN7: conv
64,64,128,128,128 3x3, strides 1,1,2,1,1, each + BatchNorm + ReLU, linear 512 + BatchNorm +
ReLU, linear 10), trained here for a few steps (cached). Every (net, domain) pair runs in a
fresh subprocess so that its peak resident memory is its own.

    python benchmarks/bench_domains.py                       # both nets
    python benchmarks/bench_domains.py --nets mlp --samples 32

Reference (DESIGN.md, auto_LiRPA 0.3 CROWN on 2 threads): 256x2: 4.8 ms for 1 sample, 98 ms
for 32; CNN7: 46 s and 7.7 GB for one sample.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MLP_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
DOMAINS = {"box": ("box", {}), "deeppoly": ("deeppoly", {}), "crown": ("crown", {}), "alpha-crown": ("crown", None)}


def cnn7():
    from torch import nn

    layers, c = [], 1
    for co, s in [(64, 1), (64, 1), (128, 2), (128, 1), (128, 1)]:
        layers += [nn.Conv2d(c, co, 3, s, 1), nn.BatchNorm2d(co), nn.ReLU()]
        c = co
    layers += [nn.Flatten(), nn.Linear(128 * 14 * 14, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def trained_cnn7(cache_dir: str, steps: int):
    import torch
    import torch.nn.functional as F

    from verikit.datasets import load_mnist

    path = os.path.join(cache_dir, f"cnn7_{steps}.pt")
    net = cnn7()
    if os.path.exists(path):
        net.load_state_dict(torch.load(path))
    else:
        torch.manual_seed(0)
        x, y = load_mnist("train")
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(net.state_dict(), path)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def worker(args) -> None:
    import torch

    import verikit
    from verikit.datasets import load_mnist
    from verikit.domains import get_domain

    torch.set_num_threads(args.threads)
    if args.net == "mlp":
        graph = verikit.from_onnx(MLP_PATH)
        eps = args.eps_mlp
    else:
        graph = verikit.from_torch(trained_cnn7(args.cache, args.train_steps), (1, 28, 28))
        eps = args.eps_cnn
    x, y = load_mnist("test")
    n = args.samples
    x = x[:n].reshape((n,) + tuple(graph.input_shape))
    box = verikit.Box.linf_ball(x, eps)
    spec = verikit.Spec.robustness(y[:n], 10)
    name, opts = DOMAINS[args.domain]
    opts = {"alpha_steps": args.alpha_steps} if opts is None else opts
    domain = get_domain(name, **opts)
    # warm-up on a point (every neuron stable: cheap) to pay first-call overheads outside the timing
    domain.bound(graph, verikit.Box(x[:1], x[:1]), spec.select(slice(0, 1)))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = domain.bound(graph, box, spec)
    seconds = time.perf_counter() - t0
    margin = spec.margin(res.lower.detach())
    print(json.dumps({"s_per_sample": seconds / n, "seconds": seconds, "mean_worst_margin": margin.mean().item(),
                      "verified": int((margin > 0).sum()), "samples": n, "eps": eps,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      "base_rss_gb": base_rss / 1e6}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", default="mlp,cnn7")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--samples", type=int, default=None, help="samples per net (default: 32 for mlp, 1 for cnn7)")
    p.add_argument("--eps-mlp", type=float, default=0.02)
    p.add_argument("--eps-cnn", type=float, default=0.002)
    p.add_argument("--alpha-steps", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=60, help="plain training steps for the CNN7 net")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per (net, domain) run")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--net", help=argparse.SUPPRESS)
    p.add_argument("--domain", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for net in args.nets.split(","):
        if net == "mlp" and not os.path.exists(MLP_PATH):
            print(f"skipping mlp: {MLP_PATH} not found")
            continue
        samples = args.samples or (32 if net == "mlp" else 1)
        if net == "cnn7":
            trained_cnn7(args.cache, args.train_steps)  # train once, outside the timed runs
        for dom in args.domains.split(","):
            cmd = [sys.executable, __file__, "--worker", "--net", net, "--domain", dom, "--samples", str(samples),
                   "--eps-mlp", str(args.eps_mlp), "--eps-cnn", str(args.eps_cnn), "--alpha-steps", str(args.alpha_steps),
                   "--train-steps", str(args.train_steps), "--threads", str(args.threads), "--cache", args.cache]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if out.returncode != 0:
                    raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
                r = json.loads(out.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                r = {"error": f"timeout {args.timeout:.0f}s"}
            except Exception as e:  # report and go on with the other domains
                r = {"error": str(e)}
            r.update(net=net, domain=dom)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(f"{'net':6} {'domain':12} {'samples':>7} {'eps':>6} {'s/sample':>10} {'mean worst-margin LB':>21} {'verified':>8} {'peak RSS GB':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['net']:6} {r['domain']:12} {r['error']}")
            continue
        print(f"{r['net']:6} {r['domain']:12} {r['samples']:7d} {r['eps']:6.3f} {r['s_per_sample']:10.4f} "
              f"{r['mean_worst_margin']:21.4f} {r['verified']:8d} {r['peak_rss_gb']:11.2f}")


if __name__ == "__main__":
    main()
