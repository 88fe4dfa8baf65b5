"""How many torch threads should `verikit certify` use by default?

Runs the quick-start command (`verikit certify mnist-sabr-0.1 --eps 0.1 --domains box,crown,milp`)
as a fresh process per run with `--threads 1`, `2`, ... taking turns round by round, and prints
per setting the median certification time (the summary's total) and wall time, as ratios to
`--threads 1` measured in the same run.

    python benchmarks/bench_threads.py --rounds 5 --threads 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma list; the first is the baseline")
    ap.add_argument("--model", default="mnist-sabr-0.1")
    ap.add_argument("--domains", default="box,crown,milp")
    args = ap.parse_args()
    settings = [int(t) for t in args.threads.split(",")]
    exe = os.path.join(os.path.dirname(sys.executable), "verikit")
    work = {t: [] for t in settings}
    wall = {t: [] for t in settings}
    for r in range(args.rounds):
        for t in settings:
            t0 = time.perf_counter()
            p = subprocess.run([exe, "certify", args.model, "--eps", "0.1", "--domains", args.domains, "--threads",
                                str(t), "--json", "--quiet"], capture_output=True, text=True, check=True)
            wall[t].append(time.perf_counter() - t0)
            work[t].append(json.loads(p.stdout)["results"][0]["seconds"])
            print(f"round {r + 1} threads {t}: certification {work[t][-1]:.2f} s, wall {wall[t][-1]:.2f} s",
                  flush=True)
    base = settings[0]
    print(f"\n{'threads':>7} {'certify median [s]':>19} {'ratio':>6} {'wall median [s]':>16} {'ratio':>6}")
    for t in settings:
        mw, mt = statistics.median(work[t]), statistics.median(wall[t])
        print(f"{t:>7} {mw:>19.2f} {mw / statistics.median(work[base]):>6.2f} {mt:>16.2f} "
              f"{mt / statistics.median(wall[base]):>6.2f}")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
