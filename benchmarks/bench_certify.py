"""Certify the first N MNIST test images of a small trained model at one eps with growing
domain chains (box; box,deeppoly; box,crown; box,crown,milp) and print certified accuracy and
seconds per sample for each chain in one table. Chains with an unregistered domain are skipped.

    python benchmarks/bench_certify.py [--model PATH|NAME] [--eps 0.02] [--num-samples 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from verikit.certify.chain import ChainConfig
from verikit.certify.model import load_model
from verikit.certify.records import RecordWriter
from verikit.certify.report import summarize
from verikit.certify.robustness import certify_samples
from verikit.datasets import load_mnist
from verikit.domains import available_domains

CHAINS = ["box", "box,deeppoly", "box,crown", "box,crown,milp"]
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "tests", "data", "tiny_mnist_mlp.onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="ONNX file or shipped model name (default: tiny test MLP)")
    ap.add_argument("--eps", type=float, default=0.03)
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per sample")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    x, y = load_mnist("test")
    x = x.reshape((x.shape[0],) + tuple(model.graph.input_shape))
    idx = list(range(args.num_samples))
    avail = available_domains()
    print(f"model {os.path.relpath(model.path)}, eps {args.eps:g}, first {args.num_samples} MNIST test images, "
          f"attack + chain, timeout {args.timeout:g} s/sample, {torch.get_num_threads()} thread(s)")
    print(f"{'chain':<18} {'cert.acc':>8} {'falsified':>9} {'unknown':>7} {'s/sample':>9} {'vs box':>7}")
    base = None
    for chain in CHAINS:
        missing = [d for d in chain.split(",") if d not in avail]
        if missing:
            print(f"{chain:<18} skipped: domain(s) {', '.join(missing)} not registered")
            continue
        cfg = ChainConfig(domains=chain.split(","), timeout=args.timeout, onnx_path=model.path)
        writer = RecordWriter(None)
        t0 = time.perf_counter()
        certify_samples(model, x, y, idx, [args.eps], cfg, writer)
        sec = (time.perf_counter() - t0) / len(idx)
        (s,) = summarize(writer.records, ["attack"] + cfg.domains)
        base = base or sec
        print(f"{chain:<18} {100 * s['certified_accuracy']:>7.1f}% {s['falsified']:>9} {s['unknown']:>7} "
              f"{sec:>9.4f} {sec / base:>6.1f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
