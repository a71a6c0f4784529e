"""Reading an IMDb run (minidpo.experiments.imdb) from its per-sample file: the points, the matched-KL comparison
and the samples notebook 03 shows.

    samples = frontier.read_samples(run_folder)
    points = frontier.pooled_points(samples, results)     # one point per method, parameter and step, seeds pooled
    frontier.matched_kl(samples, ("dpo", 0.05), ("ppo_gt", 1.0), kls=(0.5, 1.0))   # paired, per prefix
    frontier.show_samples(samples, [("dpo", 0.05, 128)], prefixes=3)

Statistics, one kind per column:
- a point's reward and KL: the mean over all its samples (every seed's), with the standard error clustered by
  prefix: the std over prefixes of each prefix's mean over its samples (all seeds) / sqrt(prefixes). It includes
  the choice of prefixes and of completions and, through the per-prefix means, part of the training seeds' spread;
  a shift that one seed's training gives every prefix alike is in the seed spread, printed beside it.
- a matched-KL difference: per seed, each method's per-prefix mean reward interpolated linearly in KL between the
  two evaluated steps around the KL asked for; per prefix the difference averaged over seeds; the mean over prefixes
  with its standard error over prefixes (paired: both methods saw the same prefixes with the same sampling stream);
  beside it the per-seed estimates and their standard error over seeds (the training runs' spread). A verdict needs
  both: beyond 2 SE over prefixes, and every seed's estimate of the same sign. The error of the KL at which each
  trajectory is read (its KL is estimated from samples too) is not in either SE.
"""

from __future__ import annotations

import os

from .imdb import mean_and_se
from .plots import read_jsonl


def read_samples(folder):
    """samples.jsonl of a run folder: one row per evaluated sample."""
    return read_jsonl(os.path.join(folder, "samples.jsonl"))


def param_key(param):
    """A hyper-parameter as a comparable key: 1 and 1.0 alike, "-" as itself."""
    return float(param) if isinstance(param, (int, float)) else str(param)


def point_key(row):
    return row["method"], param_key(row["param"]), row["step"]


def clustered(values_by_prefix):
    """(mean, standard error) over prefixes of {prefix: [values]}: imdb.mean_and_se's, clustered by prefix (the SE
    None with fewer than 2 prefixes; both None without values)."""
    values = [v for vs in values_by_prefix.values() for v in vs]
    prefixes = [p for p, vs in values_by_prefix.items() for _ in vs]
    return mean_and_se(values, prefixes) if values else (None, None)


def pooled_points(samples, results):
    """One point per (method, param, step), in results' order: reward and KL over every seed's samples with the
    prefix-clustered standard error (reward_err, kl_err), the seeds, the seed spread (min and max of the seeds'
    mean rewards), and the degeneracy measures averaged over the seeds' rows (flags: any seed's). Best-of-N keeps
    its KL bound."""
    by_point = {}
    for s in samples:
        by_point.setdefault(point_key(s), []).append(s)
    rows_of = {}
    for r in results:
        rows_of.setdefault(point_key(r), []).append(r)
    points = []
    for key, rows in rows_of.items():
        mine = by_point.get(key, [])
        rewards, kls = {}, {}
        for s in mine:
            rewards.setdefault(s["prefix_index"], []).append(s["reward"])
            if s["kl"] is not None:
                kls.setdefault(s["prefix_index"], []).append(s["kl"])
        point = {"method": rows[0]["method"], "param": rows[0]["param"], "step": rows[0]["step"], "seeds": len(rows),
                 "kl_is_bound": rows[0].get("kl_is_bound", False), "samples": len(mine),
                 "seed_rewards": [r["reward"] for r in rows],
                 "degenerate": sorted({reason for r in rows for reason in r.get("degenerate", [])})}
        point["reward"], point["reward_err"] = clustered(rewards) if mine else (rows[0]["reward"], rows[0]["reward_se"])
        if point["kl_is_bound"] or not kls:
            point["kl"], point["kl_err"] = rows[0]["kl"], None
        else:
            point["kl"], point["kl_err"] = clustered(kls)
        for measure in ("short", "repeated_bigrams", "lexicon"):
            if measure in rows[0]:
                point[measure] = sum(r[measure] for r in rows) / len(rows)
        points.append(point)
    return points


def trajectories(samples, method, param):
    """{seed: [(step, mean KL, {prefix: mean reward})]} of one run's evaluations in step order (its KL the mean
    over the samples that measured it)."""
    runs = {}
    for s in samples:
        if s["method"] == method and param_key(s["param"]) == param_key(param):
            runs.setdefault(s["seed"], {}).setdefault(s["step"], []).append(s)
    out = {}
    for seed, steps in runs.items():
        points = []
        for step in sorted(steps):
            kls = [s["kl"] for s in steps[step] if s["kl"] is not None]
            rewards = {}
            for s in steps[step]:
                rewards.setdefault(s["prefix_index"], []).append(s["reward"])
            points.append((step, sum(kls) / len(kls), {p: sum(v) / len(v) for p, v in rewards.items()}))
        out[seed] = points
    return out


def at_kl(points, kl):
    """A trajectory's per-prefix mean rewards interpolated linearly at this KL between the two evaluations around
    it (taken in step order: the first crossing). None if the trajectory never brackets it."""
    for (_, kl_a, rewards_a), (_, kl_b, rewards_b) in zip(points, points[1:]):
        if min(kl_a, kl_b) <= kl <= max(kl_a, kl_b) and kl_a != kl_b:
            w = (kl - kl_a) / (kl_b - kl_a)
            return {p: (1 - w) * rewards_a[p] + w * rewards_b[p] for p in rewards_a}
    return None


def matched_kl(samples, a, b, kls):
    """The paired difference a − b of mean reward at each KL in kls (a, b: (method, param)), seeds matched by
    number. Returns one row per KL: kl, difference, se (over prefixes of the seed-averaged per-prefix difference),
    seeds (those whose two trajectories both bracket the KL), per_seed (each seed's mean difference), seed_se (their
    standard error over seeds; None with one seed), each method's interpolated mean reward, and a verdict: "a higher"
    or "b higher" beyond 2 SE with every seed agreeing in sign, else "not told apart" (None where no seed brackets
    the KL)."""
    runs_a, runs_b = trajectories(samples, *a), trajectories(samples, *b)
    out = []
    for kl in kls:
        per_prefix, per_seed, means = {}, {}, {"a": [], "b": []}
        for seed in sorted(set(runs_a) & set(runs_b)):
            rewards_a, rewards_b = at_kl(runs_a[seed], kl), at_kl(runs_b[seed], kl)
            if rewards_a is None or rewards_b is None:
                continue
            shared = sorted(set(rewards_a) & set(rewards_b))
            differences = {p: rewards_a[p] - rewards_b[p] for p in shared}
            per_seed[seed] = sum(differences.values()) / len(shared)
            means["a"].append(sum(rewards_a[p] for p in shared) / len(shared))
            means["b"].append(sum(rewards_b[p] for p in shared) / len(shared))
            for p, d in differences.items():
                per_prefix.setdefault(p, []).append(d)
        difference, se = clustered({p: [sum(ds) / len(ds)] for p, ds in per_prefix.items()})
        _, seed_se = clustered({seed: [d] for seed, d in per_seed.items()})
        verdict = None
        if difference is not None and se is not None:
            agree = all(d > 0 for d in per_seed.values()) or all(d < 0 for d in per_seed.values())
            verdict = "not told apart" if abs(difference) <= 2 * se or not agree else \
                "a higher" if difference > 0 else "b higher"
        out.append({"kl": kl, "difference": difference, "se": se, "seeds": sorted(per_seed), "per_seed": per_seed,
                    "seed_se": seed_se,
                    "reward_a": sum(means["a"]) / len(means["a"]) if means["a"] else None,
                    "reward_b": sum(means["b"]) / len(means["b"]) if means["b"] else None, "verdict": verdict})
    return out


def overlap(samples, a, b):
    """(low, high): the KL range every seed's trajectories of a and b both cover (None if they share none)."""
    runs_a, runs_b = trajectories(samples, *a), trajectories(samples, *b)
    ranges = [(min(k for _, k, _ in run[seed]), max(k for _, k, _ in run[seed]))
              for seed in set(runs_a) & set(runs_b) for run in (runs_a, runs_b)]
    if not ranges:
        return None
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (low, high) if low < high else None


def show_samples(samples, shown, prefixes=3, seed=0, width=160, smoke=False):
    """Print the first `samples`-per-prefix completion of the first `prefixes` held-out prefixes for each
    (method, param, step, label) in shown, with its reward, length, EOS and KL. smoke: lengths only (a random
    model writes random bytes)."""
    for method, param, step, label in shown:
        mine = [s for s in samples if (s["method"], param_key(s["param"]), s["step"], s["seed"], s["sample"]) ==
                (method, param_key(param), step, seed, 0) and s["prefix_index"] < prefixes]
        print(f"--- {label} ({method} {param}, step {step}, seed {seed})")
        for s in sorted(mine, key=lambda s: s["prefix_index"]):
            ending = "EOS" if s["eos"] else "cut at the budget" if not smoke else "no EOS"
            kl = f", KL {s['kl']:.2f}" if s["kl"] is not None else ""
            text = f"{s['prefix']!r} + {s['tokens']} tokens" if smoke else repr(s["prefix"] + s["completion"])[:width]
            print(f"  {s['reward']:+.3f} ({s['tokens']} tokens, {ending}{kl})  {text}")
