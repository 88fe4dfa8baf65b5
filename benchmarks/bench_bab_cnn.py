"""Complete verification of CNNs: crown vs milp vs bab on VNN-LIB robustness properties.

Properties: L-inf balls of radius eps around the first test images of MNIST (correctly
classified ones), written as VNN-LIB (the unsafe region: some other logit >= the label's), for
- the shipped cnn-small models (`verikit models`: mnist-sabr-0.1, mnist-ibp-0.1), and
- a plainly trained (no certified training) CNN7-shaped net: models.architectures.cnn7 at a
  small width, trained for a few epochs on a slice of MNIST, exported to ONNX.
Each property runs through `certify.vnn.check_property` (PGD attack first, answers re-checked
with onnxruntime) with the chains box,crown / box,crown,milp / box,crown,bab, and the script
prints per model and eps the counts holds / violated / unknown and the median time.

    python benchmarks/bench_bab_cnn.py [--images 4] [--timeout 30] [--threads 1]
        [--eps-robust 0.1,0.2,0.3] [--eps-plain 0.01,0.02,0.04] [--cnn7-width 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # shared test helpers

CHAINS = {"crown": ["box", "crown"], "milp": ["box", "crown", "milp"], "bab": ["box", "crown", "bab"]}


def vnnlib_text(x: np.ndarray, eps: float, label: int, n_out: int) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(x.size)] + [f"(declare-const Y_{j} Real)" for j in range(n_out)]
    for i, v in enumerate(x.reshape(-1)):
        lines.append(f"(assert (>= X_{i} {max(0.0, float(v) - eps)!r}))")
        lines.append(f"(assert (<= X_{i} {min(1.0, float(v) + eps)!r}))")
    others = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(n_out) if j != label)
    lines.append(f"(assert (or {others}))")
    return "\n".join(lines) + "\n"


def train_cnn7(path: str, width: int, n_train: int = 3000, epochs: int = 3, seed: int = 0) -> str:
    from torch import nn

    from certify_tiny_model import fit_on_mnist
    from verikit.models.architectures import cnn7

    torch.manual_seed(seed)
    net = fit_on_mnist(nn.Sequential(*cnn7((1, 28, 28), 10, width=width, linear=4 * width)), n_train, epochs)
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), path, dynamo=False, input_names=["input"],
                      output_names=["logits"])
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eps-robust", default="0.1,0.2,0.3")
    p.add_argument("--eps-plain", default="0.01,0.02,0.04")
    p.add_argument("--cnn7-width", type=int, default=8)
    p.add_argument("--methods", default="crown,milp,bab")
    p.add_argument("--models", default="mnist-sabr-0.1,mnist-ibp-0.1,cnn7")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from verikit.certify.chain import ChainConfig
    from verikit.certify.model import load_model
    from verikit.certify.vnn import check_property
    from verikit.certify.vnnlib import parse_vnnlib
    from verikit.datasets import load_mnist

    tmp = tempfile.mkdtemp(prefix="bench_bab_cnn_")
    xs, ys = load_mnist("test")
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    print(f"{'model':16s} {'eps':>6s} {'method':6s} {'holds':>5s} {'viol':>4s} {'unkn':>4s} {'median_s':>8s}", flush=True)
    for name in [m for m in args.models.split(",") if m]:
        path = train_cnn7(os.path.join(tmp, "cnn7.onnx"), args.cnn7_width) if name == "cnn7" else name
        model = load_model(path)
        eps_list = [float(e) for e in (args.eps_plain if name == "cnn7" else args.eps_robust).split(",")]
        with torch.no_grad():
            pred = model.graph.forward(xs[:200].to(model.graph.dtype)).argmax(1)
        picked = [i for i in range(200) if int(pred[i]) == int(ys[i])][: args.images]
        for eps in eps_list:
            props = [parse_vnnlib(vnnlib_text(xs[i].numpy(), eps, int(ys[i]), 10)) for i in picked]
            for method in methods:
                cfg = ChainConfig(CHAINS[method], {}, timeout=args.timeout, onnx_path=model.path,
                                  onnx_input=model.onnx_input, attack_steps=50, attack_restarts=10)
                counts = {"holds": 0, "violated": 0, "unknown": 0}
                times = []
                for prop in props:
                    t0 = time.perf_counter()
                    res = check_property(model, prop, cfg)
                    times.append(time.perf_counter() - t0)
                    counts[res.answer] += 1
                rows.append((name, eps, method, counts, float(np.median(times))))
                print(f"{name:16s} {eps:6.3f} {method:6s} {counts['holds']:5d} {counts['violated']:4d} "
                      f"{counts['unknown']:4d} {rows[-1][4]:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
