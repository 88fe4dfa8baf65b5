"""Training curves (loss, accuracies, ε) from the metrics rows, saved as a PNG (atomically).
The legends sit below the axes, where they cannot cover a curve."""
from __future__ import annotations


def plot_metrics(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ep, [r["loss"] for r in rows], "k-o", label="training loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1b = ax1.twinx()
    ax1b.plot(ep, [r["eps"] for r in rows], "c--", label="ε (end of epoch)")
    ax1b.set_ylabel("ε")
    handles = ax1.get_legend_handles_labels()[0] + ax1b.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper center", bbox_to_anchor=(0.5, -0.15),
               ncol=2, fontsize=8, frameon=False)
    for key, style in (("test_acc", "b-o"), ("pgd_acc", "r-s"), ("box_cert_acc", "g-^")):
        ax2.plot(ep, [r[key] for r in rows], style, label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (test subset)")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from verikit.outputs import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
