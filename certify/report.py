"""Summaries of certification records: per-eps table (what each stage of the chain settled),
JSON form, eps-sweep table and plot. Everything is computed from the records alone, so a
resumed run reports exactly what an uninterrupted one would."""
from __future__ import annotations

from typing import Sequence

from verikit.progress import plural

from .eps import format_eps
from .records import eps_key


def summarize(records: Sequence[dict], stages: Sequence[str]) -> list[dict]:
    """One entry per eps (in order of first appearance).

    Certified accuracy = samples correctly classified AND verified / all samples. Per stage
    ("attack" then each domain): samples verified there, cumulative certified accuracy after
    it, samples falsified there, and the seconds spent in it.
    """
    by_eps: dict[str, list] = {}
    eps_of: dict[str, float] = {}
    for r in records:
        k = eps_key(r["eps"])
        by_eps.setdefault(k, []).append(r)
        eps_of[k] = float(r["eps"])
    out = []
    for k, recs in by_eps.items():
        n = len(recs)
        names = list(stages) + sorted({r.get("by") for r in recs if r.get("by")} - set(stages))
        rows, cum = [], 0
        for s in names:
            ver = sum(1 for r in recs if r["status"] == "verified" and r.get("by") == s)
            fal = sum(1 for r in recs if r["status"] == "falsified" and r.get("by") == s)
            cum += ver
            rows.append({"stage": s, "verified": ver, "falsified": fal,
                         "certified_accuracy": cum / n if n else 0.0,
                         "seconds": sum(float(r.get("times", {}).get(s, 0.0)) for r in recs)})
        count = lambda st: sum(1 for r in recs if r["status"] == st)
        out.append({
            "eps": eps_of[k], "samples": n,
            "correct": n - count("misclassified") - count("error"),
            "clean_accuracy": (n - count("misclassified") - count("error")) / n if n else 0.0,
            "verified": count("verified"), "falsified": count("falsified"),
            "unknown": count("unknown"), "misclassified": count("misclassified"), "errors": count("error"),
            "certified_accuracy": count("verified") / n if n else 0.0,
            "timeouts": sum(1 for r in recs if r["status"] == "unknown" and r.get("note") == "timeout"),
            "seconds": sum(float(r.get("time", 0.0)) for r in recs),
            "stages": rows,
        })
    return out


def format_summary(summary: list[dict]) -> str:
    lines = []
    for s in summary:
        label, exact = format_eps(s["eps"]), f"{s['eps']:.6g}"
        lines.append(f"eps = {label}{'' if label == exact else f' ({exact})'}: {plural(s['samples'], 'sample')}, "
                     f"{s['correct']} correctly classified ({100 * s['clean_accuracy']:.1f}%)")
        lines.append(f"  {'stage':<10} {'verified':>8} {'cert.acc (cum.)':>16} {'falsified':>9} {'time [s]':>9}")
        for r in s["stages"]:
            ver = "-" if r["stage"] == "attack" else str(r["verified"])
            lines.append(f"  {r['stage']:<10} {ver:>8} {100 * r['certified_accuracy']:>15.1f}% "
                         f"{r['falsified']:>9} {r['seconds']:>9.2f}")
        extra = f" ({s['timeouts']} timed out)" if s["timeouts"] else ""
        errors = f"   errors: {s['errors']}" if s.get("errors") else ""
        lines.append(f"  unknown: {s['unknown']}{extra}   misclassified: {s['misclassified']}{errors}   "
                     f"certified accuracy: {100 * s['certified_accuracy']:.1f}%   "
                     f"total {s['seconds']:.2f} s ({s['seconds'] / max(s['samples'], 1):.3f} s/sample)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def format_sweep(summary: list[dict]) -> str:
    """Certified accuracy (cumulative over the chain) versus eps."""
    if not summary:
        return ""
    stages = [r["stage"] for r in summary[0]["stages"] if r["stage"] != "attack"]
    head = f"{'eps':>10} {'clean':>7} " + " ".join(f"{'+' + s:>9}" for s in stages) + f" {'falsified':>9} {'unknown':>8}"
    lines = ["certified accuracy versus eps (cumulative over the chain)", head]
    for s in sorted(summary, key=lambda s: s["eps"]):
        acc = {r["stage"]: r["certified_accuracy"] for r in s["stages"]}
        lines.append(f"{format_eps(s['eps']):>10} {100 * s['clean_accuracy']:>6.1f}% "
                     + " ".join(f"{100 * acc.get(st, 0.0):>8.1f}%" for st in stages)
                     + f" {s['falsified']:>9} {s['unknown']:>8}")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(summary, key=lambda s: s["eps"])
    eps = [s["eps"] for s in pts]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(eps, [100 * s["clean_accuracy"] for s in pts], "k--", label="clean accuracy")
    stages = [r["stage"] for r in pts[0]["stages"] if r["stage"] != "attack"] if pts else []
    for st in stages:
        ys = [100 * next(r["certified_accuracy"] for r in s["stages"] if r["stage"] == st) for s in pts]
        ax.plot(eps, ys, "o-", label=f"certified up to {st}")
    ax.plot(eps, [100 * (s["samples"] - s["falsified"] - s["misclassified"]) / max(s["samples"], 1) for s in pts],
            ":", color="gray", label="upper bound (not falsified)")
    ax.set_xlabel("eps (L-inf)")
    ax.set_ylabel("accuracy [%]")
    ax.set_ylim(-3, 103)  # points at 0 % and 100 % stay visible
    ax.grid(alpha=0.3)
    # below the axes, where it cannot hide a curve
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save_figure(fig, path, dpi=120)
    plt.close(fig)


def _save_figure(fig, path: str, dpi: int) -> None:
    """Atomically: a run killed while saving leaves no half-written image."""
    import os

    from verikit.outputs import atomic_write

    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="jpeg" if fmt == "jpg" else fmt, dpi=dpi, bbox_inches="tight")
