"""The experiments' figures (minidpo.experiments.plots): the frontier's lines, error bars and labels, and
the smoothed training dynamics."""

import json
import math

import matplotlib
import pytest

from minidpo.experiments import plots

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def row(method, param, step, reward, kl, seed=0, reward_se=0.01, kl_se=0.02, **extra):
    return {"method": method, "param": param, "step": step, "seed": seed, "reward": reward, "kl": kl,
            "reward_se": reward_se, "kl_se": kl_se, **extra}


ROWS = [row("reference", "-", 0, 0.1, 0.0),
        row("dpo", 0.1, 8, 0.3, 1.0, seed=0), row("dpo", 0.1, 8, 0.5, 3.0, seed=1),
        row("dpo", 0.1, 16, 0.6, 4.0, seed=0), row("dpo", 0.1, 16, 0.6, 4.0, seed=1),
        row("dpo", 1.0, 16, 0.2, 0.5),
        row("ppo_gt", 3.0, 4, 0.4, 2.0),
        row("best_of_n", 4, 0, 0.35, math.log(4) - 3 / 4, kl_se=0.0, kl_is_bound=True),
        row("best_of_n", 16, 0, 0.5, math.log(16) - 15 / 16, kl_se=0.0, kl_is_bound=True)]


def test_seed_mean_averages_seeds_and_takes_their_standard_error():
    points = {(p["method"], p["param"], p["step"]): p for p in plots.seed_mean(ROWS)}
    two = points[("dpo", 0.1, 8)]
    assert (two["reward"], two["kl"], two["seeds"]) == pytest.approx((0.4, 2.0, 2))
    # std of (0.3, 0.5) is 0.1414; over sqrt(2) seeds: 0.1. KL: std of (1, 3) = 1.414, / sqrt(2) = 1.
    assert (two["reward_err"], two["kl_err"]) == pytest.approx((0.1, 1.0))
    one = points[("dpo", 1.0, 16)]  # one seed: the row's own standard errors
    assert (one["reward_err"], one["kl_err"]) == (0.01, 0.02)
    legacy = plots.seed_mean([{"method": "dpo", "param": 0.1, "step": 8, "reward": 0.2, "kl": 1.0}])[0]
    assert legacy["reward_err"] is None  # old results without standard errors still draw


def test_frontier_has_one_labelled_line_per_hyper_parameter_and_best_of_n_at_its_bound():
    fig, ax = plt.subplots()
    plots.draw_frontier(ROWS, ax, "t", ylabel=plots.reward_axis_label("vader"))
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["reference policy", "DPO β = 0.1 (2 seeds)", "DPO β = 1.0", "PPO-GT KL target = 3.0",
                      "Best-of-N at its KL bound log N − (N−1)/N (true KL ≤ bound)"]
    assert ax.get_ylabel() == "VADER compound score, −1 … 1" and "KL" in ax.get_xlabel()
    texts = [t.get_text() for t in ax.texts]
    assert "β = 0.1, step 8" in texts and "β = 0.1, step 16" in texts and "N = 16" in texts
    # DPO β = 0.1 runs from the reference through its two steps, at the seed means.
    line = next(c for c in ax.containers if c.get_label() == "DPO β = 0.1 (2 seeds)")
    assert list(zip(*line.lines[0].get_data())) == [(0.0, 0.1), (2.0, 0.4), (4.0, 0.6)]
    plt.close(fig)


def test_reward_axis_is_named_by_the_scales_reward():
    assert plots.reward_axis_label("toy").startswith("toy reward")
    assert "siebert" in plots.reward_axis_label("siebert/sentiment-roberta-large-english")


def test_smoothing_is_a_trailing_moving_average():
    assert plots.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plots.smooth([2.0, 4.0], 1) == [2.0, 4.0]


def test_dynamics_draw_raw_and_smoothed_curves_with_labelled_axes(tmp_path):
    runs = {}
    for name, offset in (("DPO", 0.0), ("DPO + NLL", 1.0)):
        folder = tmp_path / name
        folder.mkdir()
        metrics = [{"split": "train", "step": s, "rewards/chosen": s + offset, "rewards/rejected": -s,
                    "rewards/margin": 2 * s + offset, "logps/chosen": -10.0 + s, "logps/rejected": -10.0 - s}
                   for s in range(1, 17)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        runs[name] = str(folder)
    fig = plots.plot_dynamics(runs, title="t", figure_path=str(tmp_path / "d.png"), window=4)
    left = fig.axes[0]
    assert len(left.lines) == 2 * 2 * 2  # chosen and rejected, raw and smoothed, two runs
    raw, smoothed = left.lines[0], left.lines[1]
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None
    assert list(smoothed.get_ydata()) == plots.smooth(list(raw.get_ydata()), 4)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    assert (tmp_path / "d.png").stat().st_size > 10_000
    plt.close(fig)


def test_win_rates_draw_dpo_over_training_per_temperature_from_its_reference(tmp_path):
    def rate(method, t, step, p):
        return {"method": method, "temperature": t, "step": step, "win_rate": p, "low": p - 0.1, "high": p + 0.1}

    rows = [rate("base", 0.0, 0, 0.1)] + [rate("sft", t, 0, 0.2) for t in (0.0, 1.0)]
    rows += [rate("dpo", t, step, 0.3) for step in (2, 4) for t in (0.0, 1.0)]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plots.plot_win_rates(str(path), baseline="the chosen response")
    left, right = fig.axes
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["base model, zero-shot", "SFT", "DPO"]
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["T = 0", "T = 1"]
    assert len(right.containers) == 2  # one error-bar series per temperature: its SFT point, then DPO's
    # each series at its steps, shifted a little and apart from the others so that no interval hides another
    offsets = []
    for series in right.containers:
        xs = list(series.lines[0].get_xdata())
        assert [round(x) for x in xs] == [0, 2, 4] and len({round(x - step, 9) for x, step in zip(xs, (0, 2, 4))}) == 1
        offsets.append(xs[0])
    assert len(set(offsets)) == 2 and max(map(abs, offsets)) < 0.1
    left_offsets = [series.lines[0].get_xdata()[0] for series in left.containers]
    assert len(set(left_offsets)) == 3 and max(map(abs, left_offsets)) < 0.05  # base, SFT and DPO at T = 0
    assert "SFT" in right.get_xlabel() and right.get_ylabel() == left.get_ylabel() == "win rate vs the chosen response"
    plt.close(fig)
