"""Plots of a training run, read from <out>/metrics.jsonl."""

from __future__ import annotations

import os

from .dpo import read_jsonl


def plot_training(out, filename="training.png"):
    """Loss, implicit rewards and reward accuracy over optimizer steps, train and eval; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"loss": "C0", "rewards/chosen": "C2", "rewards/rejected": "C3", "rewards/margin": "C0",
              "rewards/accuracy": "C0"}
    panels = ((0, ("loss",)), (1, ("rewards/chosen", "rewards/rejected", "rewards/margin")), (2, ("rewards/accuracy",)))
    for split, style in (("train", dict(lw=1, alpha=0.6)), ("eval", dict(marker="o", lw=2))):
        part = [r for r in rows if r["split"] == split]
        steps = [r["step"] for r in part]
        for i, keys in panels:
            for key in keys:
                name = key.split("/")[-1]
                axes[i].plot(steps, [r[key] for r in part], color=colors[key], label=f"{name} ({split})", **style)
    axes[0].axhline(0.6931, color="grey", lw=0.8, ls=":", label="ln 2 (policy = reference)")
    titles = ("DPO loss (Eq. 7)", "implicit rewards  β log π/π_ref", "reward accuracy (chosen > rejected)")
    ylabels = ("loss (nats)", "reward (nats × β)", "fraction of pairs")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
