"""The IMDb sentiment experiment (paper Fig. 2 left): the reward-vs-KL frontier of every method.

    python -m minidpo.experiments.imdb --scale smoke     # tiny random GPT-2, toy reward: ~1 minute
    python -m minidpo.experiments.imdb --scale laptop    # SmolLM2-135M-Instruct + VADER, offline: ~18 minutes on 2 cores
    python -m minidpo.experiments.imdb --scale paper     # gpt2-large SFT on IMDb + siebert classifier, on a GPU

1. prompts: review prefixes of 2-8 tokens, split into training and held-out prefixes;
2. the reference policy: the model as shipped (smoke, laptop), or fine-tuned on IMDb reviews (paper);
3. preference pairs: 4 samples per training prefix from the reference, all 6 pairs ranked by the
   ground-truth reward (ties dropped and counted);
4. methods, all from the same reference on the same pairs: DPO (beta sweep, the core train()),
   Preferred-FT, Unlikelihood (alpha sweep), PPO with a learned Bradley-Terry reward model, PPO-GT
   with the ground-truth reward, Best-of-N with the learned reward model;
5. every few steps, each policy is sampled on the held-out prefixes: mean ground-truth reward and mean
   sequence-level KL(pi || pi_ref) (the sum of exact per-token KLs along the policy's samples);
6. results.jsonl (one row per method, hyper-parameter and step) and frontier.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import dpo
from ..baselines import best_of_n_kl, train_baseline
from ..models import freeze_all_but_top, load_model
from ..ppo import PPOConfig, ppo_train
from ..reward_model import LinearRewardModel, completion_features
from ..sampling import generate, sequence_kl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    lr: float  # DPO / Preferred-FT / Unlikelihood learning rate (AdamW)
    dpo_betas: tuple = (0.1, 1.0)
    ul_alphas: tuple = (0.1, 1.0)
    ppo_targets: tuple = (6.0,)  # PPO-GT target KLs; PPO (learned reward) uses the first
    ppo: dict = field(default_factory=dict)  # PPOConfig overrides
    best_of: tuple = (4, 16)
    train_layers: int = 0  # train only the top N transformer blocks (0: all)
    rpo_alpha: float = 1.0  # the extra DPO run with an NLL term, for the training-dynamics plot (0: skip)
    sft_steps: int = 0  # paper scale: fine-tune the reference on IMDb reviews first
    samples: int = 4  # reference samples per training prefix
    imdb: str = "stanfordnlp/imdb"  # paper scale: the IMDb dataset (hub name or local file)


SCALES = {
    "smoke": Scale(model="tiny", reward="toy", train_prompts=12, eval_prompts=8, new_tokens=12, steps=8, eval_every=4,
                   ppo_eval_every=2, batch_size=8, lr=3e-3, ppo=dict(iterations=4, rollouts=8, minibatch=4, ppo_epochs=2, lr=3e-3),
                   best_of=(4,)),
    "laptop": Scale(model="smollm2", reward="vader", train_prompts=64, eval_prompts=32, new_tokens=24, steps=32,
                    eval_every=16, ppo_eval_every=4, batch_size=8, lr=1e-4, train_layers=4,
                    ppo=dict(iterations=8, rollouts=32, minibatch=8, ppo_epochs=2, lr=2e-5)),
    "paper": Scale(model="gpt2-large", reward="siebert/sentiment-roberta-large-english", train_prompts=25_000,
                   eval_prompts=512, new_tokens=48, steps=1500, eval_every=100, ppo_eval_every=10, batch_size=64, lr=1e-6,
                   dpo_betas=(0.05, 0.1, 1.0, 5.0), ul_alphas=(0.05, 0.1, 0.5, 1.0), ppo_targets=(3.0, 6.0, 9.0, 12.0),
                   ppo=dict(iterations=200, rollouts=64, minibatch=16, lr=1.4e-5), best_of=(4, 16, 64, 128),
                   sft_steps=2000),
}


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
        with open(os.path.join(REPO, "data", "imdb_prefixes.txt")) as f:
            prefixes = [line.strip() for line in f if line.strip()]
    else:
        from ..data import load_imdb
        prefixes = load_imdb(scale.imdb, split="train", tokenizer=tokenizer, seed=seed)["prompt"]
        held_out = load_imdb(scale.imdb, split="test", tokenizer=tokenizer, seed=seed + 1)["prompt"]
        return prefixes[:scale.train_prompts], held_out[:scale.eval_prompts]
    random.Random(seed).shuffle(prefixes)
    return prefixes[:scale.train_prompts], prefixes[scale.train_prompts:scale.train_prompts + scale.eval_prompts]


def preference_pairs(prompts, completions, rewards):
    """All pairs among the samples of each prompt, the higher-reward sample chosen; ties dropped.
    prompts: list of P; completions, rewards: lists of P lists of S. Returns (records, ties)."""
    records, ties = [], 0
    for prompt, comps, rs in zip(prompts, completions, rewards):
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                if rs[i] == rs[j] or comps[i] == comps[j]:
                    ties += 1
                    continue
                w, l = (i, j) if rs[i] > rs[j] else (j, i)
                records.append({"prompt": prompt, "chosen": comps[w], "rejected": comps[l],
                                "reward_chosen": rs[w], "reward_rejected": rs[l]})
    return records, ties


class Evaluator:
    """Samples a policy on the held-out prefixes: mean ground-truth reward and sequence KL to the reference."""

    def __init__(self, reference, tokenizer, prompts, reward_fn, new_tokens, results_path, seed=0):
        self.reference, self.tokenizer, self.prompts = reference, tokenizer, prompts
        self.reward_fn, self.new_tokens, self.path, self.seed = reward_fn, new_tokens, results_path, seed
        self.pad = tokenizer.pad_token_id

    def score(self, samples):
        return self.reward_fn([s["prompt"] + s["completion"] for s in samples])

    def __call__(self, policy, method, param, step):
        samples = generate(policy, self.tokenizer, self.prompts, self.new_tokens, seed=self.seed + 7)
        rewards = self.score(samples)
        kl = sequence_kl(policy, self.reference, samples, self.pad)
        row = {"method": method, "param": param, "step": step, "reward": sum(rewards) / len(rewards),
               "kl": kl.mean().item(), "example": samples[0]["prompt"] + samples[0]["completion"]}
        self.write(row)
        return row

    def write(self, row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row['method']:14s} {str(row['param']):>6s} step {row['step']:4d}: reward {row['reward']:+.3f}  "
              f"KL {row['kl']:.3f}", flush=True)


# ---- the experiment ----------------------------------------------------------------------------------

def run(scale_name="smoke", out=None, seed=0, methods=None, device=None, **overrides):
    """Run the whole experiment; overrides replace fields of the scale (e.g. model="gpt2", steps=200)."""
    scale = dataclasses.replace(SCALES[scale_name], **overrides)
    out = out or os.path.join("runs", f"imdb-{scale_name}")
    os.makedirs(out, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    methods = methods or ["dpo", "preferred_ft", "unlikelihood", "ppo_gt", "ppo", "best_of_n"]
    results_path = os.path.join(out, "results.jsonl")
    open(results_path, "w").close()
    started = time.time()
    torch.manual_seed(seed)

    reference, tokenizer = load_policy(scale, device)
    reward_fn = load_reward(scale, device)
    if scale.sft_steps:  # paper scale: the reference is the model fine-tuned on IMDb reviews
        from ..data import load_imdb
        from ..sft import sft_train
        texts = load_imdb(scale.imdb, split="train")["text"]
        sft_train(reference, tokenizer, [{"prompt": "", "response": t} for t in texts], steps=scale.sft_steps)
    reference.eval().requires_grad_(False)
    train_prompts, eval_prompts = load_prompts(scale, tokenizer, seed)
    evaluate = Evaluator(reference, tokenizer, eval_prompts, reward_fn, scale.new_tokens, results_path, seed)
    print(f"[{time.time() - started:5.0f}s] {len(train_prompts)} training and {len(eval_prompts)} held-out prefixes")

    # Preference pairs: 4 reference samples per prefix, ranked by the ground-truth reward.
    samples = generate(reference, tokenizer, [p for p in train_prompts for _ in range(scale.samples)],
                       scale.new_tokens, seed=seed)
    completions = [[s["completion"] for s in samples[i:i + scale.samples]] for i in range(0, len(samples), scale.samples)]
    rewards = [evaluate.score(samples[i:i + scale.samples]) for i in range(0, len(samples), scale.samples)]
    pairs, ties = preference_pairs(train_prompts, completions, rewards)
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    print(f"[{time.time() - started:5.0f}s] {len(pairs)} preference pairs ({ties} ties dropped)")
    summary = {"scale": scale_name, "config": asdict(scale), "pairs": len(pairs), "ties": ties}

    base = evaluate(reference, "reference", "-", 0)

    def fresh_policy():
        return freeze_all_but_top(copy.deepcopy(reference).requires_grad_(True).train(), scale.train_layers)

    def evaluating(method, param, every=scale.eval_every):
        return lambda step, policy: evaluate(policy, method, param, step) if step and step % every == 0 else None

    if "dpo" in methods:
        runs = [(beta, 0.0) for beta in scale.dpo_betas] + ([(scale.dpo_betas[0], scale.rpo_alpha)] if scale.rpo_alpha else [])
        for beta, rpo in runs:
            name = "dpo" if not rpo else "dpo+nll"
            config = dpo.TrainConfig(out=os.path.join(out, f"{name}-beta{beta}"), beta=beta, rpo_alpha=rpo,
                                     batch_size=scale.batch_size, optimizer="adamw", lr=scale.lr, warmup_steps=0,
                                     max_steps=scale.steps, eval_every=scale.eval_every, max_length=256,
                                     max_prompt_length=64, precompute_ref=True, overwrite=True, progress=False,
                                     seed=seed)
            dpo.train(config, pairs, [], model=fresh_policy(), tokenizer=tokenizer,
                      callback=evaluating(name, beta))
            print(f"[{time.time() - started:5.0f}s] {name} beta={beta} done")
    for method, params in (("preferred_ft", [None]), ("unlikelihood", scale.ul_alphas)):
        if method in methods:
            for alpha in params:
                train_baseline(method, fresh_policy(), tokenizer, pairs, steps=scale.steps, batch_size=scale.batch_size,
                               lr=scale.lr, alpha=alpha or 0.0, seed=seed,
                               callback=evaluating(method, alpha if alpha is not None else "-"))
                print(f"[{time.time() - started:5.0f}s] {method} {alpha} done")

    # A Bradley-Terry reward model (Eq. 2) on the same pairs, for PPO and Best-of-N.
    reward_model = None
    if {"ppo", "best_of_n"} & set(methods):
        as_samples = lambda key: [{"prompt_ids": tokenizer(p["prompt"], add_special_tokens=False)["input_ids"],  # noqa: E731
                                   "completion_ids": tokenizer(p[key], add_special_tokens=False)["input_ids"]}
                                  for p in pairs]
        fc = completion_features(reference, as_samples("chosen"), tokenizer.pad_token_id)
        fr = completion_features(reference, as_samples("rejected"), tokenizer.pad_token_id)
        cut = int(0.8 * len(pairs))
        reward_model = LinearRewardModel(fc.shape[1]).fit(fc[:cut], fr[:cut])
        summary["reward_model_heldout_accuracy"] = reward_model.accuracy(fc[cut:], fr[cut:])
        reward_model.fit(fc, fr)
        print(f"[{time.time() - started:5.0f}s] reward model: held-out pair accuracy "
              f"{summary['reward_model_heldout_accuracy']:.3f}")

        def learned_reward(batch):
            return reward_model(completion_features(reference, batch, tokenizer.pad_token_id)).tolist()

    for method in ("ppo_gt", "ppo"):
        if method in methods:
            targets = scale.ppo_targets if method == "ppo_gt" else scale.ppo_targets[:1]
            for target in targets:
                config = PPOConfig(max_new_tokens=scale.new_tokens, target_kl=target, seed=seed, **scale.ppo)
                score = evaluate.score if method == "ppo_gt" else learned_reward
                ppo_train(fresh_policy(), reference, tokenizer, train_prompts, score, config,
                          callback=evaluating(method, target, scale.ppo_eval_every))
                print(f"[{time.time() - started:5.0f}s] {method} target KL {target} done")

    if "best_of_n" in methods:
        for n in scale.best_of:
            candidates = generate(reference, tokenizer, [p for p in eval_prompts for _ in range(n)], scale.new_tokens,
                                  seed=seed + 11)
            scores = learned_reward(candidates)
            best = [max(range(i, i + n), key=lambda k: scores[k]) for i in range(0, len(candidates), n)]
            gt = evaluate.score([candidates[k] for k in best])
            evaluate.write({"method": "best_of_n", "param": n, "step": 0, "reward": sum(gt) / len(gt),
                            "kl": best_of_n_kl(n), "example": candidates[best[0]]["prompt"] + candidates[best[0]]["completion"]})

    summary["seconds"] = time.time() - started
    summary["reference"] = {"reward": base["reward"], "kl": base["kl"]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    from .plots import plot_dynamics, plot_frontier
    figure = plot_frontier(results_path, os.path.join(out, "frontier.png"),
                           title=f"IMDb sentiment, {scale_name} scale: reward vs KL")
    if "dpo" in methods and scale.rpo_alpha:
        beta = scale.dpo_betas[0]
        import matplotlib.pyplot as plt
        plt.close(plot_dynamics({"DPO": os.path.join(out, f"dpo-beta{beta}"),
                                 f"DPO + NLL (rpo_alpha = {scale.rpo_alpha})": os.path.join(out, f"dpo+nll-beta{beta}")},
                                title=f"DPO training dynamics, {scale_name} scale, β = {beta}",
                                figure_path=os.path.join(out, "dynamics.png")))
    print(f"[{time.time() - started:5.0f}s] results: {results_path}\nfigure: {figure}")
    return results_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--out", default=None, help="output folder (default: runs/imdb-<scale>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="subset of: dpo preferred_ft unlikelihood ppo_gt ppo best_of_n")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override fields of the scale, e.g. --set model=gpt2 steps=200 dpo_betas=0.1,1")
    args = parser.parse_args(argv)
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
        if "tuple" in kind:
            out[name] = tuple(float(v) for v in value.split(",") if v)
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
