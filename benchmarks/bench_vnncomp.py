"""Run the milp domain over the public VNN-COMP 2021 instances in shared/vnncomp2021/.

Prints per instance the answer, the expected answer, the time and the solver used, then a
summary (solved / correct / wrong / unknown). Every "violated" answer's counterexample is
re-checked with onnxruntime against the VNN-LIB property (inside the input box, and violating
the output condition) before it counts as correct.

    python benchmarks/bench_vnncomp.py [--time-limit S] [--solver auto|highs|gurobi]
        [--tighten off|lp|milp] [--tighten-time S] [--pre crown] [--no-attack]
        [--only acasxu,test] [--max N]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "vnncomp2021"))


def check_counterexample(onnx_path, graph, prop, case_idx, x) -> bool:
    """Independent check: x inside the case's box and onnxruntime's output violates the spec."""
    from verikit.onnx_check import evaluate_with_onnxruntime

    case = prop.cases[case_idx]
    flat = x.detach().double().reshape(-1).numpy()
    if np.any(flat < case.lo) or np.any(flat > case.hi):
        return False
    y = torch.from_numpy(evaluate_with_onnxruntime(onnx_path, x.reshape((1,) + tuple(graph.input_shape)), graph))
    return bool(case.spec.violated_by(y.double())[0])


def run_instance(root, row, args):
    from verikit.certify.vnnlib import load_vnnlib
    from verikit.domains.vnnlib_verify import verify_vnnlib
    from verikit.onnx_import import from_onnx

    onnx_path = os.path.join(root, row["benchmark"], row["onnx"])
    graph = from_onnx(onnx_path)
    prop = load_vnnlib(os.path.join(root, row["benchmark"], row["vnnlib"]))
    limit = float(row["timeout_s"]) if args.time_limit is None else args.time_limit
    ans = verify_vnnlib(graph, prop, time_limit=limit, pre=tuple(p for p in args.pre.split(",") if p),
                        solver=args.solver, tighten=args.tighten, tighten_time=args.tighten_time,
                        threads=args.threads, attack=not args.no_attack)
    cex_ok = None
    if ans.answer == "violated":
        cex_ok = check_counterexample(onnx_path, graph, prop, ans.case, ans.counterexample)
    return ans, cex_ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=DEFAULT_DIR)
    p.add_argument("--time-limit", type=float, default=None, help="seconds per instance (default: the instance's)")
    p.add_argument("--solver", default="auto", choices=["auto", "highs", "gurobi"])
    p.add_argument("--tighten", default="lp", choices=["off", "lp", "milp"])
    p.add_argument("--tighten-time", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pre", default="", help="incomplete domains to run first (e.g. crown)")
    p.add_argument("--no-attack", action="store_true", help="skip the PGD search before the MILP")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--max", type=int, default=0, help="at most this many instances per benchmark")
    args = p.parse_args(argv)
    warnings.simplefilter("once")
    torch.set_num_threads(max(1, args.threads))
    with open(os.path.join(args.dir, "instances.csv")) as f:
        rows = list(csv.DictReader(f))
    only = {b for b in args.only.split(",") if b}
    per_bench: dict = {}
    picked = []
    for r in rows:
        if only and r["benchmark"] not in only:
            continue
        per_bench[r["benchmark"]] = per_bench.get(r["benchmark"], 0) + 1
        if args.max and per_bench[r["benchmark"]] > args.max:
            continue
        picked.append(r)
    counts = dict(solved=0, correct=0, wrong=0, unknown=0)
    total_t = 0.0
    print(f"{'benchmark':8s} {'onnx':34s} {'vnnlib':22s} {'expected':8s} {'answer':8s} {'time_s':>7s} decided-by solver")
    for r in picked:
        t0 = time.perf_counter()
        ans, cex_ok = run_instance(args.dir, r, args)
        dt = time.perf_counter() - t0
        total_t += dt
        if ans.answer == "unknown":
            counts["unknown"] += 1
            verdict = ""
        else:
            counts["solved"] += 1
            right = ans.answer == r["expected"] and (cex_ok is not False)
            counts["correct" if right else "wrong"] += 1
            verdict = "" if right else "  <-- WRONG" + (" (counterexample failed re-check)" if cex_ok is False else "")
        print(f"{r['benchmark']:8s} {r['onnx'][:34]:34s} {r['vnnlib'][:22]:22s} {r['expected']:8s} {ans.answer:8s} "
              f"{dt:7.2f} {','.join(sorted(ans.by)) or '-':10s} {','.join(sorted(ans.solvers)) or '-'}{verdict}", flush=True)
    print(f"\n{len(picked)} instances: solved {counts['solved']}, correct {counts['correct']}, "
          f"wrong {counts['wrong']}, unknown {counts['unknown']}; total {total_t:.1f} s")
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
