"""Figures of the experiments: the reward-vs-KL frontier (paper Fig. 2 left) and training dynamics."""

from __future__ import annotations

import json
import os

COLORS = {"dpo": "C3", "dpo+nll": "C1", "preferred_ft": "C2", "unlikelihood": "C4", "ppo": "C0", "ppo_gt": "C9",
          "best_of_n": "C7", "reference": "k"}
LABELS = {"dpo": "DPO", "dpo+nll": "DPO + NLL (rpo_alpha)", "preferred_ft": "Preferred-FT",
          "unlikelihood": "Unlikelihood", "ppo": "PPO (learned reward)", "ppo_gt": "PPO-GT", "best_of_n": "Best-of-N",
          "reference": "reference"}


def read_jsonl(path):
    """The rows of a JSON-lines results or metrics file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def plot_win_rates(results_path, figure_path=None, title="win rate"):
    """Left: win rate vs sampling temperature per method, with Wilson intervals (paper Fig. 2 right,
    Fig. 3 left). Right: DPO's win rate at temperature 0 over training steps (Fig. 3 right).
    Returns the path if saved, else the figure."""
    plt = _pyplot()
    rows = read_jsonl(results_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        final = {}
        for r in rows:
            if r["method"] == method:
                final[r["temperature"]] = r  # the last row per temperature: the end of training
        ts = sorted(final)
        rates = [final[t]["win_rate"] for t in ts]
        errors = [[final[t]["win_rate"] - final[t]["low"] for t in ts],
                  [final[t]["high"] - final[t]["win_rate"] for t in ts]]
        left.errorbar(ts, rates, yerr=errors, marker="o", capsize=3, label=LABELS.get(method, method),
                      color=COLORS.get(method))
    left.axhline(0.5, color="grey", ls=":", lw=1)
    left.set(title="by sampling temperature", xlabel="sampling temperature", ylabel="win rate vs preferred response")
    left.legend(fontsize=9)
    along = sorted((r for r in rows if r["method"] == "dpo" and r["temperature"] == 0.0), key=lambda r: r["step"])
    start = [r for r in rows if r["method"] == "preferred_ft" and r["temperature"] == 0.0][:1]
    series = start + along
    if series:
        right.errorbar([r["step"] for r in series], [r["win_rate"] for r in series],
                       yerr=[[r["win_rate"] - r["low"] for r in series], [r["high"] - r["win_rate"] for r in series]],
                       marker="o", capsize=3, color=COLORS["dpo"], label="DPO (step 0: its SFT reference)")
    right.axhline(0.5, color="grey", ls=":", lw=1)
    right.set(title="DPO over training, temperature 0", xlabel="DPO step", ylabel="win rate vs preferred response")
    right.legend(fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    if figure_path is None:
        return fig
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path
