"""Figures of the experiments: the reward-vs-KL frontier (paper Fig. 2 left) and training dynamics."""

from __future__ import annotations

import os

from ..dpo import read_jsonl

COLORS = {"dpo": "C3", "dpo+nll": "C1", "preferred_ft": "C2", "unlikelihood": "C4", "ppo": "C0", "ppo_gt": "C9",
          "best_of_n": "C7", "reference": "k"}
LABELS = {"dpo": "DPO", "dpo+nll": "DPO + NLL (rpo_alpha)", "preferred_ft": "Preferred-FT", "unlikelihood": "Unlikelihood",
          "ppo": "PPO (learned reward)", "ppo_gt": "PPO-GT", "best_of_n": "Best-of-N", "reference": "reference"}


def upper_frontier(points):
    """The points no other point beats on both axes (lower KL and higher reward), sorted by KL."""
    frontier, best = [], float("-inf")
    for kl, reward in sorted(points):
        if reward > best:
            frontier.append((kl, reward))
            best = reward
    return frontier


def _pyplot():
    import matplotlib
    if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_frontier(rows, ax, title="reward vs KL"):
    """One colour per method, every evaluated checkpoint a point, each method's frontier a line (from
    the reference policy, where every method starts)."""
    start = [(r["kl"], r["reward"]) for r in rows if r["method"] == "reference"]
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["kl"], r["reward"]) for r in rows if r["method"] == method]
        if method == "reference":
            ax.plot(*points[0], "k*", ms=14, label="reference policy")
            continue
        color = COLORS.get(method)
        ax.scatter(*zip(*points), color=color, alpha=0.45, s=22)
        ax.plot(*zip(*upper_frontier(points + start)), "-o", color=color, ms=4, label=LABELS.get(method, method))
    ax.set(title=title, xlabel="KL(π ‖ π_ref)  (nats, sequence level)", ylabel="mean ground-truth reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)


def plot_frontier(results_path, figure_path, title="reward vs KL"):
    """draw_frontier for a results.jsonl, saved to figure_path; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    draw_frontier(read_jsonl(results_path), ax, title)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path


def plot_dynamics(runs, title="DPO training dynamics", figure_path=None):
    """Chosen/rejected implicit rewards, the margin and the policy log-probs over training.
    runs: {label: folder holding a train() metrics.jsonl}. Returns the figure (saved if figure_path)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (name, folder), style in zip(runs.items(), ("-", "--", ":")):
        rows = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r["split"] == "train"]
        steps = [r["step"] for r in rows]
        for key, ax, color in (("rewards/chosen", 0, "C2"), ("rewards/rejected", 0, "C3"), ("rewards/margin", 1, "C0"),
                               ("logps/chosen", 2, "C2"), ("logps/rejected", 2, "C3")):
            axes[ax].plot(steps, [r[key] for r in rows], style, color=color, label=f"{key.split('/')[1]}, {name}")
    for ax, sub, ylabel in zip(axes, ("implicit rewards", "margin (chosen − rejected)", "policy log-probs"),
                               ("β log π/π_ref", "β × nats", "log π(y|x)  (nats)")):
        ax.set(title=sub, xlabel="optimizer step", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    if figure_path:
        fig.savefig(figure_path, dpi=100)
    return fig
