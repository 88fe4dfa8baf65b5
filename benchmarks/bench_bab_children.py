"""Branch and bound's children refined only below their new split, against refining every layer.

A child differs from its parent only downstream of the ReLU it splits: the intermediate bounds
above keep the parent's (which a new back-substitution would reproduce), and the children of a
batch are refined in groups by the layer of their split (`alpha_beta.refinement_groups`). This
script runs the bab domain on robustness properties that CROWN leaves open, with that
(`DOWNSTREAM_ONLY = True`, the default) and with every intermediate layer re-computed for
every child (`False`), the two taking turns property by property, and prints per property and
mode the verdict, the sub-domains bounded and the sub-domains bounded per second of bounding,
then the ratio of the rates (the speed-up of the search; its verdicts must agree).

Nets: the MNIST 9x200 MLP of bench_vs_lirpa.py (trained there, cached) and the shipped
cnn-small `mnist-sabr-0.1`.

    python benchmarks/bench_bab_children.py [--timeout 20] [--images 0,3] [--nets mlp9x200] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# net -> (eps, test images whose property CROWN leaves open and bab works on for a while)
CASES = {"mlp9x200": (0.035, (0, 3)), "mnist-sabr-0.1": (0.15, (2,))}


def _load(name: str, cache: str):
    import verikit

    if name == "mlp9x200":
        from bench_vs_lirpa import build_net

        net, shape, _, x, y = build_net(name, cache)
        return verikit.from_torch(net, shape), x, y
    from verikit.certify.model import load_model
    from verikit.datasets import load_mnist

    model = load_model(name)
    x, y = load_mnist("test")
    return model.graph, x[:64].to(model.graph.dtype), y[:64]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=20.0, help="seconds of bab per property and mode")
    p.add_argument("--images", default=None, help="test images (comma list) for every net (default: CASES)")
    p.add_argument("--nets", default=",".join(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "verikit-bench"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from verikit import Box, Spec
    from verikit.domains import alpha_beta, bab, get_domain

    counted = {"n": 0, "t": 0.0}
    bound = bab.bound_subdomains

    def timed(*a, **k):  # sub-domains bounded and the time spent bounding them
        t0 = time.perf_counter()
        out = bound(*a, **k)
        counted["t"] += time.perf_counter() - t0
        counted["n"] += a[1].inputs.lo.shape[0]
        return out

    bab.bound_subdomains = timed
    ratios, disagreements = [], 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), bab timeout {args.timeout} s per run")
    print(f"{'net':16s} {'img':>3s} {'eps':>6s} {'mode':9s} {'verdict':9s} {'sub-domains':>11s} {'per s':>7s}")
    for name in args.nets.split(","):
        graph, x, y = _load(name, args.cache)
        eps, images = CASES[name]
        for i in ([int(s) for s in args.images.split(",")] if args.images else images):
            box, spec = Box.linf_ball(x[i:i + 1], eps), Spec.robustness(y[i:i + 1], 10)
            rates, verdicts, sizes = {}, {}, {}
            for mode in ("downstream", "all"):
                alpha_beta.DOWNSTREAM_ONLY = mode == "downstream"
                counted.update(n=0, t=0.0)
                res = get_domain("bab", input_split=False, timeout=args.timeout).bound(graph, box, spec)
                rates[mode] = counted["n"] / max(counted["t"], 1e-9)
                verdicts[mode], sizes[mode] = res.status[0], counted["n"]
                print(f"{name:16s} {i:3d} {eps:6.3f} {mode:9s} {res.status[0]:9s} {counted['n']:11d} {rates[mode]:7.1f}",
                      flush=True)
            alpha_beta.DOWNSTREAM_ONLY = True
            decided = {v for v in verdicts.values() if v != "unknown"}
            disagreements += len(decided) > 1
            if min(sizes.values()) > 10:  # properties the search worked on
                ratios.append(rates["downstream"] / rates["all"])
    bab.bound_subdomains = bound
    if ratios:
        print(f"\nsub-domains per second, downstream-only / every layer: median x{statistics.median(ratios):.2f} "
              f"(min x{min(ratios):.2f}, max x{max(ratios):.2f}, {len(ratios)} properties)")
    print(f"contradicting verdicts: {disagreements} (must be 0)")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
