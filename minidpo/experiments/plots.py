"""Figures of the experiments: the reward-vs-KL frontier (paper Fig. 2 left) and training dynamics."""

from __future__ import annotations

import os

COLORS = {"dpo": "C3", "dpo+nll": "C1", "preferred_ft": "C2", "unlikelihood": "C4", "ppo": "C0", "ppo_gt": "C9",
          "best_of_n": "C7", "reference": "k", "sft": "C5", "two_shot": "C8", "base": "C8"}
LABELS = {"dpo": "DPO", "dpo+nll": "DPO + NLL (rpo_alpha)", "preferred_ft": "Preferred-FT",
          "unlikelihood": "Unlikelihood", "ppo": "PPO (learned reward)", "ppo_gt": "PPO-GT", "best_of_n": "Best-of-N",
          "reference": "reference", "sft": "SFT", "two_shot": "base model, 2-shot", "base": "base model, zero-shot"}


def read_jsonl(path):
    """The rows of a JSON-lines results or metrics file (minidpo.data.read_jsonl, without record names)."""
    from ..data import read_jsonl as read_rows
    return read_rows(path, with_source=False)


def _pyplot():
    import matplotlib
    if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


PARAM_NAMES = {"dpo": "β", "dpo+nll": "β", "unlikelihood": "α", "unlikelihood_token": "α", "ppo": "KL target",
               "ppo_gt": "KL target", "best_of_n": "N"}
LINE_STYLES = ("-", "--", ":", "-.")
# A colour per hyper-parameter: each method's own colour map, darkest for its first parameter (draw_frontier).
SHADES = {"dpo": "Reds", "unlikelihood": "Purples", "ppo_gt": "GnBu", "ppo": "Blues"}


def param_color(method, index, count):
    """The colour of a method's index-th of count hyper-parameters: shades of its map, or its one colour."""
    if method not in SHADES or count < 2:
        return COLORS.get(method)
    import matplotlib
    return matplotlib.colormaps[SHADES[method]](0.95 - 0.5 * index / (count - 1))


def reward_axis_label(reward):
    """The frontier's y-axis for a scale's ground-truth reward ("vader", "toy" or a classifier's name)."""
    if reward == "vader":
        return "VADER compound score, −1 … 1"
    if reward == "toy":
        return "toy reward: share of vowels, 0 … 1"
    return f"P(positive) by {reward}, 0 … 1"


def seed_mean(rows):
    """One point per (method, param, step): the mean over seeds of reward and KL, with error bars: over
    2 or more seeds the standard error of the seed means (training and evaluation noise together), with
    one seed the row's own standard error (reward_se, kl_se; None where a row has none). In row order."""
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], str(r["param"]), r["step"]), []).append(r)
    points = []
    for (method, _, step), group in groups.items():
        point = {"method": method, "param": group[0]["param"], "step": step, "seeds": len(group),
                 "kl_is_bound": group[0].get("kl_is_bound", False),
                 "degenerate": sorted({reason for r in group for reason in r.get("degenerate", [])})}
        for key in ("reward", "kl"):
            values = [r[key] for r in group]
            point[key] = sum(values) / len(values)
            if len(values) > 1:
                variance = sum((v - point[key]) ** 2 for v in values) / (len(values) - 1)
                point[f"{key}_err"] = (variance / len(values)) ** 0.5
            else:
                point[f"{key}_err"] = group[0].get(f"{key}_se")
        points.append(point)
    return points


def param_label(method, param):
    name = PARAM_NAMES.get(method)
    return f"{name} = {param}" if name else ""


def draw_frontier(rows, ax, title="reward vs KL", ylabel="mean ground-truth reward", annotate=True, points=None,
                  legend=True):
    """One line per method and hyper-parameter (β, α, KL target; each its own shade), from the reference policy
    (where every method starts) through its evaluated checkpoints in step order; each point the mean over seeds
    with error bars (seed_mean; or `points`, e.g. frontier.pooled_points), labelled with the hyper-parameter and
    step if annotate. Best-of-N is drawn at its KL's analytic bound, log N − (N−1)/N (the true KL is at most
    that): hollow markers with a bar down to KL 0."""
    points = points if points is not None else seed_mean(rows)
    start = [p for p in points if p["method"] == "reference"]
    if start:
        ax.plot(start[0]["kl"], start[0]["reward"], "k*", ms=14, label="reference policy", zorder=5)
    methods = list(dict.fromkeys(p["method"] for p in points if p["method"] != "reference"))
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        if method == "best_of_n":
            draw_best_of_n(ax, mine, annotate)
            continue
        params = list(dict.fromkeys(str(p["param"]) for p in mine))
        for index, (param, style) in enumerate(zip(params, LINE_STYLES * len(params))):
            line = sorted((p for p in mine if str(p["param"]) == param), key=lambda p: p["step"])
            label = " ".join(filter(None, (LABELS.get(method, method), param_label(method, line[0]["param"]))))
            seeds = max(p["seeds"] for p in line)
            label += f" ({seeds} seeds)" if seeds > 1 else ""
            series = start[:1] + line
            ax.errorbar([p["kl"] for p in series], [p["reward"] for p in series],
                        xerr=[p["kl_err"] or 0 for p in series], yerr=[p["reward_err"] or 0 for p in series],
                        fmt="o" + style, color=param_color(method, index, len(params)), ms=4, lw=1.2, capsize=2,
                        elinewidth=0.8, label=label)
            if annotate:
                for p in line:
                    ax.annotate(f"{param_label(method, p['param']) or LABELS.get(method, method)}, step {p['step']}",
                                (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 3), fontsize=6,
                                color=COLORS.get(method))
    flagged = [p for p in points if p["degenerate"]]
    if flagged:  # its samples stop early, loop or stuff the reward's lexicon (imdb.DEGENERATE): read them
        ax.scatter([p["kl"] for p in flagged], [p["reward"] for p in flagged], s=120, facecolors="none",
                   edgecolors="red", linewidths=1.4, zorder=6, label="degenerate samples (imdb.DEGENERATE)")
    ax.set(title=title, xlabel="KL(π ‖ π_ref)  (nats, sequence level, on held-out prefixes)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, ncol=2)


def draw_best_of_n(ax, points, annotate=True):
    points = sorted(points, key=lambda p: p["param"])
    kls = [p["kl"] for p in points]
    ax.errorbar(kls, [p["reward"] for p in points], xerr=[kls, [0] * len(kls)],
                yerr=[p["reward_err"] or 0 for p in points], fmt="D--", mfc="none", color=COLORS["best_of_n"],
                ms=6, lw=1, capsize=2, elinewidth=0.6,
                label="Best-of-N at its KL bound log N − (N−1)/N (true KL ≤ bound)")
    if annotate:
        for p in points:
            ax.annotate(f"N = {p['param']}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, -9),
                        fontsize=6, color=COLORS["best_of_n"])


def plot_frontier(results_path, figure_path, title="reward vs KL", ylabel="mean ground-truth reward", points=None):
    """draw_frontier for a results.jsonl (or its points), saved to figure_path; returns the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    draw_frontier(read_jsonl(results_path), ax, title, ylabel, points=points)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path


def smooth(values, window):
    """Trailing moving average over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_dynamics(runs, title="DPO training dynamics", figure_path=None, window=None):
    """Chosen/rejected implicit rewards, the margin and the policy log-probs over training, each smoothed
    (a trailing moving average of `window` steps, default 1/8 of the run, at least 2; the raw values faint).
    runs: {label: folder holding a train() metrics.jsonl}, e.g. DPO with and without rpo_alpha.
    Returns the figure (saved if figure_path)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for (name, folder), style in zip(runs.items(), LINE_STYLES):
        rows = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r["split"] == "train"]
        steps = [r["step"] for r in rows]
        width = window or max(2, len(rows) // 8)
        for key, ax, color in (("rewards/chosen", 0, "C2"), ("rewards/rejected", 0, "C3"), ("rewards/margin", 1, "C0"),
                               ("logps/chosen", 2, "C2"), ("logps/rejected", 2, "C3")):
            raw = [r[key] for r in rows]
            axes[ax].plot(steps, raw, style, color=color, alpha=0.2, lw=0.8)
            axes[ax].plot(steps, smooth(raw, width), style, color=color, lw=1.8,
                          label=f"{key.split('/')[1]}, {name}")
    for ax, sub, ylabel in zip(axes, ("implicit rewards", "margin (chosen − rejected)", "policy log-probs"),
                               ("β log π(y|x)/π_ref(y|x)  (nats × β)", "β × nats", "log π(y|x)  (nats)")):
        ax.set(title=f"{sub} (faint: raw; bold: moving average)", xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    if figure_path:
        fig.savefig(figure_path, dpi=100)
    return fig


def plot_win_rates(results_path, figure_path=None, title="win rate", baseline="the reference response"):
    """Left: win rate vs sampling temperature per method, with Wilson intervals (paper Fig. 2 right,
    Fig. 3 left). Right: DPO's win rate over training steps at each temperature (Fig. 3 right).
    baseline names what every response is judged against (the y-axis). Returns the path if saved, else the figure."""
    plt = _pyplot()
    rows = read_jsonl(results_path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        final = {}
        for r in rows:
            if r["method"] == method:
                final[r["temperature"]] = r  # the last row per temperature: the end of training
        ts = sorted(final)
        rates = [final[t]["win_rate"] for t in ts]
        errors = [[final[t]["win_rate"] - final[t]["low"] for t in ts],
                  [final[t]["high"] - final[t]["win_rate"] for t in ts]]
        offset = 0.012 * (i - (len(methods) - 1) / 2)  # side by side, so that no interval hides another
        left.errorbar([t + offset for t in ts], rates, yerr=errors, marker="o", capsize=3,
                      label=LABELS.get(method, method), color=COLORS.get(method))
    left.axhline(0.5, color="grey", ls=":", lw=1)
    left.set(title="by sampling temperature", xlabel="sampling temperature", ylabel=f"win rate vs {baseline}")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4)  # below, clear of the data
    reference = next((m for m in ("sft", "preferred_ft") if any(r["method"] == m for r in rows)), None)
    temperatures = sorted({r["temperature"] for r in rows if r["method"] == "dpo"})
    shades = plt.cm.Reds([0.45 + 0.55 * i / max(1, len(temperatures) - 1) for i in range(len(temperatures))])
    last_step = max([r["step"] for r in rows if r["method"] == "dpo"] or [1])
    for i, (t, shade) in enumerate(zip(temperatures, shades)):
        start = [r for r in rows if r["method"] == reference and r["temperature"] == t and r["step"] == 0][:1]
        series = start + sorted((r for r in rows if r["method"] == "dpo" and r["temperature"] == t),
                                key=lambda r: r["step"])
        offset = 0.012 * last_step * (i - (len(temperatures) - 1) / 2)  # side by side, as on the left
        right.errorbar([r["step"] + offset for r in series], [r["win_rate"] for r in series],
                       yerr=[[r["win_rate"] - r["low"] for r in series], [r["high"] - r["win_rate"] for r in series]],
                       marker="o", capsize=3, color=shade, label=f"T = {t:g}")
    right.axhline(0.5, color="grey", ls=":", lw=1)
    origin = f" (step 0: {LABELS.get(reference, reference)}, where DPO starts)" if reference else ""
    right.set(title="DPO over training, per sampling temperature", xlabel=f"DPO step{origin}",
              ylabel=f"win rate vs {baseline}")
    if temperatures:
        right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(temperatures))
    fig.suptitle(title)
    fig.tight_layout()
    if figure_path is None:
        return fig
    fig.savefig(figure_path, dpi=100)
    plt.close(fig)
    return figure_path


def plot_frontier_panels(points, title, ylabel, zoom=3.0):
    """The frontier twice, from frontier.pooled_points: every point (left) and KL <= zoom nats (right), one legend
    below both. Returns the figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    draw_frontier([], axes[0], f"{title}: every point", ylabel, annotate=False, points=points, legend=False)
    draw_frontier([], axes[1], f"{title}: KL ≤ {zoom:g} nats", ylabel, annotate=False, points=points, legend=False)
    near = [p["reward"] for p in points if p["kl"] <= zoom]  # the same lines and colours, the view cut
    margin = 0.05 * (max(near) - min(near) or 1)
    axes[1].set(xlim=(-0.05 * zoom, zoom), ylim=(min(near) - 2 * margin, max(near) + 2 * margin))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_matched(samples, a, b, rows, labels=("DPO", "PPO-GT")):
    """Left: each seed's trajectory of a and b (mean reward vs mean KL over its evaluations, thin; the matched KLs
    dotted). Right: the paired difference a − b at each matched KL (frontier.matched_kl rows) with ± 2 SE. Returns
    the figure."""
    from .frontier import trajectories
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    for (method, param), label, color in zip((a, b), labels, ("C3", "C9")):
        for k, (seed, points) in enumerate(sorted(trajectories(samples, method, param).items())):
            rewards = [sum(r.values()) / len(r) for _, _, r in points]
            left.plot([kl for _, kl, _ in points], rewards, "o-", color=color, alpha=0.8, lw=1, ms=4,
                      label=f"{label} ({param_label(method, param)}), one line per seed" if k == 0 else None)
    for row in rows:
        left.axvline(row["kl"], color="grey", ls=":", lw=0.8)
    left.set(title="trajectories along training, seed by seed", xlabel="KL(π ‖ π_ref)  (nats, held-out prefixes)",
             ylabel="mean reward of the evaluation")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    told = [r for r in rows if r["difference"] is not None and r["se"] is not None]
    right.errorbar([r["kl"] for r in told], [r["difference"] for r in told], yerr=[2 * r["se"] for r in told],
                   fmt="o-", color="k", capsize=4, label=f"{labels[0]} − {labels[1]}, ± 2 SE (paired over prefixes)")
    right.axhline(0, color="grey", lw=1)
    right.set(title="paired difference at the same KL", xlabel="KL(π ‖ π_ref)  (nats)",
              ylabel=f"reward of {labels[0]} − reward of {labels[1]}")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
