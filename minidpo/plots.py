"""Plots of a training run, read from <out>/metrics.jsonl."""

from __future__ import annotations

import json
import os


def read_metrics(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(out, filename="training.png"):
    """Loss, implicit rewards and reward accuracy over optimizer steps, train and eval; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        steps = [r["step"] for r in part]
        axes[0].plot(steps, [r["loss"] for r in part], style, label=split)
        axes[1].plot(steps, [r["rewards/chosen"] for r in part], style, label=f"chosen ({split})")
        axes[1].plot(steps, [r["rewards/rejected"] for r in part], style, label=f"rejected ({split})")
        axes[1].plot(steps, [r["rewards/margin"] for r in part], style, label=f"margin ({split})")
        axes[2].plot(steps, [r["rewards/accuracy"] for r in part], style, label=split)
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
