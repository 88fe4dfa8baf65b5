"""The certified-training campaign (issue 12): standard, PGD, IBP, SABR (paper λ) and MTL-IBP on
MNIST with cnn-small, ε ∈ {0.1, 0.3}, several seeds, plus SABR's λ sweep at ε = 0.1; every
trained model is certified on the first N test images with box, box,crown and the full chain
box,crown,milp (benchmarks/results_table.py's protocol).

    python benchmarks/campaign.py run --reset-claims &   # two resumable background workers
    sleep 60; python benchmarks/campaign.py run &        # (sharing one queue of jobs)
    python benchmarks/campaign.py table                  # docs/campaign.md + plots
    python benchmarks/campaign.py recertify --images 1000 --chain-images 100   # more test images

Resumable: a run whose record (benchmarks/campaign/<run>.json, committed) exists is skipped; a
run interrupted during training continues from its checkpoint (runs/campaign/<run>/, never
committed). The scale (training images, epochs, certified images) is in SCALE and in every
record, so the table states exactly what was measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CAMPAIGN_SCALE=v2: the second, larger campaign (its own records, runs and table)
V2 = os.environ.get("CAMPAIGN_SCALE") == "v2"
TAG = "campaign_v2" if V2 else "campaign"
RECORDS = os.environ.get("CAMPAIGN_RECORDS", os.path.join(ROOT, "benchmarks", TAG))
RUNS = os.environ.get("CAMPAIGN_RUNS", os.path.join(ROOT, "runs", TAG))
# v1: sized to finish on 2 shared cores in about an hour (see the README's "Training methods")
SCALE = {"model": "cnn-small", "train_samples": 3000, "epochs": 5, "batch_size": 32, "warmup_epochs": 1,
         "ramp_epochs": 2, "eval_samples": 100, "certify": 100, "certify_chain": 25, "milp_time_limit": 1.0,
         "attack_steps": 20, "restarts": 2}
if V2:  # a ramp long enough for ε = 0.3 (v1's 2-epoch ramp collapsed there), 1000 test images
    SCALE.update(train_samples=8000, epochs=10, ramp_epochs=6, eval_samples=200, certify=1000, certify_chain=100)
if os.environ.get("CAMPAIGN_SMOKE"):  # a seconds-long check of the whole pipeline
    SCALE.update(train_samples=256, epochs=2, eval_samples=50, certify=20, certify_chain=10, attack_steps=5, restarts=1)
MAIN_METHODS = ("standard", "pgd", "ibp", "sabr", "mtl-ibp")
LATER_METHODS = ("taps", "staps")  # added later, at ε = 0.1 only (same schedule as the others)
TABLE_METHODS = MAIN_METHODS + LATER_METHODS
EPSILONS = (0.1, 0.3)
SEEDS = (0, 1, 2)
SWEEP = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def run_name(method: str, eps: float, seed: int, lam=None) -> str:
    return f"{method}-eps{eps:g}-s{seed}" + (f"-lam{lam:g}" if lam is not None else "")


def jobs() -> list[dict]:
    """Every run, in the order that gives a usable table soonest: seeds 0 and 1, the sweep, seed 2."""
    main = lambda seed: [{"method": m, "eps": e, "seed": seed, "lam": None} for e in EPSILONS for m in MAIN_METHODS]
    # λ = 0.4 (the paper's value) is the main table's seed-0 SABR run, λ = 1 its IBP run (bit-identical)
    sweep = [{"method": "sabr", "eps": 0.1, "seed": 0, "lam": lam} for lam in SWEEP if lam not in (0.4, 1.0)]
    if V2:  # every method at both ε, seed by seed, then the sweep
        every = lambda seed: [{"method": m, "eps": e, "seed": seed, "lam": None} for e in EPSILONS for m in TABLE_METHODS]
        return [job for seed in SEEDS for job in every(seed)] + sweep
    later = [{"method": m, "eps": 0.1, "seed": seed, "lam": None} for m in LATER_METHODS for seed in SEEDS]
    return main(SEEDS[0]) + main(SEEDS[1]) + sweep + [job for seed in SEEDS[2:] for job in main(seed)] + later


def train_one(job: dict, log) -> dict:
    from verikit.models.architectures import DATASET_SHAPES
    from verikit.train.config import TrainConfig
    from verikit.train.export import export_onnx
    from verikit.train.loop import CHECKPOINT, Trainer

    name = run_name(job["method"], job["eps"], job["seed"], job["lam"])
    out = os.path.join(RUNS, name)
    cfg = TrainConfig(model=SCALE["model"], method=job["method"], eps=job["eps"], seed=job["seed"],
                      epochs=SCALE["epochs"], train_samples=SCALE["train_samples"],
                      eval_samples=SCALE["eval_samples"], sabr_lambda=job["lam"], device="cpu",
                      batch_size=SCALE["batch_size"], warmup_epochs=SCALE["warmup_epochs"],
                      ramp_epochs=SCALE["ramp_epochs"])
    trainer = Trainer(cfg, out, log=lambda s: log(f"  {name}: {s}"))
    if os.path.exists(os.path.join(out, CHECKPOINT)):
        trainer.load_checkpoint(os.path.join(out, CHECKPOINT))
    t0 = time.perf_counter()
    trainer.fit(progress=False)
    wall = time.perf_counter() - t0
    onnx_path = os.path.join(out, "model.onnx")
    export_onnx(trainer.model, DATASET_SHAPES[cfg.dataset][0], onnx_path, trainer.xte[:16])
    epoch_s = [float(r["time_s"]) for r in trainer.metrics]
    return {"name": name, "onnx": onnx_path, "config": trainer.cfg.to_dict(), "kind": trainer.cfg.kind,
            "train_wall_s_this_process": wall, "epoch_train_s": epoch_s, "train_s": sum(epoch_s),
            "last_epoch": trainer.metrics[-1]}


def certify_one(onnx_path: str, eps: float, images: int = None, chain_images: int = None) -> dict:
    """box and box,crown on the first `images` test images (default SCALE's `certify`); the full
    chain (MILP after them) on the first `chain_images` (`certify_chain`: MILP costs seconds per
    open sample on 2 shared cores)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from results_table import run_model

    images = SCALE["certify"] if images is None else images
    chain_images = SCALE["certify_chain"] if chain_images is None else chain_images
    t0 = time.perf_counter()
    c = run_model(onnx_path, images, eps, 100, SCALE["milp_time_limit"], SCALE["attack_steps"],
                  SCALE["restarts"], lambda s: None, use_milp=False)
    c["wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    c["chain"] = run_model(onnx_path, chain_images, eps, 100, SCALE["milp_time_limit"],
                           SCALE["attack_steps"], SCALE["restarts"], lambda s: None)
    c["chain"]["wall_s"] = time.perf_counter() - t0
    return c


def cert_figures(cert: dict) -> dict:
    """The record's fields of one `certify_one` result: accuracies as fractions, times."""
    n, ch = cert["n"], cert["chain"]
    return {"certify_s": round(cert["wall_s"], 1), "certified_images": n,
            "standard_acc": cert["clean"] / n, "pgd_acc": cert["pgd"] / n,
            "cert_box": cert["box"] / n, "cert_box_crown": cert["crown"] / n,
            "chain_images": ch["n"], "cert_full_chain": ch["milp"] / ch["n"],
            "chain_box_crown": ch["crown"] / ch["n"], "chain_certify_s": round(ch["wall_s"], 1),
            "milp": {"runs": ch["milp_runs"], "timeouts": ch["milp_timeouts"],
                     "falsified": ch["milp_falsified"], "time_s": round(ch["time"]["milp"], 1)},
            "certify_time_s": {k: round(v, 1) for k, v in cert["time"].items()}}


def _summary(f: dict) -> str:
    return (f"std {f['standard_acc']:.3f} pgd {f['pgd_acc']:.3f} box {f['cert_box']:.3f} crown "
            f"{f['cert_box_crown']:.3f} on {f['certified_images']}; chain {f['cert_full_chain']:.3f} on "
            f"{f['chain_images']} ({f['certify_s']:.0f} + {f['chain_certify_s']:.0f} s)")


def _write_record(rec: dict) -> None:
    path = os.path.join(RECORDS, f"{rec['name']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(path + ".tmp", path)


def claim(name: str) -> bool:
    """Take job `name` for this worker (workers share one queue; a crashed worker's claims are
    cleared by `run --reset-claims` before restarting)."""
    os.makedirs(RUNS, exist_ok=True)
    try:
        os.close(os.open(os.path.join(RUNS, f"{name}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run(threads: int, log) -> None:
    torch.set_num_threads(threads)
    _import_everything()
    os.makedirs(RECORDS, exist_ok=True)
    for job in jobs():
        name = run_name(job["method"], job["eps"], job["seed"], job["lam"])
        record = os.path.join(RECORDS, f"{name}.json")
        if os.path.exists(record) or not claim(name):
            continue
        log(f"[{time.strftime('%H:%M:%S')}] {name}: training")
        tr = train_one(job, log)
        log(f"[{time.strftime('%H:%M:%S')}] {name}: trained in {tr['train_s']:.0f} s; certifying")
        cert = certify_one(tr["onnx"], job["eps"])
        rec = {"name": name, "method": tr["kind"], "registry_method": job["method"], "eps": job["eps"],
               "seed": job["seed"], "options": tr["config"]["method_options"], "scale": SCALE,
               "train_s": round(tr["train_s"], 1), "epoch_train_s": [round(v, 1) for v in tr["epoch_train_s"]],
               **cert_figures(cert),
               "train_eval_last_epoch": {k2: tr["last_epoch"][k2] for k2 in ("test_acc", "pgd_acc", "box_cert_acc")},
               "config": tr["config"], "torch": torch.__version__, "threads": threads,
               "machine": (f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
                           "when the run ended" if V2 else f"{platform.machine()}, 2 cores shared with ~6 other jobs")}
        _write_record(rec)
        log(f"[{time.strftime('%H:%M:%S')}] {name}: {_summary(rec)}")


def _import_everything() -> None:
    """Import the code a campaign runs before it starts: edits to the source tree during an
    hours-long campaign cannot then mix into it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import results_table  # noqa: F401
    import verikit.train.export  # noqa: F401
    import verikit.train.loop  # noqa: F401
    from verikit.domains import available_domains
    from verikit.train.methods import available_methods

    available_domains(), available_methods()


def job_of(rec: dict) -> dict:
    """The job that produced a record (the λ of a sweep run is in its name)."""
    lam = rec["options"]["lambda"] if "-lam" in rec["name"] else None
    return {"method": rec["registry_method"], "eps": rec["eps"], "seed": rec["seed"], "lam": lam}


def recertify(images: int, chain_images: int, runs: list, threads: int, log, retrain: bool = False,
              methods: tuple = (), train_threads: int = 1) -> None:
    """Certify every recorded run's model again on more test images, with the same protocol:
    box and box,crown on the first `images`, the full chain on the first `chain_images`. The
    result goes into the record under "large"; records that have it are skipped (resumable, and
    two workers share the queue by claims). With `retrain`, a model whose ONNX file is gone is
    trained again from its record's configuration (training is bit-reproducible for a seed);
    whether the retrained model reproduced the record's last-epoch evaluation is stored (training
    repeats bit for bit at one thread count, but the float rounding of its reductions depends on
    it, so a model retrained elsewhere can differ in the last digits and drift from there)."""
    torch.set_num_threads(threads)
    _import_everything()
    order = {m: i for i, m in enumerate(methods)}
    recs = [r for r in load_records() if not methods or r["registry_method"] in order]
    for rec in sorted(recs, key=lambda r: (order.get(r["registry_method"], 0), "-lam" in r["name"], r["name"])):
        done = rec.get("large", {})
        if done.get("certified_images") == images and done.get("chain_images") == chain_images:
            continue
        onnx = next((p for p in (os.path.join(d, rec["name"], "model.onnx") for d in runs) if os.path.exists(p)), None)
        if onnx is None and not retrain:
            log(f"{rec['name']}: no model.onnx under {', '.join(runs)}; skipped")
            continue
        if not claim(f"{rec['name']}.recertify-{images}-{chain_images}"):
            continue
        reproduced = None
        if onnx is None:
            log(f"[{time.strftime('%H:%M:%S')}] {rec['name']}: model gone; training it again")
            torch.set_num_threads(train_threads)
            tr = train_one(job_of(rec), log)
            torch.set_num_threads(threads)
            onnx = tr["onnx"]
            again = {k: tr["last_epoch"][k] for k in rec["train_eval_last_epoch"]}
            reproduced = again == rec["train_eval_last_epoch"]
            log(f"  {rec['name']}: last-epoch evaluation {'reproduced' if reproduced else 'DIFFERS'}: {again}")
        rec["large"] = cert_figures(certify_one(onnx, rec["eps"], images, chain_images))
        if reproduced is not None:
            rec["large"]["retrained_model_reproduced_record"] = reproduced
        _write_record(rec)
        log(f"[{time.strftime('%H:%M:%S')}] {rec['name']}: {_summary(rec['large'])}")


def load_records() -> list[dict]:
    out = []
    for f in sorted(os.listdir(RECORDS)) if os.path.isdir(RECORDS) else []:
        if f.endswith(".json"):
            with open(os.path.join(RECORDS, f)) as fh:
                out.append(json.load(fh))
    return out


def lam_of(r: dict) -> float:
    return r["options"].get("lambda", 1.0 if r["registry_method"] == "ibp" else 0.0)


def sweep_records(records: list[dict]) -> list[dict]:
    """SABR's λ sweep at ε = 0.1, seed 0, with the IBP run as λ = 1 (the same computation)."""
    rs = [r for r in records if r["registry_method"] in ("sabr", "ibp") and abs(r["eps"] - 0.1) < 1e-9
          and r["seed"] == 0]
    return sorted(rs, key=lam_of)


def mean_std(values: list) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * m:.1f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))  # sample std over seeds
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


COLUMNS = (("standard_acc", "standard"), ("pgd_acc", "PGD"), ("cert_box", "cert. box"),
           ("cert_box_crown", "box,crown"), ("cert_full_chain", "box,crown,milp"))


def _label(method: str, record: dict) -> str:
    """The method with its defining option (SABR/STAPS λ, MTL-IBP α)."""
    opts = record["options"]
    if method in ("sabr", "staps"):
        return f"{method} (λ={opts['lambda']:g})"
    return f"mtl-ibp (α={opts['alpha']:g})" if method == "mtl-ibp" else method


def table(records: list[dict]) -> str:
    sc = records[0]["scale"] if records else SCALE
    main = [r for r in records if "lam" not in r["name"]]
    lines = [f"MNIST, {sc['model']}, trained on the first {sc['train_samples']} training images for "
             f"{sc['epochs']} epochs (batch {sc['batch_size']}, {sc['warmup_epochs']} warm-up, ε ramp over "
             f"{sc['ramp_epochs']}), certified on the first "
             f"{sc['certify']} test images with box and box,crown, and on the first {sc['certify_chain']} with the "
             f"full chain box,crown,milp (MILP {sc['milp_time_limit']:g} s per sample; a timeout is not certified; "
             "the box,crown figure of those images is in each record). Accuracies in %, mean ± sample std over seeds (n = number of seeds).", "",
             "| ε | method | n | " + " | ".join(h for _, h in COLUMNS) + " | train s (mean) |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for eps in EPSILONS:
        for m in TABLE_METHODS:
            rs = [r for r in main if r["registry_method"] == m and abs(r["eps"] - eps) < 1e-9]
            if not rs:
                continue
            cells = [mean_std([r[k] for r in rs]) for k, _ in COLUMNS]
            t = sum(r["train_s"] for r in rs) / len(rs)
            lines.append(f"| {eps:g} | {_label(m, rs[0])} | {len(rs)} | " + " | ".join(cells) + f" | {t:.0f} |")
    large = [r for r in main if "large" in r]
    if large:
        L0 = large[0]["large"]
        again = [r for r in large if "retrained_model_reproduced_record" in r["large"]]
        same = sum(r["large"]["retrained_model_reproduced_record"] for r in again)
        origin = ("The same models" if not again else
                  f"{len(large)} of these runs (their models' files were gone: retrained from their records, same recipe "
                  f"and seed, {same} of {len(again)} reproducing the record's last-epoch evaluation; where the machine "
                  "rounds differently the weights differ, so these rows describe the retrained models)")
        lines += ["", f"{origin} certified on more test images: the first {L0['certified_images']} with box "
                  f"and box,crown (and their standard / PGD accuracy), the first {L0['chain_images']} with the full chain "
                  f"(`campaign.py recertify`; certification s per model, mean: box and box,crown + full chain):", "",
                  "| ε | method | n | " + " | ".join(h for _, h in COLUMNS) + " | certify s |",
                  "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
        for eps in EPSILONS:
            for m in TABLE_METHODS:
                rs = [r["large"] for r in large if r["registry_method"] == m and abs(r["eps"] - eps) < 1e-9]
                if rs:
                    first = next(r for r in large if r["registry_method"] == m and abs(r["eps"] - eps) < 1e-9)
                    secs = (f"{sum(r['certify_s'] for r in rs) / len(rs):.0f} + "
                            f"{sum(r['chain_certify_s'] for r in rs) / len(rs):.0f}")
                    lines.append(f"| {eps:g} | {_label(m, first)} | {len(rs)} | "
                                 + " | ".join(mean_std([r[k] for r in rs]) for k, _ in COLUMNS) + f" | {secs} |")
    sweep = sweep_records(records)
    if sweep:
        lines += ["", "SABR λ sweep at ε = 0.1 (seed 0):", "",
                  "| λ | " + " | ".join(h for _, h in COLUMNS) + " | train s |", "|---|" + "---|" * (len(COLUMNS) + 1)]
        for r in sweep:
            lines.append(f"| {lam_of(r):g} | " + " | ".join(f"{100 * r[k]:.1f}" for k, _ in COLUMNS)
                         + f" | {r['train_s']:.0f} |")
        if all("large" in r for r in sweep):
            L0 = sweep[0]["large"]
            lines += ["", f"The sweep's models certified on the first {L0['certified_images']} (box, box,crown) and "
                      f"{L0['chain_images']} (full chain) test images, as the recertified table above:", "",
                      "| λ | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
            for r in sweep:
                lines.append(f"| {lam_of(r):g} | " + " | ".join(f"{100 * r['large'][k]:.1f}" for k, _ in COLUMNS) + " |")
    lines += ["", f"Per-run records (method, options, seed, epochs, times, accuracies): `benchmarks/{TAG}/*.json`. "
              f"Machine: {records[0]['machine'] if records else '?'}, 1 torch thread per run, two runs at a time."]
    return "\n".join(lines) + "\n"


def widest(r: dict) -> dict:
    """A run's figures from its largest certification (`recertify`'s, where it ran)."""
    return r.get("large", r)


def plots(records: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, axes = plt.subplots(1, len(EPSILONS), figsize=(10, 4))
    main = [r for r in records if "lam" not in r["name"]]
    for ax, eps in zip(axes, EPSILONS):
        for m in TABLE_METHODS:
            rs = [r for r in main if r["registry_method"] == m and abs(r["eps"] - eps) < 1e-9]
            if rs:
                ax.scatter([100 * widest(r)["standard_acc"] for r in rs], [100 * widest(r)["cert_full_chain"] for r in rs],
                           label=m)
        chain = sorted({widest(r)["chain_images"] for r in main if abs(r["eps"] - eps) < 1e-9})
        ax.set_title(f"ε = {eps:g} (full chain on the first {'/'.join(map(str, chain))} test images)", fontsize=9)
        ax.set_xlabel("standard accuracy (%)")
        ax.set_ylabel("certified accuracy, box,crown,milp (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{TAG}_std_vs_cert.png")
    fig.savefig(path, dpi=90)
    made.append(path)
    sweep = sweep_records(records)
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 4))
        lam = [lam_of(r) for r in sweep]
        ax.plot(lam, [100 * widest(r)["standard_acc"] for r in sweep], "o-", label="standard")
        ax.plot(lam, [100 * widest(r)["cert_full_chain"] for r in sweep], "s-", label="certified (full chain)")
        ax.plot(lam, [100 * widest(r)["cert_box"] for r in sweep], "^--", label="certified (box)")
        ax.set_xlabel("SABR λ")
        ax.set_ylabel("accuracy (%)")
        chain = sorted({widest(r)["chain_images"] for r in sweep})
        ax.set_title(f"SABR λ trade-off, MNIST ε = 0.1 (full chain on {'/'.join(map(str, chain))} images)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{TAG}_sabr_lambda.png")
        fig.savefig(path, dpi=90)
        made.append(path)
    return made


# (method, ε) -> shipped name; v2 ships its TAPS/STAPS models and the best certified ε = 0.3 ones
SHIP = ({("taps", 0.1): "mnist-taps-0.1", ("staps", 0.1): "mnist-staps-0.1", ("ibp", 0.3): "mnist-ibp-0.3",
         ("sabr", 0.3): "mnist-sabr-0.3"} if V2 else {("mtl-ibp", 0.1): "mnist-mtl-ibp-0.1", ("pgd", 0.1): "mnist-pgd-0.1"})


def ship(records: list[dict], log) -> None:
    """Copy the best run of each (method, ε) in SHIP (by full-chain certified accuracy, then
    standard accuracy) into models/zoo with its metadata; the clean accuracy on the first 500
    test images is measured on the copied file."""
    import shutil

    import verikit
    from verikit.datasets import load_mnist

    x, y = load_mnist("test")
    for (method, eps), name in SHIP.items():
        rs = [r for r in records if r["registry_method"] == method and abs(r["eps"] - eps) < 1e-9
              and "lam" not in r["name"]]
        if not rs:
            continue
        best = max(rs, key=lambda r: (r["cert_full_chain"], r["standard_acc"]))
        src = os.path.join(RUNS, best["name"], "model.onnx")
        dst = os.path.join(ROOT, "models", "zoo", f"{name}.onnx")
        shutil.copyfile(src, dst)
        with torch.no_grad():
            acc = float((verikit.from_onnx(dst).forward(x[:500]).argmax(1) == y[:500]).float().mean())
        c = best["config"]
        meta = {"name": name, "dataset": "mnist", "eps": eps, "method": method, "options": best["options"],
                "architecture": c["model"], "epochs": c["epochs"], "train_samples": c["train_samples"],
                "seed": best["seed"], "clean_acc_first500": acc,
                f"campaign_first{best['certified_images']}": {k: best[k] for k in
                                                              ("standard_acc", "pgd_acc", "cert_box", "cert_box_crown")},
                f"cert_full_chain_first{best['chain_images']}": best["cert_full_chain"],
                "description": f"{method} on MNIST ε={eps:g}, {TAG} scale ({c['train_samples']} images, "
                               f"{c['epochs']} epochs), best of {len(rs)} seeds",
                "train_command": (f"verikit train --model {c['model']} --eps {eps:g} --method {method} "
                                  + "".join(f"--method-option {k}={v} " for k, v in best["options"].items())
                                  + f"--epochs {c['epochs']} --train-samples {c['train_samples']} --batch-size "
                                  f"{c['batch_size']} --ramp-epochs {c['ramp_epochs']} --seed {best['seed']} "
                                  "--threads 1"),
                "record": f"benchmarks/{TAG}/{best['name']}.json"}
        with open(os.path.join(ROOT, "models", "zoo", f"{name}.json"), "w") as f:
            json.dump(meta, f, indent=2)
        log(f"shipped {best['name']} as {name} (clean {acc:.3f} on 500)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and certify every run not yet recorded (resumable)")
    r.add_argument("--reset-claims", action="store_true", help="forget every claim (no worker may be running)")
    r.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("table", help="write the mean ± std table and the plots")
    t.add_argument("--out", default=os.path.join(ROOT, "docs", f"{TAG}.md"))
    sub.add_parser("ship", help="copy the best runs into models/zoo (see SHIP)")
    rc = sub.add_parser("recertify", help="certify every recorded model again on more test images (resumable)")
    rc.add_argument("--images", type=int, default=1000, help="box and box,crown on the first N test images")
    rc.add_argument("--chain-images", type=int, default=100, help="the full chain on the first N")
    rc.add_argument("--runs", default=RUNS, help="comma list of run directories holding <run>/model.onnx")
    rc.add_argument("--threads", type=int, default=1)
    rc.add_argument("--retrain", action="store_true", help="train a model whose model.onnx is gone again")
    rc.add_argument("--train-threads", type=int, default=1, help="torch threads while retraining")
    rc.add_argument("--methods", default="", help="comma list of registry methods, in the order to do them")
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)
    if args.cmd == "run":
        if args.reset_claims and os.path.isdir(RUNS):
            for f in os.listdir(RUNS):
                if f.endswith(".claim"):
                    os.remove(os.path.join(RUNS, f))
        run(args.threads, log)
    elif args.cmd == "recertify":
        recertify(args.images, args.chain_images, args.runs.split(","), args.threads, log, args.retrain,
                  tuple(m for m in args.methods.split(",") if m), args.train_threads)
    elif args.cmd == "ship":
        ship(load_records(), log)
    else:
        recs = load_records()
        md = table(recs)
        out_dir = os.path.dirname(args.out)
        os.makedirs(out_dir, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(md)
        for p in plots(recs, out_dir):
            log(f"wrote {p}")
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
