"""Input splitting (domains/bab_input.py, no MILP at all) against the milp path, side by side
in the same run, on the ACAS-Xu instances of shared/vnncomp2021/ (or any benchmark there).

Per instance: the expected answer, each path's answer and time; then per path solved /
wrong / unknown and the median time, and the ratio of the medians (input split / milp).
Every "violated" answer's counterexample is re-checked with onnxruntime against the VNN-LIB
property (bench_vnncomp.check_counterexample) before it counts as correct.

    python benchmarks/bench_input_split.py [--only acasxu] [--time-limit S] [--threads 1]
        [--milp-solver auto|highs|gurobi] [--batch-size N] [--alpha-steps N] [--no-milp]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_vnncomp import DEFAULT_DIR, check_counterexample  # noqa: E402


def _score(ans, expected, onnx_path, graph, prop) -> str:
    if ans.answer == "unknown":
        return "unknown"
    ok = ans.answer == expected
    if ok and ans.answer == "violated":
        ok = check_counterexample(onnx_path, graph, prop, ans.case, ans.counterexample)
    return "correct" if ok else "wrong"


def main(argv=None):
    from verikit.certify.vnnlib import load_vnnlib
    from verikit.domains.bab_input import InputSplitOptions, verify_vnnlib_by_input_split
    from verikit.domains.vnnlib_verify import verify_vnnlib
    from verikit.onnx_import import from_onnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--only", default="acasxu", help="comma-separated benchmark names")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per instance (default: the CSV's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--milp-solver", default="auto", choices=["auto", "highs", "gurobi"])
    p.add_argument("--batch-size", type=int, default=InputSplitOptions.batch_size)
    p.add_argument("--alpha-steps", type=int, default=InputSplitOptions.alpha_steps)
    p.add_argument("--no-milp", action="store_true", help="run the input-split path only")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    only = {b for b in args.only.split(",") if b}
    with open(os.path.join(args.dir, "instances.csv")) as f:
        rows = [r for r in csv.DictReader(f) if not only or r["benchmark"] in only]
    opts = InputSplitOptions(batch_size=args.batch_size, alpha_steps=args.alpha_steps)
    paths = ["split"] + ([] if args.no_milp else ["milp"])
    times = {k: [] for k in paths}
    counts = {k: {"correct": 0, "wrong": 0, "unknown": 0} for k in paths}
    print(f"{'onnx':34s} {'vnnlib':16s} {'expected':8s} {'split':8s} {'time_s':>7s} {'boxes':>7s} {'depth':>5s}"
          + ("" if args.no_milp else f" {'milp':8s} {'time_s':>7s}"))
    for r in rows:
        onnx_path = os.path.join(args.dir, r["benchmark"], r["onnx"])
        graph = from_onnx(onnx_path)
        prop = load_vnnlib(os.path.join(args.dir, r["benchmark"], r["vnnlib"]))
        limit = float(r["timeout_s"]) if args.time_limit is None else args.time_limit
        line = f"{r['onnx'][:34]:34s} {r['vnnlib'][:16]:16s} {r['expected']:8s}"
        for path in paths:
            t0 = time.perf_counter()
            if path == "split":
                ans = verify_vnnlib_by_input_split(graph, prop, limit, opts)
            else:
                ans = verify_vnnlib(graph, prop, time_limit=limit, solver=args.milp_solver, tighten="lp",
                                    tighten_time=20.0, threads=args.threads)
            dt = time.perf_counter() - t0
            verdict = _score(ans, r["expected"], onnx_path, graph, prop)
            counts[path][verdict] += 1
            times[path].append(dt)
            mark = " WRONG" if verdict == "wrong" else ""
            line += f" {ans.answer:8s} {dt:7.2f}" + (f" {ans.visited:7d} {ans.depth:5d}" if path == "split" else "") + mark
        print(line, flush=True)
    print()
    for path in paths:
        c = counts[path]
        print(f"{path:5s}: solved {c['correct'] + c['wrong']}/{len(rows)}, wrong {c['wrong']}, unknown {c['unknown']}, "
              f"median {statistics.median(times[path]):.2f} s, total {sum(times[path]):.1f} s")
    if not args.no_milp:
        ratio = statistics.median(times["split"]) / max(statistics.median(times["milp"]), 1e-9)
        print(f"median time ratio split / milp: {ratio:.2f} (threads {args.threads}; timings on a shared machine)")
    return 1 if any(c["wrong"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
