"""Run the milp domain and/or the bab domain over the public VNN-COMP 2021 instances in
shared/vnncomp2021/ (`--method milp|bab|both`; both: side by side on every instance).

bab runs the chain box,crown,bab with the PGD attack first (`certify.vnn.check_property`, what
`verikit vnncomp` runs by default); milp runs `verify_vnnlib` (attack, optional --pre, MILP).

Prints per instance the answer, the expected answer, the time and the solver used, then a
summary (solved / correct / wrong / unknown). Every "violated" answer's counterexample is
re-checked with onnxruntime against the VNN-LIB property (inside the input box, and violating
the output condition) before it counts as correct.

    python benchmarks/bench_vnncomp.py [--time-limit S] [--solver auto|highs|gurobi]
        [--tighten off|lp|milp] [--tighten-time S] [--pre crown] [--no-attack]
        [--only acasxu,test] [--max N] [--method milp|bab|both] [--bab-option KEY=VALUE ...]
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


def run_bab(root, row, args):
    """The default complete chain (box,crown,bab after the attack) on one instance."""
    import json

    from verikit.certify.chain import ChainConfig
    from verikit.certify.model import load_model
    from verikit.certify.vnn import check_property
    from verikit.certify.vnnlib import load_vnnlib

    onnx_path = os.path.join(root, row["benchmark"], row["onnx"])
    model = load_model(onnx_path)
    prop = load_vnnlib(os.path.join(root, row["benchmark"], row["vnnlib"]))
    limit = float(row["timeout_s"]) if args.time_limit is None else args.time_limit
    opts = {}
    for item in args.bab_option:
        k, _, v = item.partition("=")
        try:
            opts[k] = json.loads(v)
        except ValueError:
            opts[k] = v
    cfg = ChainConfig(["box", "crown", "bab"], {"bab": opts}, timeout=limit, onnx_path=onnx_path,
                      onnx_input=model.onnx_input)
    res = check_property(model, prop, cfg)
    answer = type("Answer", (), {})()
    answer.answer, answer.by, answer.solvers = res.answer, {b for b in res.by if b}, set()
    cex_ok = None
    if res.answer == "violated":
        cex_ok = check_counterexample(onnx_path, model.graph, prop, _case_of(prop, res.x), torch.tensor(res.x))
    return answer, cex_ok


def _case_of(prop, x) -> int:
    for k, case in enumerate(prop.cases):
        if case.contains(np.asarray(x, dtype=np.float64)):
            return k
    return 0


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
    p.add_argument("--method", default="milp", choices=["milp", "bab", "both"])
    p.add_argument("--bab-option", action="append", default=[], help="bab option KEY=VALUE (repeatable)")
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
    methods = ["milp", "bab"] if args.method == "both" else [args.method]
    runners = {"milp": run_instance, "bab": run_bab}
    stats: dict = {}  # (method, benchmark) -> {solved, wrong, unknown, times}
    hard: set = set()  # (benchmark, onnx, vnnlib) that some method's complete step had to decide
    seconds: dict = {}  # (method, benchmark, onnx, vnnlib) -> time
    print(f"{'method':6s} {'benchmark':8s} {'onnx':34s} {'vnnlib':22s} {'expected':8s} {'answer':8s} {'time_s':>7s} "
          "decided-by solver")
    for r in picked:
        for method in methods:
            t0 = time.perf_counter()
            ans, cex_ok = runners[method](args.dir, r, args)
            dt = time.perf_counter() - t0
            st = stats.setdefault((method, r["benchmark"]), dict(solved=0, wrong=0, unknown=0, times=[]))
            st["times"].append(dt)
            # instances that needed the complete step (not settled by the attack or an incomplete domain)
            if ans.answer == "unknown" or set(ans.by) & {"milp", "bab"}:
                hard.add((r["benchmark"], r["onnx"], r["vnnlib"]))
            seconds[(method, r["benchmark"], r["onnx"], r["vnnlib"])] = dt
            verdict = ""
            if ans.answer == "unknown":
                st["unknown"] += 1
            else:
                right = ans.answer == r["expected"] and (cex_ok is not False)
                st["solved" if right else "wrong"] += 1
                verdict = "" if right else "  <-- WRONG" + (" (counterexample failed re-check)" if cex_ok is False else "")
            print(f"{method:6s} {r['benchmark']:8s} {r['onnx'][:34]:34s} {r['vnnlib'][:22]:22s} {r['expected']:8s} "
                  f"{ans.answer:8s} {dt:7.2f} {','.join(sorted(ans.by)) or '-':10s} "
                  f"{','.join(sorted(ans.solvers)) or '-'}{verdict}", flush=True)
    print(f"\n{'method':6s} {'benchmark':8s} {'n':>3s} {'solved':>6s} {'wrong':>5s} {'unknown':>7s} {'median_s':>8s}")
    wrong = 0
    for (method, bench), st in sorted(stats.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        wrong += st["wrong"]
        print(f"{method:6s} {bench:8s} {len(st['times']):3d} {st['solved']:6d} {st['wrong']:5d} {st['unknown']:7d} "
              f"{float(np.median(st['times'])):8.2f}")
    medians = {}
    for (method, bench) in sorted(stats):
        times = [seconds[(method,) + h] for h in sorted(hard) if h[0] == bench and (method,) + h in seconds]
        if times:
            medians[(method, bench)] = float(np.median(times))
            print(f"{method:6s} {bench:8s} complete step needed on {len(times)}: median {medians[(method, bench)]:.2f} s")
    for (method, bench), med in sorted(medians.items()):
        if method == "bab" and ("milp", bench) in medians:
            print(f"{bench}: bab / milp median ratio, all instances "
                  f"{np.median(stats[('bab', bench)]['times']) / np.median(stats[('milp', bench)]['times']):.2f}, "
                  f"where the complete step was needed {med / medians[('milp', bench)]:.2f}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
