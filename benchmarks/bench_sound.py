"""What the float-sound mode costs: time and bound looseness of box, deeppoly and crown with
`sound=True` against the normal mode, on MNIST networks, measured in the same run.

Per model and domain it prints the seconds of one bound call in each mode (the minimum over
`--rounds` rounds, the two modes taking turns), their ratio, the mean lower bound of the spec
rows (robustness margins) in each mode, how much looser the sound bound is (mean and largest
difference, and the difference as a fraction of the bound's width upper - lower), the samples
verified in each mode, and the cost of the normal mode's verdict guard relative to its bound.

    python benchmarks/bench_sound.py [--samples 32] [--rounds 3] [--threads 1] [--models tiny,256x2,sabr]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))
MODELS = {
    "tiny": (os.path.join(HERE, "..", "tests", "data", "tiny_mnist_mlp.onnx"), 0.03),
    "256x2": (os.path.join(SHARED, "vnncomp2021", "mnistfc", "mnist-net_256x2.onnx"), 0.03),
    "sabr": ("mnist-sabr-0.1", 0.1),
}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_model(label, model, eps, samples, rounds, domains):
    from verikit import Box, Spec
    from verikit.certify.model import load_model
    from verikit.datasets import load_mnist
    from verikit.domains import get_domain

    graph = load_model(model).graph
    x, y = load_mnist("test")
    x, y = x[:samples].reshape((samples,) + tuple(graph.input_shape)), y[:samples]
    keep = graph.forward(x).argmax(1) == y
    x, y = x[keep], y[keep]
    box, spec = Box.linf_ball(x, eps), Spec.robustness(y, 10)
    rows = []
    for name in domains:
        times = {False: [], True: []}
        results = {}
        for _ in range(rounds):
            for sound in (False, True):  # interleaved: both modes see the same machine load
                dt, res = _timed(lambda: get_domain(name, sound=sound).bound(graph, box, spec))
                times[sound].append(dt)
                results[sound] = res
        normal, sound = results[False], results[True]
        guard_t, verified_normal = _timed(lambda: normal.verified(spec))
        verified_sound = sound.verified(spec)
        lo_n, lo_s = spec.margin(normal.lower.double()), spec.margin(sound.lower.double())
        diff = (normal.lower.double() - sound.lower.double())
        width = (normal.upper.double() - normal.lower.double()).clamp(min=1e-12)
        rows.append(dict(model=label, domain=name, n=len(y), t_normal=min(times[False]), t_sound=min(times[True]),
                         margin_normal=float(lo_n.mean()), margin_sound=float(lo_s.mean()),
                         loose_mean=float(diff.mean()), loose_max=float(diff.max()),
                         loose_rel=float((diff / width).mean()),
                         verified_normal=int(verified_normal.sum()), verified_sound=int(verified_sound.sum()),
                         guard=guard_t / min(times[False])))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="tiny,256x2,sabr")
    p.add_argument("--domains", default="box,deeppoly,crown")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'model':6s} {'domain':8s} {'n':>3s} {'normal s':>9s} {'sound s':>9s} {'ratio':>6s} "
          f"{'margin normal':>13s} {'margin sound':>12s} {'looser mean':>11s} {'max':>9s} {'/width':>8s} "
          f"{'verified n/s':>12s} {'guard/bound':>11s}")
    for label in [m for m in args.models.split(",") if m]:
        model, eps = MODELS[label]
        if model.endswith(".onnx") and not os.path.exists(model):
            print(f"{label}: {model} not found, skipped")
            continue
        for r in bench_model(label, model, eps, args.samples, args.rounds, args.domains.split(",")):
            print(f"{r['model']:6s} {r['domain']:8s} {r['n']:3d} {r['t_normal']:9.4f} {r['t_sound']:9.4f} "
                  f"{r['t_sound'] / r['t_normal']:6.2f} {r['margin_normal']:13.5f} {r['margin_sound']:12.5f} "
                  f"{r['loose_mean']:11.2e} {r['loose_max']:9.2e} {r['loose_rel']:8.2e} "
                  f"{r['verified_normal']:5d}/{r['verified_sound']:<6d} {r['guard']:11.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
