"""curves.png: loss and metrics per epoch, stage boundaries marked (matplotlib, imported lazily)."""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["plot_curves"]


def plot_curves(history: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    xs = list(range(1, len(history) + 1))
    metric_keys = [k for k in history[0] if k.startswith("val_") and k != "val_loss"]
    fig, axes = plt.subplots(1, 1 + (1 if metric_keys else 0), figsize=(11 if metric_keys else 6, 4), squeeze=False)
    ax_loss = axes[0][0]
    main = [i for i, r in enumerate(history) if r["phase"] == "main"]
    trial = [i for i, r in enumerate(history) if r["phase"] != "main"]

    def draw(ax, key, label):
        ax.plot([xs[i] for i in main], [history[i][key] for i in main], marker="o", ms=3, label=label)
        if trial:
            ax.scatter([xs[i] for i in trial], [history[i][key] for i in trial], s=12, c="grey", alpha=0.6,
                       label=f"{label} (trials)")

    draw(ax_loss, "train_loss", "train loss")
    draw(ax_loss, "val_loss", "val loss")
    ax_loss.set_title("loss")
    if metric_keys:
        ax_m = axes[0][1]
        for k in metric_keys:
            draw(ax_m, k, k)
        ax_m.set_title(", ".join(metric_keys))
    boundaries: List[tuple] = []
    for i, r in enumerate(history):
        if i == 0 or r["stage_index"] != history[i - 1]["stage_index"]:
            boundaries.append((xs[i] - 0.5, r["stage"]))
    for ax in axes[0]:
        for x, name in boundaries:
            ax.axvline(x, color="k", ls="--", lw=0.8, alpha=0.5)
            ax.text(x + 0.05, 1.0, name, transform=ax.get_xaxis_transform(), fontsize=8, va="top", rotation=90)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
