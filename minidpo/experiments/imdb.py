"""The IMDb sentiment experiment (paper Fig. 2 left): the reward-vs-KL frontier of every method.

    python -m minidpo.experiments.imdb --scale smoke        # tiny random GPT-2, toy reward: ~1 minute
    python -m minidpo.experiments.imdb --scale laptop       # SmolLM2-135M-Instruct + VADER, offline: ~30 min, 2 cores
    python -m minidpo.experiments.imdb --scale laptop_long  # DPO and PPO-GT at matched KL, 3 seeds: ~1.5 h
    python -m minidpo.experiments.imdb --scale gpu          # the same assets, paper-sized budgets, bf16: one H100
    python -m minidpo.experiments.imdb --scale paper        # gpt2-large SFT on IMDb + siebert classifier, on a GPU
    python -m minidpo.experiments.imdb --scale laptop --estimate   # the estimated time only

1. prompts: review prefixes of 2-8 tokens, split into training and held-out prefixes;
2. the reference policy: the model as shipped (smoke, laptop), or fine-tuned on IMDb reviews (paper);
3. preference pairs: 4 samples per training prefix from the reference, all 6 pairs ranked by the
   ground-truth reward (ties and empty completions dropped and counted);
4. methods, all from the same reference on the same pairs, every policy with dropout off: DPO (beta
   sweep, the core train()), Preferred-FT, Unlikelihood (alpha sweep; the paper's sequence-level form),
   PPO with a learned Bradley-Terry reward model (the LM with a scalar head, Eq. 2) and PPO-GT with the
   ground-truth reward, each at every target KL, Best-of-N with the learned reward model;
5. every few steps, each policy is sampled on the held-out prefixes (eval_samples per prefix): mean
   ground-truth reward and mean sequence-level KL(pi || pi_ref) (the sum of exact per-token KLs along the
   policy's samples), each with its standard error clustered by prefix; DPO and the methods in `seeded`
   train with `seeds` seeds;
6. results.jsonl (one row per method, hyper-parameter, seed and step: reward, reward_se, kl, kl_se),
   summary.json, frontier.png (mean over seeds, error bars) and dynamics.png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import dpo
from ..baselines import BASELINES, best_of_n_kl, train_baseline
from ..bundled import bundled_path
from ..judges import best_scored, repeated_bigrams
from ..models import freeze_all_but_top, load_model
from ..ppo import PPOConfig, ppo_train
from ..reward_model import RewardModelConfig, train_reward_model
from ..runs import RunConfig
from ..runs import train as dpo_train
from ..sampling import generate, sequence_kl


@dataclass
class Scale:
    model: str  # "tiny" | "smollm2" | a hub name or folder
    reward: str  # "toy" | "vader" | a sequence-classifier name
    train_prompts: int  # training prefixes (x 4 samples x 6 pairs)
    eval_prompts: int  # held-out prefixes, one sample each per evaluation
    new_tokens: int  # completion length
    steps: int  # optimizer steps per data-driven method
    eval_every: int  # evaluate every N optimizer steps
    ppo_eval_every: int  # evaluate PPO every N iterations
    batch_size: int  # pairs per step
    lr: float  # DPO / Preferred-FT / Unlikelihood peak learning rate
    optimizer: str = "adamw"  # of DPO and the baselines: adamw | rmsprop (the paper's)
    warmup_steps: int = 0  # linear warmup of DPO and the baselines (the paper: 150)
    dpo_betas: tuple[float, ...] = (0.1, 1.0)
    ul_alphas: tuple[float, ...] = (0.1, 1.0)
    ppo_targets: tuple[float, ...] = (6.0,)  # target KLs of PPO-GT and PPO (learned reward) alike
    learned_ppo_targets: tuple[float, ...] | None = None  # PPO (learned reward) at these instead
    ppo: dict = field(default_factory=dict)  # PPOConfig overrides
    ppo_eval_early: tuple[int, ...] = ()  # PPO also evaluated at these iterations (its KL grows fastest at first)
    reward_model: dict = field(default_factory=dict)  # RewardModelConfig overrides (the learned reward)
    best_of: tuple[int, ...] = (4, 16)
    train_layers: int = 0  # train only the top N transformer blocks (0: all)
    rpo_alpha: float = 1.0  # the extra DPO run with an NLL term, for the training-dynamics plot (0: skip)
    sft_epochs: float = 0.0  # paper scale: fine-tune the reference on IMDb train reviews first (the paper: 1)
    sft_batch_size: int = 8
    samples: int = 4  # reference samples per training prefix
    imdb: str = "stanfordnlp/imdb"  # paper scale: the IMDb dataset (hub name or local file)
    eval_samples: int = 1  # samples per held-out prefix per evaluation (reward: all of them)
    kl_samples: int = 0  # of those, how many per prefix also measure the KL (0: all)
    best_of_picks: int = 1  # Best-of-N: picks (each the best of N candidates) per held-out prefix
    seeds: int = 1  # training seeds (seed, seed + 1, ...) of the methods in `seeded`; the others run once
    seeded: tuple[str, ...] = ("dpo", "ppo_gt", "ppo")
    # The matched-KL design: of the seeded runs, only DPO at dpo_betas[0] and PPO-GT at ppo_targets[0] run `seeds`
    # seeds, evaluated every eval_every steps / ppo_eval_every iterations along training (their trajectories are
    # compared at the same KL: matched_kl); every other run runs once and is evaluated at its end.
    matched: bool = False
    dtype: str = "fp32"  # fp32 | bf16 | auto (bf16 autocast on a GPU, fp32 on a CPU): dpo.uses_bf16
    sample_batch: int = 32  # prompts per generate() call (a GPU wants hundreds)


SCALES = {
    "smoke": Scale(model="tiny", reward="toy", train_prompts=12, eval_prompts=8, new_tokens=12, steps=8, eval_every=4,
                   ppo_eval_every=2, batch_size=8, lr=3e-3,
                   ppo=dict(iterations=4, rollouts=8, minibatch=4, ppo_epochs=2, lr=3e-3),
                   reward_model=dict(epochs=2, batch_size=8, lr=1e-3, eval_every=4), best_of=(4,)),
    # The quick look, designed for ~29 min alone on 2 cores (estimate_seconds; printed at the start): the
    # paper's grids, one seed, top 4 blocks trained, one evaluation at the end of each run. 64 prefixes x 4
    # samples: 384 pairs (one epoch in 48 steps of 8). Held-out: 64 prefixes x 4 samples = 256 rewards per
    # point, standard error ~0.03 for VADER's std 0.5; KL on one sample
    # per prefix. PPO's horizon is one rollout batch, so kl_coef can move x0.8 or x1.2 per iteration; at
    # lr 1e-4 PPO-GT reaches held-out KL ~0.9 in 8 iterations and 1.5 (target 0.5) or 2.3 (target 2) in 16
    # (measured; at 2e-5, 12 iterations stayed below KL 0.2 and both targets gave the same run).
    "laptop": Scale(model="smollm2", reward="vader", train_prompts=64, eval_prompts=64, new_tokens=24, steps=48,
                    eval_every=48, ppo_eval_every=8, batch_size=8, lr=5e-5, train_layers=4,
                    dpo_betas=(0.05, 0.1, 1.0, 5.0), ul_alphas=(0.1, 1.0), ppo_targets=(0.5, 2.0),
                    ppo=dict(iterations=16, rollouts=16, minibatch=8, ppo_epochs=2, lr=1e-4, horizon=16),
                    reward_model=dict(epochs=1, batch_size=8, lr=5e-5, train_layers=4, eval_every=24),
                    best_of=(4, 16), eval_samples=4, kl_samples=1),
    # The evidence, the matched-KL design (matched), designed for ~110 min alone on 2 cores: 80 min by
    # estimate_seconds x 1.37, what the November costs under-estimated on a 2-core AMD EPYC (89 min estimated,
    # 2 h 1.5 min measured for the previous design, every part 1.2-1.6x); measured 1 h 32 min (2026-12-04,
    # docs/results/imdb_laptop_long_*). DPO at beta 0.05 and PPO-GT at target 1
    # each with 3 seeds, evaluated along training (DPO every 32 steps; PPO-GT at iterations 2, 4, then every 8, as
    # its KL grows fastest at first) so that their KL ranges overlap and their rewards can be compared at the same
    # KL; every other run once, evaluated at its end. 134 prefixes x 4 samples (~800 pairs, 1.3 epochs in 128
    # steps), the top 6 blocks trained. Held-out: 72 prefixes x 4 samples = 288 rewards per point (standard error
    # ~0.03 each; the matched comparison pools 3 seeds: 864 per method), KL on one sample per prefix. Reward model:
    # 3 epochs, the best validation checkpoint (the paper's); PPO with it at target 1 only.
    "laptop_long": Scale(model="smollm2", reward="vader", train_prompts=134, eval_prompts=72, new_tokens=24,
                         steps=128, eval_every=32, ppo_eval_every=8, batch_size=8, lr=5e-5, train_layers=6,
                         dpo_betas=(0.05, 0.1, 1.0, 5.0), ul_alphas=(0.1, 1.0), ppo_targets=(1.0, 4.0),
                         learned_ppo_targets=(1.0,), ppo_eval_early=(2, 4),
                         ppo=dict(iterations=24, rollouts=16, minibatch=8, ppo_epochs=2, lr=1e-4, horizon=32),
                         reward_model=dict(epochs=3, batch_size=8, lr=5e-5, train_layers=6, eval_every=25),
                         best_of=(4, 16), best_of_picks=1, eval_samples=4, kl_samples=1, seeds=3,
                         seeded=("dpo", "ppo_gt"), matched=True),
    # The same offline assets with paper-sized budgets for one GPU (bf16 autocast), designed for ~15 min on an
    # H100 by estimate_seconds with ASSUMED H100 costs. A cut-down run timed on an H200 (docs/results/
    # gpu_h200_2026-11-26) found PPO ~3x slower than assumed: the whole preset ~30 min there. Not yet re-sized
    # (one cut-down run): time it whole and scale `steps` and PPO's iterations to fit. Every
    # block trained; 134 prefixes x 10 samples: ~6k pairs (the paper's pair counts from more samples per
    # prefix: only 214 prefixes ship); 80 steps of 64 pairs; 3 seeds of DPO and PPO-GT. Held-out: 80
    # prefixes x 16 samples = 1280 rewards per point, standard error 0.5 / sqrt(1280) = 0.014 (Best-of-N:
    # 80 x 4 picks, 0.028); KL on one sample per prefix.
    "gpu": Scale(model="smollm2", reward="vader", train_prompts=134, eval_prompts=80, new_tokens=48, steps=80,
                 eval_every=40, ppo_eval_every=16, batch_size=64, lr=5e-6, train_layers=0,
                 dpo_betas=(0.05, 0.1, 1.0, 5.0), ul_alphas=(0.1, 1.0), ppo_targets=(3.0, 12.0),
                 ppo=dict(iterations=32, rollouts=64, minibatch=16, ppo_epochs=4, lr=1.4e-5, horizon=128),
                 reward_model=dict(epochs=1, batch_size=64, lr=1e-5, eval_every=50), best_of=(4, 16, 64),
                 best_of_picks=4, samples=10, eval_samples=16, kl_samples=1, seeds=3, seeded=("dpo", "ppo_gt"),
                 dtype="auto", sample_batch=256),
    "paper": Scale(model="gpt2-large", reward="siebert/sentiment-roberta-large-english", train_prompts=25_000,
                   eval_prompts=512, new_tokens=48, steps=1500, eval_every=100, ppo_eval_every=10, batch_size=64,
                   lr=1e-6, optimizer="rmsprop", warmup_steps=150,  # the paper's optimisation, for every method
                   dpo_betas=(0.05, 0.1, 1.0, 5.0), ul_alphas=(0.05, 0.1, 0.5, 1.0), ppo_targets=(3.0, 6.0, 9.0, 12.0),
                   ppo=dict(iterations=200, rollouts=64, minibatch=16, lr=1.4e-5), best_of=(4, 16, 64, 128),
                   reward_model=dict(epochs=3, batch_size=64, lr=1e-5, eval_every=100), sft_epochs=1.0,
                   dtype="auto"),
}


# ---- what a preset costs ---------------------------------------------------------------------------------

# Seconds per unit for SmolLM2-135M, fp32, 2 CPU threads, measured (on the project's 2-core machine, 2026-11):
# a forward pass per token (reference forward: 1.6 s for 8 pairs of 56 tokens), a training step per token
# and trained block (DPO step, 8 pairs, precomputed reference: 2.1 s with the top 4 blocks, ~6 s with all 30),
# sampling per generated token (64 prompts x 48 tokens: 15 s), KL per completion token (64 x 48: 17 s).
LAPTOP_COSTS = {"load": 20.0, "forward_token": 1.6 / (16 * 56), "train_token_per_block": 0.15 / (16 * 56),
                "sample_token": 15 / (64 * 48), "kl_token": 17 / (64 * 48), "blocks": 30, "prompt_tokens": 6}
# One H100, bf16: NOT measured, assumed from FLOPs (~100 TFLOP/s reached on a 135M model's batches, the
# laptop's 0.12): ~300x for training and KL passes; sampling is bound by one small step per token, ~50x
# in batches of 256 (Scale.sample_batch). Measured on an H200 (docs/results/gpu_h200_2026-11-26): DPO, the reward
# model and loading within 25 % of these; sampling ~3x and PPO ~3x slower. Replace them once the whole preset is timed.
H100_COSTS = {**LAPTOP_COSTS, "load": 30.0, "forward_token": LAPTOP_COSTS["forward_token"] / 300,
              "train_token_per_block": LAPTOP_COSTS["train_token_per_block"] / 300,
              "sample_token": LAPTOP_COSTS["sample_token"] / 50, "kl_token": LAPTOP_COSTS["kl_token"] / 300}


def estimate_seconds(scale, methods=None, costs=LAPTOP_COSTS):
    """Estimated run time of run() at this scale, {part: seconds} with a "total", from per-token costs."""
    methods = methods or ["dpo", "preferred_ft", "unlikelihood", "ppo_gt", "ppo", "best_of_n"]
    c, tokens = costs, costs["prompt_tokens"] + scale.new_tokens
    blocks = scale.train_layers or costs["blocks"]
    step_token = c["forward_token"] + c["train_token_per_block"] * blocks
    pairs = scale.train_prompts * scale.samples * (scale.samples - 1) // 2
    evaluation = (scale.eval_prompts * scale.eval_samples * scale.new_tokens * c["sample_token"]
                  + scale.eval_prompts * (scale.kl_samples or scale.eval_samples) * scale.new_tokens * c["kl_token"])
    ppo_config = PPOConfig(**scale.ppo)

    def cost(method, params, train):
        """Every run of `method` at each of `params`: its seeds x (training + its evaluations)."""
        return sum(len(run_seeds(scale, method, 0, param))
                   * (train + evaluation * len(evaluation_steps(scale, method, param)))
                   for param in params)

    part = {"load": c["load"], "pairs": scale.train_prompts * scale.samples * scale.new_tokens * c["sample_token"],
            "evaluation (each)": evaluation}
    pair_step = scale.steps * scale.batch_size * 2 * tokens * step_token
    if "dpo" in methods:  # the reference log-probs once (every DPO run shares them), then each run's steps
        part["dpo"] = pairs * 2 * tokens * c["forward_token"] + cost("dpo", scale.dpo_betas, pair_step)
        if scale.rpo_alpha:
            part["dpo"] += cost("dpo+nll", [scale.dpo_betas[0]], pair_step)
    if "preferred_ft" in methods:
        part["preferred_ft"] = cost("preferred_ft", ["-"], pair_step / 2)
    if "unlikelihood" in methods:
        part["unlikelihood"] = cost("unlikelihood", scale.ul_alphas, pair_step)
    if {"ppo", "best_of_n"} & set(methods):
        rm = {**asdict(RewardModelConfig()), "train_layers": scale.train_layers, **scale.reward_model}
        rm_step_token = c["forward_token"] + c["train_token_per_block"] * (rm["train_layers"] or costs["blocks"])
        part["reward model"] = rm["epochs"] * pairs * 2 * tokens * rm_step_token
    one_ppo = ppo_config.iterations * (ppo_config.rollouts * scale.new_tokens * c["sample_token"]
                                       + ppo_config.rollouts * tokens * (2 * c["forward_token"]
                                                                         + ppo_config.ppo_epochs * step_token))
    for method in ("ppo_gt", "ppo"):
        if method in methods:
            part[method] = cost(method, ppo_targets(scale, method), one_ppo)
    if "best_of_n" in methods:
        candidates = scale.eval_prompts * scale.best_of_picks * sum(scale.best_of)
        part["best_of_n"] = candidates * (scale.new_tokens * c["sample_token"] + tokens * c["forward_token"]) \
            * len(run_seeds(scale, "best_of_n", 0))
    part["total"] = sum(v for k, v in part.items() if k != "evaluation (each)") + evaluation  # + the reference
    return part


def reward_standard_error(scale, reward_std=0.5):
    """The standard error of a point's mean reward if the eval_prompts x eval_samples rewards were
    independent with this std (VADER on SmolLM2's completions: 0.50). Prefixes add a shared part: the
    measured standard error (clustered by prefix) is recorded with every point."""
    return reward_std / math.sqrt(scale.eval_prompts * scale.eval_samples)


# ---- the pieces --------------------------------------------------------------------------------------

def load_policy(scale, device):
    return load_model(scale.model, device, tiny="gpt2")


def load_reward(scale, device):
    from ..rewards import ClassifierReward, VaderReward, toy_reward
    if scale.reward == "toy":
        return toy_reward
    if scale.reward == "vader":
        return VaderReward()
    return ClassifierReward(scale.reward, device=device)


def load_prompts(scale, tokenizer, seed):
    """(training prefixes, held-out prefixes)."""
    if scale.model in ("tiny", "smollm2"):
        with open(bundled_path("imdb_prefixes.txt")) as f:
            prefixes = [line.strip() for line in f if line.strip()]
    else:
        from ..data import load_imdb
        return (sample_prefixes(load_imdb(scale.imdb, split="train")["text"], scale.train_prompts, tokenizer, seed),
                sample_prefixes(load_imdb(scale.imdb, split="test")["text"], scale.eval_prompts, tokenizer, seed + 1))
    random.Random(seed).shuffle(prefixes)
    return prefixes[:scale.train_prompts], prefixes[scale.train_prompts:scale.train_prompts + scale.eval_prompts]


def sample_prefixes(texts, n, tokenizer, seed):
    """Prefixes (2-8 tokens) of n reviews drawn, seeded and without replacement, from the whole split:
    the hub's IMDb splits are sorted by label, so their first rows are all negative reviews."""
    from ..data import imdb_prefixes, seeded_sample
    rows = seeded_sample(range(len(texts)), n, seed)
    return imdb_prefixes([texts[i] for i in rows], tokenizer, seed=seed)


def drop_empty(completions, rewards, truncated=None):
    """Remove the empty and whitespace-only completions before pairing: there is no response to prefer
    or to fine-tune on (DPO and SFT reject them). Lists of P lists of S -> (completions, rewards, dropped), and
    the kept `truncated` flags after them when given."""
    flags = truncated or [[False] * len(comps) for comps in completions]
    kept = [[(c, r, t) for c, r, t in zip(comps, rs, ts) if c.strip()]
            for comps, rs, ts in zip(completions, rewards, flags)]
    dropped = sum(map(len, completions)) - sum(map(len, kept))
    kept_completions, kept_rewards, kept_flags = ([[item[k] for item in group] for group in kept] for k in range(3))
    return (kept_completions, kept_rewards, dropped) + ((kept_flags,) if truncated is not None else ())


def was_truncated(sample, new_tokens, eos_token_id):
    """A sample the budget cut: new_tokens tokens and no EOS at the end. DPO, the baselines and the reward
    model's data then teach no EOS after it (data.drop_eos_of_truncated): the review did not end there."""
    ids = sample["completion_ids"]
    return len(ids) >= new_tokens and ids[-1] != eos_token_id


def preference_pairs(prompts, completions, rewards, truncated=None):
    """All pairs among the samples of each prompt, the higher-reward sample chosen; ties dropped.
    prompts: list of P; completions, rewards (and truncated, whether the budget cut each sample): lists of
    P lists of S. Returns (records, ties); with `truncated`, each record says which responses were cut."""
    records, ties = [], 0
    for p, (prompt, comps, rs) in enumerate(zip(prompts, completions, rewards)):
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                if rs[i] == rs[j] or comps[i] == comps[j]:
                    ties += 1
                    continue
                w, r = (i, j) if rs[i] > rs[j] else (j, i)
                record = {"prompt": prompt, "chosen": comps[w], "rejected": comps[r],
                          "reward_chosen": rs[w], "reward_rejected": rs[r]}
                if truncated is not None:
                    record.update(chosen_truncated=truncated[p][w], rejected_truncated=truncated[p][r])
                records.append(record)
    return records, ties


def mean_and_se(values, groups):
    """The mean of `values` and its standard error, clustered by group (samples of one prefix share it):
    the std of the group means over sqrt(number of groups). groups: one label per value. With one value
    per group, the usual std / sqrt(n). None if there are fewer than 2 groups."""
    by_group = {}
    for value, group in zip(values, groups):
        by_group.setdefault(group, []).append(value)
    means = [sum(v) / len(v) for v in by_group.values()]
    mean = sum(values) / len(values)
    if len(means) < 2:
        return mean, None
    grand = sum(means) / len(means)
    return mean, math.sqrt(sum((m - grand) ** 2 for m in means) / (len(means) - 1) / len(means))


# A point is flagged degenerate (drawn hollow on the frontier) when its samples mostly stop early, loop, or stuff the
# reward's lexicon: its reward then says little about the reviews a policy writes.
DEGENERATE = {"short": 0.5, "repeated_bigrams": 0.3, "lexicon": 0.4}


class Evaluator:
    """Samples a policy on the held-out prefixes, `samples` times each: the mean ground-truth reward and the
    mean sequence KL to the reference (on the first `kl_samples` samples of each prefix; 0: all), each with
    its standard error clustered by prefix; beside them how degenerate the samples are (the share that end before
    half the token budget, the mean share of repeated word bigrams, and for VADER the mean share of lexicon words).
    Every sample goes to samples.jsonl beside the results: prefix (and its index), sample index, completion, length,
    EOS, reward, KL.

    The sampling stream is the training seed's (sampling_seed): every policy of one training seed is sampled with
    the same random numbers on the same prefixes, so two methods' rewards can be compared prefix by prefix (paired),
    and seeds differ in their samples as well as in their training, so an SE over seeds includes both."""

    def __init__(self, reference, tokenizer, prompts, reward_fn, new_tokens, results_path, seed=0, samples=1,
                 kl_samples=0, batch_size=32):
        self.reference, self.tokenizer, self.prompts = reference, tokenizer, prompts
        self.reward_fn, self.new_tokens, self.path, self.seed = reward_fn, new_tokens, results_path, seed
        self.samples, self.kl_samples, self.batch_size = samples, kl_samples or samples, batch_size
        self.pad = tokenizer.pad_token_id
        self.samples_path = os.path.join(os.path.dirname(results_path) or ".", "samples.jsonl")

    def score(self, samples):
        return self.reward_fn([s["prompt"] + s["completion"] for s in samples])

    def sampling_seed(self, seed):
        """The sampling stream of training seed `seed` (the experiment's own seed: its reference's stream)."""
        return self.seed + 7 + 1009 * (seed - self.seed)

    def __call__(self, policy, method, param, step, seed=None):
        seed = self.seed if seed is None else seed
        prefix_of = [i for i in range(len(self.prompts)) for _ in range(self.samples)]
        samples = generate(policy, self.tokenizer, [self.prompts[i] for i in prefix_of], self.new_tokens,
                           batch_size=self.batch_size, seed=self.sampling_seed(seed))
        rewards = self.score(samples)
        reward, reward_se = mean_and_se(rewards, prefix_of)
        measured = [k for k in range(len(samples)) if k % self.samples < self.kl_samples]
        kls = sequence_kl(policy, self.reference, [samples[k] for k in measured], self.pad).tolist()
        kl, kl_se = mean_and_se(kls, [prefix_of[k] for k in measured])
        row = {"method": method, "param": param, "step": step, "seed": seed,
               "reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se, "samples": len(samples),
               "kl_samples": len(measured), "example": samples[0]["prompt"] + samples[0]["completion"],
               **self.degeneracy(samples)}
        self.write_samples(row, samples, rewards, prefix_of, dict(zip(measured, kls)))
        self.write(row)
        return row

    def write_samples(self, row, samples, rewards, prefix_of, kl_of):
        """Append one line per sample to samples.jsonl; kl_of: {sample index: its KL} (the others: null)."""
        eos, count = self.tokenizer.eos_token_id, {}
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for k, (s, r, p) in enumerate(zip(samples, rewards, prefix_of)):
                ids, count[p] = s["completion_ids"], count.get(p, -1) + 1
                f.write(json.dumps({key: row[key] for key in ("method", "param", "step", "seed")}
                                   | {"prefix_index": p, "sample": count[p], "prefix": s["prompt"],
                                      "completion": s["completion"], "tokens": len(ids),
                                      "eos": bool(ids) and ids[-1] == eos, "reward": r, "kl": kl_of.get(k)}) + "\n")

    def degeneracy(self, samples):
        """Shares that say how degenerate the samples are, and whether the point is flagged (DEGENERATE)."""
        completions = [s["completion"] for s in samples]
        measures = {"short": sum(len(s["completion_ids"]) < self.new_tokens / 2 for s in samples) / len(samples),
                    "repeated_bigrams": sum(map(repeated_bigrams, completions)) / len(completions)}
        lexicon_share = getattr(self.reward_fn, "lexicon_share", None)
        if lexicon_share is not None:
            measures["lexicon"] = sum(lexicon_share(completions)) / len(completions)
        flagged = [name for name, value in measures.items() if value > DEGENERATE[name]]
        return {**measures, "degenerate": flagged}

    def write(self, row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        se = f" ± {row['reward_se']:.3f}" if row.get("reward_se") is not None else ""
        print(f"  {row['method']:14s} {str(row['param']):>6s} seed {row.get('seed', '-')} step {row['step']:4d}: "
              f"reward {row['reward']:+.3f}{se}  KL {row['kl']:.3f}", flush=True)


# ---- the experiment ----------------------------------------------------------------------------------

def run(scale_name="smoke", out=None, seed=0, methods=None, device=None, **overrides):
    """Run the whole experiment; overrides replace fields of the scale (e.g. model="gpt2", steps=200)."""
    scale = dataclasses.replace(SCALES[scale_name], **overrides)
    out = out or os.path.join("runs", f"imdb-{scale_name}")
    os.makedirs(out, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = methods or ["dpo", "preferred_ft", "unlikelihood", "ppo_gt", "ppo", "best_of_n"]
    bf16 = dpo.uses_bf16(scale.dtype, device.type)  # the gpu and paper presets: "auto", fp32 on a CPU
    print_estimate(scale, methods, device)
    with dpo.bf16_autocast(device.type) if bf16 else contextlib.nullcontext():  # no weight cache: see there
        return run_experiment(scale, scale_name, out, seed, methods, device, "bf16" if bf16 else "fp32")


def print_estimate(scale, methods, device):
    if scale.model != "smollm2":  # the costs are SmolLM2-135M's
        return
    costs, where = (H100_COSTS, "one H100 (assumed costs)") if device.type == "cuda" else (LAPTOP_COSTS, "2 CPU cores")
    parts = estimate_seconds(scale, methods, costs)
    detail = ", ".join(f"{k} {v / 60:.1f}" for k, v in parts.items() if k not in ("total", "evaluation (each)"))
    print(f"estimated time on {where}: {parts['total'] / 60:.0f} min ({detail} min); expected standard error of a "
          f"point's mean reward ~{reward_standard_error(scale):.3f}", flush=True)


def is_trajectory(scale, method, param):
    """In the matched design (scale.matched), one of the two runs compared at the same KL: DPO at dpo_betas[0] and
    PPO-GT at ppo_targets[0]."""
    return scale.matched and (method, param) in (("dpo", scale.dpo_betas[0]), ("ppo_gt", scale.ppo_targets[0]))


def run_seeds(scale, method, seed, param=None):
    """The training seeds of a run: scale.seeds of them if the method is in scale.seeded (in the matched design: if
    it is one of the two trajectories), else one."""
    seeded = method in scale.seeded and (not scale.matched or is_trajectory(scale, method, param))
    return [seed + k for k in range(scale.seeds if seeded else 1)]


def ppo_targets(scale, method):
    """The target KLs PPO-GT ("ppo_gt") or PPO with the learned reward ("ppo") runs at."""
    learned = method == "ppo" and scale.learned_ppo_targets is not None
    return scale.learned_ppo_targets if learned else scale.ppo_targets


def evaluation_steps(scale, method, param):
    """The steps (PPO: iterations) after which a run is evaluated: every eval_every / ppo_eval_every, PPO also at
    ppo_eval_early; in the matched design every run but the two trajectories only at its end."""
    ppo = method in ("ppo_gt", "ppo")
    length = PPOConfig(**scale.ppo).iterations if ppo else scale.steps
    if scale.matched and not is_trajectory(scale, method, param):
        return [length]
    every = scale.ppo_eval_every if ppo else scale.eval_every
    early = scale.ppo_eval_early if ppo else ()
    return sorted({step for step in early if 0 < step <= length} | set(range(every, length + 1, every)))


def seed_folder(folder, run_seed, seed):
    """The run's folder: the first seed's keeps the plain name (notebooks read it), the others get -seed<N>."""
    return folder if run_seed == seed else f"{folder}-seed{run_seed}"


@dataclass
class Experiment:
    """What every step of one IMDb experiment shares: its settings, the reference, the prompts, the pairs."""
    scale: Scale
    scale_name: str
    out: str
    seed: int
    methods: list
    dtype: str  # what the runs compute in: "bf16" (autocast) or "fp32"
    started: float = field(default_factory=time.time)
    reference: torch.nn.Module = None  # pi_ref: every method starts from a copy of it, dropout off
    tokenizer: object = None
    evaluate: Evaluator = None  # samples a policy on the held-out prefixes and writes its reward and KL
    train_prompts: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)
    pairs: list = field(default_factory=list)  # the preference pairs every data-driven method trains on
    summary: dict = field(default_factory=dict)  # written to summary.json at the end

    @property
    def results_path(self):
        return os.path.join(self.out, "results.jsonl")

    def log(self, message):
        print(f"[{time.time() - self.started:5.0f}s] {message}")

    def fresh_policy(self):  # a copy of the reference: dropout already off
        return freeze_all_but_top(copy.deepcopy(self.reference).requires_grad_(True).train(), self.scale.train_layers)

    def evaluating(self, method, param, run_seed):
        """A training callback: evaluate the policy after each of its evaluation_steps (PPO: iterations)."""
        steps = set(evaluation_steps(self.scale, method, param))
        return lambda step, policy: self.evaluate(policy, method, param, step, run_seed) if step in steps else None


def run_experiment(scale, scale_name, out, seed, methods, device, dtype):
    """Each method in turn from the same reference and pairs; results.jsonl, summary.json and the figures."""
    experiment = Experiment(scale, scale_name, out, seed, methods, dtype)
    for path in (experiment.results_path, os.path.join(out, "samples.jsonl")):
        open(path, "w").close()
    torch.manual_seed(seed)
    prepare(experiment, device)
    base = experiment.evaluate(experiment.reference, "reference", "-", 0)
    if "dpo" in methods:
        train_dpo(experiment)
    train_baselines(experiment)
    learned_reward = fit_reward_model(experiment) if {"ppo", "best_of_n"} & set(methods) else None
    train_ppo(experiment, learned_reward)
    if "best_of_n" in methods:
        for n in scale.best_of:
            for run_seed in run_seeds(scale, "best_of_n", seed):
                experiment.evaluate.write(best_of_n_row(experiment.reference, experiment.tokenizer,
                                                        experiment.eval_prompts, scale, n, learned_reward,
                                                        experiment.evaluate, run_seed))
    return finish(experiment, base)


def prepare(experiment, device):
    """The reference (SFT at paper scale), the ground-truth reward, the prompts, and the preference pairs:
    `samples` reference samples per training prefix, every pair ranked by the ground-truth reward."""
    scale, seed = experiment.scale, experiment.seed
    reference, tokenizer = load_policy(scale, device)
    # Dropout off in every policy, in training and in measurement (as DPO, the authors' code and TRL do):
    # every policy is a copy of this one, so KL(pi || pi_ref) starts at exactly 0 for every method.
    dpo.disable_dropout(reference)
    reward_fn = load_reward(scale, device)
    if scale.sft_epochs:  # paper scale: the reference is the model fine-tuned on IMDb train reviews
        summary_sft = sft_reference(reference, tokenizer, scale, seed)
        experiment.log(f"reference: SFT on {summary_sft['reviews']} reviews, {summary_sft['steps']} steps")
    reference.eval().requires_grad_(False)
    train_prompts, eval_prompts = load_prompts(scale, tokenizer, seed)
    evaluate = Evaluator(reference, tokenizer, eval_prompts, reward_fn, scale.new_tokens, experiment.results_path,
                         seed, scale.eval_samples, scale.kl_samples, scale.sample_batch)
    experiment.log(f"{len(train_prompts)} training and {len(eval_prompts)} held-out prefixes "
                   f"(x {scale.eval_samples} samples each per evaluation)")
    samples = generate(reference, tokenizer, [p for p in train_prompts for _ in range(scale.samples)],
                       scale.new_tokens, batch_size=scale.sample_batch, seed=seed)
    groups = [samples[i:i + scale.samples] for i in range(0, len(samples), scale.samples)]
    completions = [[s["completion"] for s in group] for group in groups]
    truncated = [[was_truncated(s, scale.new_tokens, tokenizer.eos_token_id) for s in group] for group in groups]
    rewards = [evaluate.score(group) for group in groups]
    completions, rewards, empty, truncated = drop_empty(completions, rewards, truncated)
    pairs, ties = preference_pairs(train_prompts, completions, rewards, truncated)
    with open(os.path.join(experiment.out, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    experiment.log(f"{len(pairs)} preference pairs ({ties} ties and {empty} empty completions dropped)")
    experiment.summary = {"scale": experiment.scale_name, "seed": seed, "config": asdict(scale), "pairs": len(pairs),
                          "ties": ties, "empty_completions": empty, "dtype": experiment.dtype}
    if scale.sft_epochs:
        experiment.summary["sft"] = summary_sft
    experiment.reference, experiment.tokenizer, experiment.evaluate = reference, tokenizer, evaluate
    experiment.train_prompts, experiment.eval_prompts, experiment.pairs = train_prompts, eval_prompts, pairs


def train_dpo(experiment):
    """DPO at every beta (and DPO + NLL at the first, if rpo_alpha), every seed, through minidpo.runs.train; the
    runs share one file of precomputed reference log-probs."""
    scale, out = experiment.scale, experiment.out
    settings = [(beta, 0.0) for beta in scale.dpo_betas]
    settings += [(scale.dpo_betas[0], scale.rpo_alpha)] if scale.rpo_alpha else []
    for beta, rpo in settings:
        name = "dpo" if not rpo else "dpo+nll"
        for run_seed in run_seeds(scale, name, experiment.seed, beta):
            config = RunConfig(out=seed_folder(os.path.join(out, f"{name}-beta{beta}"), run_seed, experiment.seed),
                               beta=beta, rpo_alpha=rpo, batch_size=scale.batch_size, optimizer=scale.optimizer,
                               lr=scale.lr, warmup_steps=scale.warmup_steps, max_steps=scale.steps,
                               eval_every=scale.eval_every, max_length=256, max_prompt_length=64,
                               precompute_ref=True, overwrite=True, progress=False, dtype=experiment.dtype,
                               save_every=scale.steps, seed=run_seed,  # one checkpoint, at the end
                               reference_logps_file=os.path.join(out, "reference_logps.pt"))  # shared
            dpo_train(config, experiment.pairs, [], model=experiment.fresh_policy(), tokenizer=experiment.tokenizer,
                      callback=experiment.evaluating(name, beta, run_seed))
            experiment.log(f"{name} beta={beta} seed {run_seed} done")


def train_baselines(experiment):
    """Preferred-FT and Unlikelihood (every alpha) on the same pairs; unlikelihood_token (Welleck's bounded
    form) runs only when asked for."""
    scale = experiment.scale
    for method in BASELINES:
        if method not in experiment.methods:
            continue
        for alpha in [None] if method == "preferred_ft" else scale.ul_alphas:
            for run_seed in run_seeds(scale, method, experiment.seed, alpha):
                train_baseline(method, experiment.fresh_policy(), experiment.tokenizer, experiment.pairs,
                               steps=scale.steps, batch_size=scale.batch_size, lr=scale.lr, alpha=alpha or 0.0,
                               seed=run_seed, optimizer=scale.optimizer, warmup_steps=scale.warmup_steps,
                               callback=experiment.evaluating(
                                   method, alpha if alpha is not None else "-", run_seed))
                experiment.log(f"{method} {alpha} seed {run_seed} done")


def fit_reward_model(experiment):
    """A Bradley-Terry reward model (Eq. 2) on the same pairs, for PPO and Best-of-N: the reference with a scalar
    head, its best validation checkpoint kept, its accuracy measured on pairs of held-out prompts. Returns the
    learned reward: a list of samples -> their scores."""
    rm_config = RewardModelConfig(**{"train_layers": experiment.scale.train_layers, "seed": experiment.seed,
                                     **experiment.scale.reward_model})
    reward_model, report = train_reward_model(experiment.reference, experiment.tokenizer, experiment.pairs, rm_config)
    experiment.summary["reward_model_heldout_accuracy"] = report["test_accuracy"]
    experiment.summary["reward_model"] = report
    learned = lambda batch: reward_model.score([s["prompt"] for s in batch], [s["completion"] for s in batch])  # noqa: E731
    report["eval_prefix_accuracy"], report["eval_prefix_pairs"] = eval_prefix_accuracy(experiment, learned)
    experiment.log(f"reward model (kept step {report['step']} of {report['steps']}): validation accuracy "
                   f"{report['val_accuracy']:.3f}, held-out pair accuracy {report['test_accuracy']:.3f} on "
                   f"{report['pairs']['test']} pairs, {report['eval_prefix_accuracy']:.3f} on "
                   f"{report['eval_prefix_pairs']} pairs of the reference's samples on the evaluation prefixes")
    return learned


def eval_prefix_accuracy(experiment, learned_reward):
    """The learned reward's pairwise accuracy on a larger held-out set than its own test split: every pair of the
    reference's evaluation samples of one held-out prefix whose ground-truth rewards differ (ties of the learned
    reward count as wrong). Returns (accuracy, pairs)."""
    with open(experiment.evaluate.samples_path, encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if r["method"] == "reference" and r["completion"].strip()]
    scores = learned_reward([{"prompt": r["prefix"], "completion": r["completion"]} for r in rows])
    right = total = 0
    for i, (a, score_a) in enumerate(zip(rows, scores)):
        for b, score_b in zip(rows[i + 1:], scores[i + 1:]):
            if a["prefix_index"] == b["prefix_index"] and a["reward"] != b["reward"]:
                total += 1
                right += (score_a - score_b) * (a["reward"] - b["reward"]) > 0
    return (right / total if total else float("nan")), total


def train_ppo(experiment, learned_reward):
    """PPO-GT (the ground-truth reward) and PPO (the learned one), at the same target KLs, every seed."""
    scale = experiment.scale
    experiment.summary["ppo_history"] = {}
    for method in ("ppo_gt", "ppo"):
        if method not in experiment.methods:
            continue
        for target in ppo_targets(scale, method):
            for run_seed in run_seeds(scale, method, experiment.seed, target):
                config = PPOConfig(max_new_tokens=scale.new_tokens, target_kl=target, seed=run_seed, **scale.ppo)
                score = experiment.evaluate.score if method == "ppo_gt" else learned_reward
                history = ppo_train(experiment.fresh_policy(), experiment.reference, experiment.tokenizer,
                                    experiment.train_prompts, score, config,
                                    callback=experiment.evaluating(method, target, run_seed))
                experiment.summary["ppo_history"][f"{method} target {target} seed {run_seed}"] = history
                experiment.log(f"{method} target KL {target} seed {run_seed} done: kl_coef {config.init_kl_coef} "
                               f"-> {history[-1]['kl_coef']:.4f}, sampled KL {history[-1]['kl']:.2f}")


def finish(experiment, base):
    """summary.json, the frontier and (with rpo_alpha) the training dynamics figure; returns results.jsonl's path."""
    scale, out = experiment.scale, experiment.out
    experiment.summary["seconds"] = time.time() - experiment.started
    experiment.summary["reference"] = {"reward": base["reward"], "reward_se": base["reward_se"], "kl": base["kl"]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(experiment.summary, f, indent=1)
    from .frontier import pooled_points, read_samples
    from .plots import plot_dynamics, plot_frontier, read_jsonl, reward_axis_label
    points = pooled_points(read_samples(out), read_jsonl(experiment.results_path))  # SEs clustered by prefix
    figure = plot_frontier(experiment.results_path, os.path.join(out, "frontier.png"),
                           title=f"IMDb sentiment, {experiment.scale_name} scale: reward vs KL",
                           ylabel=reward_axis_label(scale.reward), points=points)
    if "dpo" in experiment.methods and scale.rpo_alpha:
        beta = scale.dpo_betas[0]
        import matplotlib.pyplot as plt
        folders = {"DPO": os.path.join(out, f"dpo-beta{beta}"),
                   f"DPO + NLL (rpo_alpha = {scale.rpo_alpha})": os.path.join(out, f"dpo+nll-beta{beta}")}
        plt.close(plot_dynamics(folders, title=f"DPO training dynamics, {experiment.scale_name} scale, β = {beta}",
                                figure_path=os.path.join(out, "dynamics.png")))
    experiment.log(f"results: {experiment.results_path}\nfigure: {figure}")
    return experiment.results_path


def best_of_n_row(reference, tokenizer, eval_prompts, scale, n, learned_reward, evaluate, seed):
    """Best-of-N: for each held-out prefix, best_of_picks times, the best of n reference samples by the
    learned reward (an empty completion only if all n are), scored by the ground truth (evaluate.score); the picks
    go to samples.jsonl (evaluate.write_samples) and their degeneracy beside the row. Its KL is the analytic bound
    log n - (n - 1) / n."""
    prefix_of = [i for i in range(len(eval_prompts)) for _ in range(scale.best_of_picks)]
    candidates = generate(reference, tokenizer, [eval_prompts[i] for i in prefix_of for _ in range(n)],
                          scale.new_tokens, batch_size=scale.sample_batch, seed=seed + 11)
    scores = learned_reward(candidates)
    texts = [c["completion"] for c in candidates]  # the reward model never saw an empty one: best_scored
    picks = [candidates[i + best_scored(texts[i:i + n], scores[i:i + n])] for i in range(0, len(candidates), n)]
    rewards = evaluate.score(picks)
    reward, reward_se = mean_and_se(rewards, prefix_of)
    row = {"method": "best_of_n", "param": n, "step": 0, "seed": seed, "reward": reward, "reward_se": reward_se,
           "kl": best_of_n_kl(n), "kl_se": 0.0, "kl_is_bound": True, "samples": len(picks), "kl_samples": 0,
           "example": picks[0]["prompt"] + picks[0]["completion"], **evaluate.degeneracy(picks)}
    evaluate.write_samples(row, picks, rewards, prefix_of, {})
    return row


def sft_reference(reference, tokenizer, scale, seed):
    """Fine-tune the reference in place on IMDb train reviews for scale.sft_epochs epochs (the paper:
    one full epoch), dropout off. Returns {"reviews", "steps"}."""
    from ..data import load_imdb
    from ..sft import sft_train
    texts = load_imdb(scale.imdb, split="train")["text"]
    steps = math.ceil(scale.sft_epochs * len(texts) / scale.sft_batch_size)
    sft_train(reference, tokenizer, [{"prompt": "", "response": t} for t in texts], steps=steps,
              batch_size=scale.sft_batch_size, seed=seed)
    return {"reviews": len(texts), "steps": steps, "batch_size": scale.sft_batch_size}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--out", default=None, help="output folder (default: runs/imdb-<scale>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="subset of: dpo preferred_ft unlikelihood unlikelihood_token ppo_gt ppo best_of_n")
    parser.add_argument("--estimate", action="store_true", help="print the estimated run time and stop")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override fields of the scale, e.g. --set model=gpt2 steps=200 dpo_betas=0.1,1")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no loading and saving bars between the log's lines
    if args.estimate:
        scale = dataclasses.replace(SCALES[args.scale], **parse_overrides(args.set, Scale))
        return print_estimate(scale, args.methods, torch.device("cuda" if scale.dtype != "fp32" else "cpu"))
    run(args.scale, args.out, args.seed, args.methods, **parse_overrides(args.set, Scale))


def parse_overrides(items, scale_class):
    """FIELD=VALUE strings -> typed overrides of a Scale dataclass (tuples as comma lists, dicts as JSON)."""
    types = {f.name: f.type for f in dataclasses.fields(scale_class)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"unknown field {name!r}; fields: {', '.join(types)}")
        kind = str(types[name])
        if "tuple" in kind:  # tuple[int, ...] items as ints (best_of=4,16), tuple[str, ...] as strings, others floats
            item_type = int if "int" in kind else str if "str" in kind else float
            out[name] = tuple(item_type(v.strip()) for v in value.split(",") if v.strip())
        elif "dict" in kind:
            out[name] = json.loads(value)
        elif "int" in kind:
            out[name] = int(value)
        elif "float" in kind:
            out[name] = float(value)
        else:
            out[name] = value
    return out


if __name__ == "__main__":
    main()
