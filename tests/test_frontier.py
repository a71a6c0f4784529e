"""Reading an IMDb run from its samples (minidpo.experiments.frontier): pooled points and the paired comparison at
matched KL, each against numbers worked out by hand."""

import math

import pytest

from minidpo.experiments import frontier, imdb


def sample(method, param, step, seed, prefix, reward, kl, k=0):
    return {"method": method, "param": param, "step": step, "seed": seed, "prefix_index": prefix, "sample": k,
            "prefix": f"p{prefix}", "completion": " text", "tokens": 5, "eos": False, "reward": reward, "kl": kl}


def trajectory(method, param, seed, points, prefixes=4, offsets=(0.0, 0.1, -0.1, 0.2)):
    """Evaluations (step, KL, base reward): prefix p's reward is base + offsets[p]; every sample measures KL."""
    return [sample(method, param, step, seed, p, base + offsets[p], kl) for step, kl, base in points
            for p in range(prefixes)]


def test_pooled_points_cluster_by_prefix_over_every_seed():
    # Two seeds, two prefixes, two samples each; the prefix means pooled over seeds are 0.25 and 0.75.
    rows = [sample("dpo", 0.1, 8, seed, p, r, 0.5 + seed, k) for seed, p, k, r in
            [(0, 0, 0, 0.0), (0, 0, 1, 0.2), (0, 1, 0, 0.6), (0, 1, 1, 0.8),
             (1, 0, 0, 0.3), (1, 0, 1, 0.5), (1, 1, 0, 0.7), (1, 1, 1, 0.9)]]
    results = [{"method": "dpo", "param": 0.1, "step": 8, "seed": seed, "reward": r, "reward_se": 0.1, "kl": 0.5 + seed,
                "short": short, "degenerate": flags} for seed, r, short, flags in ((0, 0.4, 0.0, []),
                                                                                  (1, 0.6, 0.6, ["short"]))]
    (point,) = frontier.pooled_points(rows, results)
    assert point["reward"] == pytest.approx(0.5) and point["seeds"] == 2 and point["samples"] == 8
    assert point["reward_err"] == pytest.approx(math.sqrt(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 1 / 2))
    assert point["kl"] == pytest.approx(1.0) and point["kl_err"] == pytest.approx(0.0)
    assert point["short"] == pytest.approx(0.3) and point["degenerate"] == ["short"]
    # One seed: the same as the experiment's own clustered SE (imdb.mean_and_se)
    (one,) = frontier.pooled_points(rows[:4], results[:1])
    assert (one["reward"], one["reward_err"]) == pytest.approx(imdb.mean_and_se([0.0, 0.2, 0.6, 0.8], [0, 0, 1, 1]))


def test_matched_kl_interpolates_each_trajectory_and_pairs_by_prefix():
    # DPO: reward 0.2 at KL 0.5 and 0.4 at KL 1.5 (so 0.3 at KL 1); PPO-GT: 0.1 at KL 0.2, 0.3 at KL 1.2
    # (0.1 + 0.8 x 0.2 = 0.26 at KL 1). Both give prefix p the same offset (mean 0.05), so the paired difference is
    # 0.04 at every prefix: SE 0.
    samples = []
    for seed in (0, 1):
        samples += trajectory("dpo", 0.05, seed, [(32, 0.5, 0.2), (64, 1.5, 0.4)])
        samples += trajectory("ppo_gt", 1.0, seed, [(8, 0.2, 0.1), (16, 1.2, 0.3)])
    (row,) = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=[1.0])
    assert row["difference"] == pytest.approx(0.04) and row["se"] == pytest.approx(0.0, abs=1e-12)
    assert row["reward_a"] == pytest.approx(0.3 + 0.05) and row["reward_b"] == pytest.approx(0.26 + 0.05)
    assert row["seeds"] == [0, 1] and row["verdict"] == "a higher"
    assert frontier.overlap(samples, ("dpo", 0.05), ("ppo_gt", 1.0)) == pytest.approx((0.5, 1.2))
    # A KL outside one method's trajectory has no comparison
    (outside,) = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=[1.4])
    assert outside["difference"] is None and outside["seeds"] == [] and outside["verdict"] is None


def test_matched_kl_noise_that_differs_by_prefix_is_not_told_apart():
    # Differences +0.1 and -0.1 at alternate prefixes: mean 0 with an SE of 0.058 over 4 prefixes: not told apart.
    samples = trajectory("dpo", 0.05, 0, [(32, 0.0, 0.0), (64, 2.0, 0.0)], offsets=(0.1, -0.1, 0.1, -0.1))
    samples += trajectory("ppo_gt", 1.0, 0, [(8, 0.0, 0.0), (16, 2.0, 0.0)], offsets=(0.0, 0.0, 0.0, 0.0))
    (row,) = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=[1.0])
    assert row["difference"] == pytest.approx(0.0, abs=1e-12)
    assert row["se"] == pytest.approx(math.sqrt(4 * 0.01 / 3 / 4)) and row["verdict"] == "not told apart"
    # A seed whose trajectory does not bracket the KL is left out, and said
    samples += trajectory("dpo", 0.05, 1, [(32, 1.5, 0.0), (64, 2.0, 0.0)])
    samples += trajectory("ppo_gt", 1.0, 1, [(8, 0.0, 0.0), (16, 2.0, 0.0)])
    (row,) = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=[1.0])
    assert row["seeds"] == [0] and list(row["per_seed"]) == [0]


def test_the_figures_draw_from_samples(tmp_path):
    from minidpo.experiments import plots
    samples = trajectory("dpo", 0.05, 0, [(32, 0.5, 0.2), (64, 1.5, 0.4)])
    samples += trajectory("ppo_gt", 1.0, 0, [(8, 0.2, 0.1), (16, 1.2, 0.3)])
    results = [{"method": s["method"], "param": s["param"], "step": s["step"], "seed": 0, "reward": 0.0,
                "reward_se": 0.0, "kl": 0.0, "degenerate": []} for s in samples if s["prefix_index"] == 0]
    points = frontier.pooled_points(samples, results)
    fig = plots.plot_frontier_panels(points, "test", "reward", zoom=1.0)
    assert len(fig.axes) == 2 and len(fig.legends) == 1
    rows = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=[0.6, 1.0])
    fig = plots.plot_matched(samples, ("dpo", 0.05), ("ppo_gt", 1.0), rows)
    assert [ax.get_xlabel() for ax in fig.axes][1].startswith("KL")


def test_a_verdict_needs_every_seed_to_agree_and_params_match_as_numbers():
    # Seed 0: DPO 0.3 above PPO-GT at every prefix; seed 1: 0.1 below. Mean +0.1, SE over prefixes 0 (every prefix
    # alike), but the seeds disagree in sign: not told apart. Asked for with param 1 (an int), stored as 1.0.
    samples = []
    for seed, shift in ((0, 0.3), (1, -0.1)):
        samples += trajectory("dpo", 0.05, seed, [(32, 0.0, shift), (64, 2.0, shift)])
        samples += trajectory("ppo_gt", 1.0, seed, [(8, 0.0, 0.0), (16, 2.0, 0.0)])
    (row,) = frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1), kls=[1.0])
    assert row["difference"] == pytest.approx(0.1) and row["se"] == pytest.approx(0.0, abs=1e-12)
    assert row["per_seed"] == pytest.approx({0: 0.3, 1: -0.1}) and row["seed_se"] == pytest.approx(0.2)
    assert row["verdict"] == "not told apart"
