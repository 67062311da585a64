"""Plots of meta-training (matplotlib, Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path


def plot_training(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in history if r.get("type") == "epoch" and r.get("mean_ln_loss") is not None]
    evals = [r for r in history if r.get("type") == "eval" and r.get("action") != "baseline"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if epochs:
        ax.plot([r["epoch"] for r in epochs], [r["mean_ln_loss"] for r in epochs], lw=0.8, alpha=0.6,
                label="training: mean ln loss of the epoch's trajectory")
    if evals:
        ax.plot([r["epoch"] for r in evals], [math.log(r["val_loss"]) if 0 < r["val_loss"] < math.inf else math.nan
                                              for r in evals], "o-", ms=3, label="validation: ln loss at N_valid")
    stage = None
    for r in history:
        if r.get("type") == "epoch" and r["stage"] != stage:
            if stage is not None:
                ax.axvline(r["epoch"] - 0.5, color="grey", ls="--", lw=0.8)
                ax.text(r["epoch"], ax.get_ylim()[1], f" N={r['horizon']}", va="top", fontsize=8, color="grey")
            stage = r["stage"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("ln loss")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first meta-loss epoch or validation
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
