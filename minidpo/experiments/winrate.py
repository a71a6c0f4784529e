"""TL;DR summarization and Anthropic HH dialogue (paper Fig. 2 right, Fig. 3): SFT -> DPO -> win rates.

    python -m minidpo.experiments.tldr --scale smoke|laptop|paper
    python -m minidpo.experiments.hh --scale smoke|laptop|paper

1. Preferred-FT / SFT: fine-tune the base model on the preferred responses (HH: chosen; TL;DR: the
   preferred summaries, standing in for the reference summaries of the SFT data) -> the reference policy;
2. DPO from that reference with the core train() (TL;DR beta 0.5, HH beta 0.1);
3. sampling on held-out prompts at temperatures 0 (greedy), 0.25, 0.5, 0.75, 1.0;
4. judging against the dataset's preferred response of each held-out prompt: the offline ProxyJudge
   (a Bradley-Terry reward model fitted on preference pairs that no policy trained on) by default, an
   OpenAI-compatible GPT-4-style judge (--judge api) or a reward model (--judge <hf name>) at paper scale;
5. win rates with Wilson intervals per method and temperature, and (HH) over DPO's training steps;
6. results.jsonl, samples.jsonl, and the figures.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass

import torch

from .. import dpo
from ..judges import ApiJudge, ProxyJudge, RewardModelJudge, win_rate
from ..models import freeze_all_but_top, load_model
from ..sampling import generate
from ..sft import sft_train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Scale:
    model: str  # "tiny" (GPT-NeoX, Pythia's architecture) | "smollm2" | a hub name or folder
    dataset: str  # a load_preferences source
    split: str  # its training split
    test_split: str  # its held-out split ("" : carve the held-out prompts out of `split`)
    train_pairs: int  # pairs for SFT and DPO
    judge_pairs: int  # pairs for the offline judge only
    test_prompts: int  # prompts the win rates are measured on
    new_tokens: int  # max new tokens per response
    sft_steps: int
    dpo_steps: int
    batch_size: int
    lr: float  # AdamW learning rate for SFT and DPO
    eval_every: int = 0  # DPO steps between win-rate checkpoints (HH's Fig. 3 right); 0: only the end
    max_length: int = 512
    max_prompt_length: int = 384
    train_layers: int = 0  # train only the top N transformer blocks (0: all)
    temperatures: tuple = TEMPERATURES


def scales(task):
    data = os.path.join(REPO, "data", f"{task}.jsonl")
    hub = {"tldr": ("openai/summarize_from_feedback", "train", "validation"), "hh": ("Anthropic/hh-rlhf", "train", "test")}
    return {
        "smoke": Scale(model="tiny", dataset=data, split="train", test_split="", train_pairs=96, judge_pairs=64,
                       test_prompts=16, new_tokens=16, sft_steps=6, dpo_steps=6, batch_size=8, lr=3e-3, eval_every=3,
                       max_length=448, max_prompt_length=384, temperatures=(0.0, 0.5, 1.0)),
        "laptop": Scale(model="smollm2", dataset=data, split="train", test_split="", train_pairs=128, judge_pairs=64,
                        test_prompts=32, new_tokens=32, sft_steps=24, dpo_steps=32, batch_size=8, lr=2e-5,
                        eval_every=16, max_length=192, max_prompt_length=144, train_layers=8,
                        # HH's figure is by method and over training: three temperatures save time (HH: 16 min, 2 cores)
                        temperatures=TEMPERATURES if task == "tldr" else (0.0, 0.5, 1.0)),
        "paper": Scale(model="EleutherAI/pythia-2.8b", dataset=hub[task][0], split=hub[task][1], test_split=hub[task][2],
                       train_pairs=92_000, judge_pairs=0, test_prompts=256, new_tokens=128, sft_steps=2000,
                       dpo_steps=1500, batch_size=64, lr=1e-6, eval_every=300),
    }


def load_base(scale, device):
    return load_model(scale.model, device, tiny="neox", max_position_embeddings=1024)


def split_data(scale, seed):
    """(train records, judge records, test records) from the scale's preference source."""
    from ..data import load_preferences
    records = list(load_preferences(scale.dataset, split=scale.split, skip_invalid=True))
    random.Random(seed).shuffle(records)
    if scale.test_split:
        test = list(load_preferences(scale.dataset, split=scale.test_split, skip_invalid=True))[:scale.test_prompts]
    else:
        test, records = records[:scale.test_prompts], records[scale.test_prompts:]
    judge = records[:scale.judge_pairs]
    train = records[scale.judge_pairs:scale.judge_pairs + scale.train_pairs]
    return train, judge, test


def make_judge(kind, task, scale, base, tokenizer, judge_records, out):
    if kind == "proxy":
        return ProxyJudge(base, tokenizer, judge_records)
    if kind == "api":
        return ApiJudge("summary" if task == "tldr" else "dialogue", cache_path=os.path.join(out, "judge_cache.jsonl"))
    return RewardModelJudge(kind)


def run(task, scale_name="smoke", out=None, seed=0, judge="proxy", device=None, **overrides):
    """The whole pipeline for task "tldr" or "hh"; overrides replace fields of the scale."""
    scale = dataclasses.replace(scales(task)[scale_name], **overrides)
    out = out or os.path.join("runs", f"{task}-{scale_name}")
    os.makedirs(out, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.time()
    say = lambda msg: print(f"[{time.time() - started:5.0f}s] {msg}", flush=True)  # noqa: E731
    torch.manual_seed(seed)
    beta = 0.5 if task == "tldr" else 0.1

    base, tokenizer = load_base(scale, device)
    base.eval()
    train, judge_records, test = split_data(scale, seed)
    say(f"{len(train)} training pairs, {len(judge_records)} judge pairs, {len(test)} test prompts")
    judge_fn = make_judge(judge, task, scale, copy.deepcopy(base).requires_grad_(False), tokenizer, judge_records, out)
    summary = {"task": task, "scale": scale_name, "beta": beta, "config": dataclasses.asdict(scale), "judge": judge}
    if isinstance(judge_fn, ProxyJudge):
        summary["judge_heldout_accuracy"] = judge_fn.accuracy
        say(f"offline judge: held-out pair accuracy {judge_fn.accuracy:.3f}")

    # 1. Preferred-FT / SFT: the reference policy.
    reference = copy.deepcopy(base)
    freeze_all_but_top(reference, scale.train_layers)
    sft_losses = sft_train(reference, tokenizer, [{"prompt": r["prompt"], "response": r["chosen"]} for r in train],
                           steps=scale.sft_steps, batch_size=scale.batch_size, lr=scale.lr,
                           max_length=scale.max_length, seed=seed)
    say(f"SFT: loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")
    reference.save_pretrained(os.path.join(out, "sft"))  # for DPO elsewhere, e.g. torchrun -m minidpo --model <out>/sft
    tokenizer.save_pretrained(os.path.join(out, "sft"))
    summary["sft_loss"] = [sft_losses[0], sft_losses[-1]]

    prompts = [r["prompt"] for r in test]
    baselines = [r["chosen"] for r in test]
    results_path = os.path.join(out, "results.jsonl")
    open(results_path, "w").close()
    samples_path = os.path.join(out, "samples.jsonl")
    open(samples_path, "w").close()

    def measure(policy, method, step, temperatures):
        for t in temperatures:
            samples = generate(policy, tokenizer, prompts, scale.new_tokens, temperature=t, seed=seed + 17)
            responses = [s["completion"] for s in samples]
            verdicts = judge_fn(prompts, responses, baselines)
            row = {"method": method, "temperature": t, "step": step, **win_rate(verdicts)}
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(samples_path, "a") as f:
                for p, r, b, v in zip(prompts, responses, baselines, verdicts):
                    f.write(json.dumps({"method": method, "temperature": t, "step": step, "prompt": p,
                                        "response": r, "baseline": b, "verdict": v}) + "\n")
            say(f"{method:12s} T={t:.2f} step {step:4d}: win rate {row['win_rate']:.3f} "
                f"[{row['low']:.3f}, {row['high']:.3f}] n={row['n']} invalid={row['invalid']}")

    measure(base, "base", 0, (0.0,))
    measure(reference, "preferred_ft", 0, scale.temperatures)

    # 2. DPO from the SFT reference, win rate at T = 0 along the way (Fig. 3 right).
    policy = copy.deepcopy(reference)
    config = dpo.TrainConfig(out=os.path.join(out, "dpo"), beta=beta, batch_size=scale.batch_size, optimizer="adamw",
                             lr=scale.lr, warmup_steps=0, max_steps=scale.dpo_steps, eval_every=0,
                             max_length=scale.max_length, max_prompt_length=scale.max_prompt_length,
                             precompute_ref=True, overwrite=True, progress=False, seed=seed)
    along = (lambda step, p: measure(p, "dpo", step, (0.0,)) if step and scale.eval_every and step % scale.eval_every == 0
             and step < scale.dpo_steps else None)
    dpo.train(config, train, [], model=policy, tokenizer=tokenizer, callback=along)
    measure(policy, "dpo", scale.dpo_steps, scale.temperatures)

    summary["seconds"] = time.time() - started
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    from .plots import plot_win_rates
    figure = plot_win_rates(results_path, os.path.join(out, "win_rates.png"),
                            title=f"{'TL;DR summarization' if task == 'tldr' else 'Anthropic HH dialogue'}, "
                                  f"{scale_name} scale: win rate vs the dataset's preferred response")
    say(f"results: {results_path}\nfigure: {figure}")
    return results_path


def main(task, argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("smoke", "laptop", "paper"), default="smoke")
    parser.add_argument("--out", default=None, help=f"output folder (default: runs/{task}-<scale>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", default="proxy", help="proxy (offline) | api (OpenAI-compatible, from the "
                        "environment: MINIDPO_JUDGE_BASE_URL, MINIDPO_JUDGE_MODEL, OPENAI_API_KEY) | a reward model name")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override fields of the scale, e.g. --set model=EleutherAI/pythia-410m dpo_steps=500")
    args = parser.parse_args(argv)
    from .imdb import parse_overrides
    run(task, args.scale, args.out, args.seed, args.judge, **parse_overrides(args.set, Scale))
