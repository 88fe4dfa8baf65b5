"""The README's results table: standard, PGD and certified accuracy of the shipped SABR and IBP
models on the first N MNIST test images, certified with `box`, `box,crown` and `box,crown,milp`.

Per sample: a wrong clean prediction or a PGD counterexample means "not certified"; otherwise
box, then CROWN (given box's intermediate bounds), then MILP (given CROWN's) try to prove it.
MILP has a per-sample time limit; a timeout counts as NOT certified and is reported.

    python benchmarks/results_table.py --num 1000 --milp-time-limit 30 --out docs/results.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def run_model(name: str, n: int, eps: float, batch: int, milp_time: float, attack_steps: int, restarts: int,
              log, use_milp: bool = True) -> dict:
    import verikit
    from verikit.certify.attack import pgd_attack
    from verikit.domains import available_domains, get_domain
    from verikit.models.zoo import shipped_model_path

    path = shipped_model_path(name) or name
    graph = verikit.from_onnx(path)
    from verikit.datasets import load_mnist

    x_all, y_all = load_mnist("test")
    x_all, y_all = x_all[:n], y_all[:n]
    have = available_domains()
    box = get_domain("box")
    crown = get_domain("crown") if "crown" in have else None
    milp = get_domain("milp", time_limit=milp_time) if "milp" in have and use_milp else None
    c = {"n": n, "clean": 0, "pgd": 0, "box": 0, "crown": 0, "milp": 0, "milp_timeouts": 0, "milp_runs": 0,
         "milp_falsified": 0, "time": {"box": 0.0, "crown": 0.0, "milp": 0.0, "attack": 0.0}}
    for start in range(0, n, batch):
        x, y = x_all[start:start + batch], y_all[start:start + batch]
        spec = verikit.Spec.robustness(y, 10)
        ball = verikit.Box.linf_ball(x, eps)
        with torch.no_grad():
            correct = graph.forward(x).argmax(1) == y
        t = time.perf_counter()
        with torch.no_grad():
            rb = box.bound(graph, ball, spec)
        c["time"]["box"] += time.perf_counter() - t
        v_box = rb.verified(spec) & correct  # a proof needs a correct prediction
        # a proven sample cannot be attacked (the domains are sound): attack only the others
        open_idx = torch.nonzero(correct & ~v_box).flatten()
        attacked = torch.zeros_like(correct)
        if len(open_idx):
            t = time.perf_counter()
            sub = open_idx.tolist()
            attacked[open_idx] = pgd_attack(graph, ball[sub], spec.select(sub), steps=attack_steps,
                                            restarts=restarts).found
            c["time"]["attack"] += time.perf_counter() - t
        robust = correct & ~attacked
        v_crown = v_box.clone()
        store = rb.store
        open_idx = torch.nonzero(robust & ~v_box).flatten().tolist()
        if crown is not None and open_idx:
            t = time.perf_counter()
            rc = crown.bound(graph, ball[open_idx], spec.select(open_idx), store=rb.store.select(open_idx))
            c["time"]["crown"] += time.perf_counter() - t
            v_crown[open_idx] = rc.verified(spec.select(open_idx))
            crown_store = {i: (rc.store, k) for k, i in enumerate(open_idx)}
        else:
            crown_store = {}
        v_milp = v_crown.clone()
        if milp is not None:
            todo = [i for i in range(x.shape[0]) if robust[i] and not v_crown[i]]
            for i in todo:
                t = time.perf_counter()
                st, k = crown_store.get(i, (store, i))
                rm = milp.bound(graph, ball[i:i + 1], spec.select([i]), store=st.select([k]))
                c["time"]["milp"] += time.perf_counter() - t
                status = rm.status[0] if rm.status else "unknown"
                c["milp_runs"] += 1
                c["milp_timeouts"] += status == "unknown"
                c["milp_falsified"] += status == "falsified"
                v_milp[i] = status == "verified"
        c["clean"] += int(correct.sum())
        c["pgd"] += int(robust.sum())
        c["box"] += int(v_box.sum())
        c["crown"] += int(v_crown.sum())
        c["milp"] += int(v_milp.sum())
        done = start + x.shape[0]
        log(f"  {name}: {done}/{n}  clean {c['clean']}  pgd {c['pgd']}  box {c['box']}  box,crown {c['crown']}  "
            f"box,crown,milp {c['milp']} (milp runs {c['milp_runs']}, timeouts {c['milp_timeouts']})")
    c["has_crown"], c["has_milp"] = crown is not None, milp is not None
    return c


def markdown(results: dict, eps: float, n: int, milp_time: float, attack_steps: int, restarts: int) -> str:
    pct = lambda k, c: f"{100 * c[k] / c['n']:.1f}%"
    lines = [f"Certified robustness of the shipped models on the first {n} MNIST test images, ε = {eps} "
             f"(L∞, pixels in [0, 1]).", "",
             "| model | standard acc. | PGD acc. | certified: box | box,crown | box,crown,milp | MILP runs: verified / counterexample / timeout |",
             "|---|---|---|---|---|---|---|"]
    for name, c in results.items():
        crown = pct("crown", c) if c["has_crown"] else "n/a"
        milp = pct("milp", c) if c["has_milp"] else "n/a"
        lines.append(f"| `{name}` | {pct('clean', c)} | {pct('pgd', c)} | {pct('box', c)} | {crown} | {milp} | "
                     f"{c['milp_runs']}: {c['milp_runs'] - c['milp_falsified'] - c['milp_timeouts']} / {c['milp_falsified']} / "
                     f"{c['milp_timeouts']} |")
    lines += ["", f"PGD: {attack_steps} steps × {restarts} restarts on the margin loss, run on the samples box could not prove (a proven sample cannot be attacked). A sample counts as certified "
                  f"only if it is classified correctly and the chain proves it; MILP ran only on samples that the "
                  f"attack could not break and CROWN could not prove, with a {milp_time:g} s limit per sample; "
                  f"a timeout counts as not certified. Wall time per model (s): " +
              "; ".join(f"{k}: " + ", ".join(f"{d} {v:.0f}" for d, v in c["time"].items()) for k, c in results.items()),
              f"Produced by `python benchmarks/results_table.py --num {n} --milp-time-limit {milp_time:g}` "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()})."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-sabr-0.1,mnist-ibp-0.1")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--milp-time-limit", type=float, default=30.0)
    ap.add_argument("--attack-steps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)
    results = {}
    for name in args.models.split(","):
        log(f"{name}:")
        results[name] = run_model(name, args.num, args.eps, args.batch, args.milp_time_limit, args.attack_steps,
                                  args.restarts, log)
    md = markdown(results, args.eps, args.num, args.milp_time_limit, args.attack_steps, args.restarts)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    sys.stdout.write("\n" + md)


if __name__ == "__main__":
    main()
