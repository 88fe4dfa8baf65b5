"""Scaling out: `certify` with 1 and 2 local Ray workers, and 2-process DDP vs 1 process.

    python benchmarks/bench_scale.py [--samples 64] [--repeats 1] [--gpu]

1. `verikit certify` on the same samples (shipped mnist-ibp-0.1, eps 0.15, box,deeppoly,crown,
   batch 4) serially and with --workers 2, each in a fresh process; wall time of the whole
   command (Ray start-up included) and the work alone (the summary's sum of per-sample times
   is not wall time, so the work is timed from the first to the last record written).
2. `verikit train` (CNN7 with BatchNorm, SABR, the same global batch) in one process and with
   `torchrun --nproc-per-node 2`; the training seconds of the epoch from metrics.csv.
With --gpu (and CUDA present) also certify with 1 and 2 GPU workers (--gpus-per-worker 1 / 0.5).
Ratios are to the baseline measured in the same run; ideal for 2 workers on 2 cores: 2x.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def _certify(out_dir, samples, extra, tag):
    out = os.path.join(out_dir, f"{tag}.jsonl")
    cmd = [PY, "-m", "verikit", "certify", "mnist-ibp-0.1", "--eps", "0.15", "--num-samples", str(samples),
           "--batch-size", "4", "--domains", "box,deeppoly,crown", "--threads", "1", "-q", "-o", out, *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_certify(samples, repeats, gpu):
    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    configs = [("1 process", []), ("2 Ray workers", ["--workers", "2"])]
    if gpu:
        configs += [("1 GPU worker", ["--workers", "1", "--gpus-per-worker", "1"]),
                    ("2 GPU workers", ["--workers", "2", "--gpus-per-worker", "0.5"])]
    full = {name: [] for name, _ in configs}
    start = {name: [] for name, _ in configs}  # one batch: the start-up (Ray, workers, model loads)
    for r in range(repeats):
        for name, extra in configs:
            tag = f"{name.replace(' ', '_')}-{r}"
            full[name].append(_certify(tmp, samples, extra, tag))
            start[name].append(_certify(tmp, 4, extra, tag + "-startup"))
    med = lambda d, n: statistics.median(d[n])
    base_wall = med(full, "1 process")
    base_work = base_wall - med(start, "1 process")
    print(f"certify {samples} MNIST samples (mnist-ibp-0.1, eps 0.15, box,deeppoly,crown, batch 4), median of "
          f"{repeats}; work = wall - wall of a 4-sample run (start-up):")
    for name, _ in configs:
        wall, work = med(full, name), med(full, name) - med(start, name)
        print(f"  {name:<14} wall {wall:6.1f} s (x{base_wall / wall:.2f})   start-up {med(start, name):5.1f} s   "
              f"work {work:6.1f} s (x{base_work / max(work, 1e-9):.2f})")
    shutil.rmtree(tmp, ignore_errors=True)


def _train(out, torchrun, steps_samples, batch):
    args = ["--model", "cnn7", "--train-samples", str(steps_samples), "--batch-size", str(batch), "--eval-samples", "8",
            "--epochs", "2", "--warmup-epochs", "1", "--ramp-epochs", "1", "--eps", "0.1", "--threads", "1",
            "--quiet", "--checkpoint-minutes", "0", "--out", out]
    cmd = ([PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else [PY]) + \
        ["-m", "verikit.train", *args]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["time_s"])  # the SABR epoch (epoch 1 is clean warm-up)


def bench_ddp(samples, batch, repeats):
    tmp = tempfile.mkdtemp(prefix="bench_ddp_")
    one, two = [], []
    for r in range(repeats):
        one.append(_train(os.path.join(tmp, f"one{r}"), False, samples, batch))
        two.append(_train(os.path.join(tmp, f"two{r}"), True, samples, batch))
    a, b = statistics.median(one), statistics.median(two)
    print(f"SABR epoch of CNN7 (BatchNorm) on {samples} MNIST images, global batch {batch}, median of {repeats}:")
    print(f"  1 process      {a:7.1f} s")
    print(f"  2 DDP (gloo)   {b:7.1f} s   speed-up x{a / b:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--train-samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="also time GPU workers (needs CUDA)")
    a = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at the start")
    bench_certify(a.samples, a.repeats, a.gpu)
    bench_ddp(a.train_samples, a.batch, a.repeats)


if __name__ == "__main__":
    main()
