"""Plots of a training run, read from <out>/metrics.jsonl and the settings saved with its checkpoint."""

from __future__ import annotations

import math
import os

from .data import read_jsonl
from .runs import latest_checkpoint, saved_run_settings

LOSS_NAMES = {"sigmoid": "DPO loss (Eq. 7)", "ipo": "IPO loss", "hinge": "hinge loss"}


def loss_at_start(settings):
    """The loss when policy == reference (every margin 0): what the loss panel's reference line marks."""
    loss_type, beta = settings.get("loss_type", "sigmoid"), settings.get("beta", 0.1)
    return {"sigmoid": math.log(2), "ipo": (1 / (2 * beta)) ** 2, "hinge": 1.0}[loss_type]


def run_settings(out):
    """The settings saved with the run's latest checkpoint ({} if none)."""
    checkpoint = latest_checkpoint(out)
    return saved_run_settings(checkpoint) if checkpoint else {}


def plot_training(out, filename="training.png"):
    """Loss, implicit rewards and reward accuracy over optimizer steps, train and eval; returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_jsonl(os.path.join(out, "metrics.jsonl"), with_source=False)
    settings = run_settings(out)
    loss_type = settings.get("loss_type", "sigmoid")
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
    start = loss_at_start(settings)
    axes[0].axhline(start, color="grey", lw=0.8, ls=":", label=f"{start:.4g} at the start (policy = reference)")
    titles = (f"{LOSS_NAMES[loss_type]}, β = {settings.get('beta', '?')}", "implicit rewards  β log π/π_ref",
              "reward accuracy (chosen > rejected)")
    ylabels = ("loss (nats)" if loss_type == "sigmoid" else "loss", "reward (nats × β)", "fraction of pairs")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
