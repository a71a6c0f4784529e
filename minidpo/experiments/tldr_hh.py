"""TL;DR summarization and Anthropic HH dialogue (paper Fig. 2 right, Fig. 3): SFT -> DPO -> win rates.

    python -m minidpo.experiments.tldr --scale smoke|laptop|paper
    python -m minidpo.experiments.hh --scale smoke|laptop|paper
    python -m minidpo.experiments.hh --scale paper --memory    # the memory estimate per stage, then exit

1. the base model's baseline: TL;DR zero-shot (the prompt ends in "TL;DR:"); HH the paper's 2-shot
   prompting (TWO_SHOT: two example dialogues before the prompt);
2. the reference policy: TL;DR SFT on human-written summaries (CarperAI/openai_summarize_tldr at paper
   scale; bundled tldr_sft.jsonl offline), HH Preferred-FT on the chosen responses of every training record;
3. the learned reward model (Eq. 2): the reference's transformer with a scalar head, trained on the training pairs
   (reward_model.py; 3 epochs, the best validation checkpoint), never the judge;
4. Best-of-N: N samples of the reference per prompt, the one the reward model scores highest (the paper's
   Best-of-128); TL;DR's Preferred-FT (a copy of the SFT model fine-tuned on the chosen summaries); PPO (ppo.py,
   a copy of the reference against the reward model, with a KL penalty to the reference);
5. DPO from the reference with minidpo.runs.train (--beta; the paper's TL;DR 0.5, HH 0.1), its win rate along
   training at every temperature (Fig. 3 right);
6. sampling at temperatures 0 (greedy) to 1 on held-out prompts: a seeded sample of the test split (HH:
   of its single-turn dialogues, as Fig. 3), or carved out of an offline set that has no test split; HH answers
   of every policy cut where it starts the next turn itself;
7. judging against the test prompt's reference: the SFT data's human summary (TL;DR) or the chosen
   response (HH). The offline ProxyJudge by default (a Bradley-Terry linear probe on the frozen base model, fitted on
   pairs no policy trained on), an OpenAI-compatible GPT-4-style judge (--judge api, --judge_prompt standard or
   concise for TL;DR) or a reward model (--judge <hf name>); every one behind the degenerate-response rule
   (judges.GuardedJudge: an empty answer, a loop, a list of numbers or a copy of the prompt loses), and checked first
   against held-out labels, with the two responses swapped and on degenerate probes;
8. win rates with intervals that count the posts / tasks the prompts come from, the degenerate share, the mean
   length and (TL;DR) ROUGE-L beside each; results.jsonl, samples.jsonl, summary.json and the figure.

Memory: one model trains in place from base to SFT to DPO (DPO's frozen reference lives only while its
log-probs are precomputed); copies only for what needs its own weights: the offline judge (the frozen base model),
the reward model (bf16 once trained, on a GPU), and the Preferred-FT and PPO policies, each dropped once measured
(PPO's reference is the model itself, read without gradients). The estimate per stage (minidpo.memory: weights,
gradients, optimizer state, activations) is printed before the run starts; the paper scale uses bf16 autocast,
gradient accumulation and checkpointing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import re
import time
from dataclasses import dataclass

import torch

from .. import memory, runs
from ..bundled import bundled_path
from ..dpo import frozen_copy, uses_bf16
from ..judges import (
    ApiJudge,
    GuardedJudge,
    LongerJudge,
    ProxyJudge,
    RewardModelJudge,
    best_scored,
    judge_agreement,
    probe_preferences,
    rouge_l,
    win_rate,
)
from ..models import freeze_all_but_top, load_model
from ..ppo import PPOConfig, ppo_train
from ..reward_model import RewardModelConfig, train_reward_model
from ..sampling import generate
from ..sft import autocast_for, checkpointing, sft_train

TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Scale:
    model: str  # "tiny" (GPT-NeoX, Pythia's architecture) | "smollm2" | a hub name or folder
    dataset: str  # the preference pairs: a load_preferences source
    split: str  # its training split
    test_split: str  # its held-out split ("": carve the held-out prompts out of `split`)
    train_pairs: int  # pairs for SFT and DPO (0: all that are left)
    judge_pairs: int  # pairs for the offline judge only
    test_prompts: int  # prompts the win rates are measured on: a seeded sample
    new_tokens: int  # max new tokens per response
    sft_steps: int  # 0: one epoch over the SFT records (the paper's)
    dpo_steps: int  # 0: one epoch over the training pairs (the paper's)
    batch_size: int  # sequences (SFT) or pairs (DPO) per optimizer step
    lr: float  # learning rate for SFT (AdamW) and DPO
    eval_every: int = 0  # DPO steps between win-rate checkpoints (HH's Fig. 3 right); 0: only the end
    max_length: int = 512
    max_prompt_length: int = 384
    train_layers: int = 0  # train only the top N transformer blocks (0: all)
    temperatures: tuple = TEMPERATURES
    sft_dataset: str = ""  # human-written SFT data (load_tldr_sft: prompt, label); "": the pairs' chosen responses
    sft_split: str = "train"
    sft_test_split: str = ""  # the SFT data's split for test prompts and references ("": carved out of sft_split)
    test_dataset: str = ""  # a file of held-out pairs (bundled hh_test.jsonl), when no test_split
    sft_test_dataset: str = ""  # a file of held-out SFT data (tldr_sft_test.jsonl), when no sft_test_split
    single_turn: bool = False  # evaluate on single-turn dialogues only (HH, as the paper's Fig. 3)
    best_of_n: int = 0  # N of the Best-of-N baseline (0: none)
    best_of_n_temperatures: tuple = ()  # where Best-of-N is sampled (): every temperature above 0 (greedy decoding
    # gives N identical samples)
    reward_pairs: int = 0  # training pairs the learned reward model (Best-of-N's, PPO's) is fitted on (0: all)
    reward_epochs: int = 3  # the reward model's passes over them (the paper: 3, the best validation checkpoint)
    reward_batch: int = 16  # pairs per reward-model step
    ppo_iterations: int = 0  # PPO with the learned reward model: rollout + update rounds (0: no PPO)
    ppo_rollouts: int = 16  # prompts sampled per PPO iteration
    ppo_target_kl: float = 6.0  # the adaptive KL controller's target, nats per sequence
    preferred_ft_steps: int = 0  # TL;DR's Preferred-FT: steps of SFT on the chosen summaries, from the SFT model
    grad_accum: int = 1  # micro-batches per optimizer step, SFT and DPO
    dtype: str = "auto"  # auto (bf16 autocast on a GPU) | fp32 | bf16
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward
    optimizer: str = "adamw"  # DPO's: adamw | rmsprop (the paper's)
    warmup_steps: int = 0  # DPO's linear warmup (the paper: 150)
    sample_batch: int = 32  # sequences sampled at once
    agreement_dataset: str = ""  # held-out labelled pairs to check the judge on ("": none)
    agreement_split: str = "train"
    agreement_pairs: int = 64  # a seeded sample of them (0: all)


def scales(task):
    data = dict(dataset=bundled_path(f"{task}.jsonl"), split="train", test_split="",  # offline: separate test files
                agreement_dataset=bundled_path(f"{task}_test.jsonl"))
    if task == "tldr":
        data.update(sft_dataset=bundled_path("tldr_sft.jsonl"), sft_test_dataset=bundled_path("tldr_sft_test.jsonl"))
    else:
        data.update(test_dataset=bundled_path("hh_test.jsonl"))
    single_turn = task == "hh"
    if task == "tldr":  # pairs from the comparisons; SFT data, test prompts and references from the SFT set
        paper_data = dict(dataset="openai/summarize_from_feedback", split="train", test_split="",
                          sft_dataset="CarperAI/openai_summarize_tldr", sft_split="train", sft_test_split="test",
                          agreement_dataset="openai/summarize_from_feedback", agreement_split="validation")
    else:  # pairs, SFT data (chosen) and test prompts (single-turn, references chosen) from one set
        paper_data = dict(dataset="Anthropic/hh-rlhf", split="train", test_split="test",
                          agreement_dataset="Anthropic/hh-rlhf", agreement_split="test")
    return {
        "smoke": Scale(model="tiny", **data, train_pairs=96, judge_pairs=64,
                       test_prompts=16, new_tokens=16, sft_steps=6, dpo_steps=6, batch_size=8, lr=3e-3, eval_every=3,
                       max_length=448, max_prompt_length=384, temperatures=(0.0, 0.5, 1.0), single_turn=single_turn,
                       best_of_n=4, reward_epochs=1, ppo_iterations=2, ppo_rollouts=8,
                       preferred_ft_steps=3 if task == "tldr" else 0),
        "laptop": Scale(model="smollm2", **data, train_pairs=128, judge_pairs=64,
                        test_prompts=32, new_tokens=32, sft_steps=24, dpo_steps=32, batch_size=8, lr=2e-5,
                        # ≤ 30 min alone on 2 cores: TL;DR's figure is by temperature (five, DPO measured at its end,
                        # Best-of-8 at two), HH's by method and over training (three temperatures, DPO every 16 steps)
                        eval_every=16 if task == "hh" else 0, max_length=192, max_prompt_length=144, train_layers=8,
                        temperatures=TEMPERATURES if task == "tldr" else (0.0, 0.5, 1.0), single_turn=single_turn,
                        best_of_n=8, best_of_n_temperatures=(0.5, 1.0), ppo_iterations=8, sample_batch=64,
                        preferred_ft_steps=24 if task == "tldr" else 0),
        # One GPU (see memory_estimate): bf16 autocast, micro-batches of 8 (SFT) / 8 pairs (DPO), gradient
        # checkpointing, the paper's RMSprop with 150 warmup steps for DPO; the paper's Best-of-128. PPO: 12,800
        # episodes (the paper does not state PPO's budget), not yet timed on a GPU.
        "paper": Scale(model="EleutherAI/pythia-2.8b", **paper_data, train_pairs=0, judge_pairs=2000, test_prompts=256,
                       new_tokens=256, sft_steps=0, dpo_steps=0, batch_size=64, lr=1e-6, eval_every=300,
                       single_turn=single_turn, best_of_n=128, reward_pairs=8192, grad_accum=8,
                       gradient_checkpointing=True, optimizer="rmsprop", warmup_steps=150, ppo_iterations=200,
                       ppo_rollouts=64, preferred_ft_steps=500 if task == "tldr" else 0),  # Preferred-FT: not tuned
    }


HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"

# The paper's base-model baseline for HH (Fig. 3, "Pythia-2.8B 2-shot"): the base model prompted with two
# example dialogues in the dataset's own format, then the test dialogue.
TWO_SHOT = (f"{HUMAN} What is a good way to keep cut flowers fresh for longer?"
            f"{ASSISTANT} Trim the stems at an angle, change the water every day or two, and keep the vase out of "
            "direct sunlight and away from ripe fruit."
            f"{HUMAN} Can you explain what a leap year is?"
            f"{ASSISTANT} A leap year has 366 days instead of 365. The extra day, February 29, keeps the calendar in "
            "step with the Earth's orbit, which takes about 365.25 days.")


def two_shot_prompt(prompt):
    """The 2-shot prompt for an HH prompt ("\\n\\nHuman: ...\\n\\nAssistant:"): the two examples, then it."""
    return TWO_SHOT + prompt


def end_of_turn(response):
    """A base model's answer up to the next turn it goes on to write itself ("\\n\\nHuman: ..."), stripped of
    trailing whitespace."""
    for turn in (HUMAN, ASSISTANT, HUMAN.rstrip(":"), ASSISTANT.rstrip(":")):
        response = response.split(turn)[0]
    return response.rstrip()


def cluster_of(prompt):
    """The post (TL;DR: its title) or the task (HH: what the question asks how to do) a test prompt comes from:
    verdicts on prompts of one cluster are not independent, so win-rate intervals count clusters (judges.win_rate).
    A prompt that names neither is its own cluster."""
    title = re.search(r"^TITLE: (.*)$", prompt, re.MULTILINE)
    if title:
        return title.group(1).strip()
    task = re.search(r"(?:how to|method to|tried to|follow to) ([^?.]+)", prompt)
    return task.group(1).strip() if task else prompt


def is_single_turn(prompt):
    """One Human turn: the single-turn dialogues of the paper's Fig. 3."""
    return prompt.count(HUMAN) == 1


def load_base(scale, device):
    return load_model(scale.model, device, tiny="neox", max_position_embeddings=1024)


@dataclass
class Data:
    train: list  # {"prompt", "chosen", "rejected"}: DPO's pairs (and Preferred-FT's chosen responses)
    judge: list  # pairs for the offline judge, used by no policy
    test: list  # {"prompt", "reference"}: what the win rates are measured on, against the reference
    sft: list  # {"prompt", "response"}: what the reference policy is fine-tuned on
    agreement: list = dataclasses.field(default_factory=list)  # held-out labelled pairs to check the judge on


def load_data(scale, seed):
    """Every record a run uses, from the scale's sources (see Data). Test prompts are a seeded sample of
    the test split (HH: of its single-turn dialogues), or are carved out of the shuffled training
    source when it has none; they never appear in training."""
    from ..data import load_preferences, load_tldr_sft, seeded_sample
    pairs = list(load_preferences(scale.dataset, split=scale.split, skip_invalid=True))
    random.Random(seed).shuffle(pairs)
    eligible = (lambda r: is_single_turn(r["prompt"])) if scale.single_turn else (lambda r: True)
    sft = None
    if scale.sft_dataset:  # TL;DR: human-written summaries to fine-tune on and to compare against
        sft = list(load_tldr_sft(scale.sft_dataset, scale.sft_split, skip_invalid=True))
        if scale.sft_test_split or scale.sft_test_dataset:
            source, split = ((scale.sft_dataset, scale.sft_test_split) if scale.sft_test_split
                             else (scale.sft_test_dataset, "train"))  # a file is one split, read as "train"
            held_out = load_tldr_sft(source, split, skip_invalid=True)
            test = seeded_sample(held_out, scale.test_prompts, seed)
        else:
            test = seeded_sample(sft, scale.test_prompts, seed)
        test = [{"prompt": r["prompt"], "reference": r["response"]} for r in test]
    elif scale.test_split or scale.test_dataset:
        source, split = (scale.dataset, scale.test_split) if scale.test_split else (scale.test_dataset, "train")
        held_out = [r for r in load_preferences(source, split=split, skip_invalid=True) if eligible(r)]
        test = [{"prompt": r["prompt"], "reference": r["chosen"]} for r in seeded_sample(held_out, scale.test_prompts,
                                                                                          seed)]
    else:
        carved = [r for r in pairs if eligible(r)][:scale.test_prompts]  # the pairs are shuffled: a seeded sample
        test = [{"prompt": r["prompt"], "reference": r["chosen"]} for r in carved]
    test_prompts = {r["prompt"] for r in test}
    pairs = [r for r in pairs if r["prompt"] not in test_prompts]
    judge = pairs[:scale.judge_pairs]
    train = pairs[scale.judge_pairs:][:scale.train_pairs or None]
    if sft is None:  # Preferred-FT: the chosen responses of every training record
        sft = [{"prompt": r["prompt"], "response": r["chosen"]} for r in train]
    sft = [r for r in sft if r["prompt"] not in test_prompts]
    agreement = []
    if scale.agreement_dataset:  # held out from every policy and from the judge's own fit
        labelled = load_preferences(scale.agreement_dataset, split=scale.agreement_split, skip_invalid=True)
        agreement = seeded_sample(labelled, scale.agreement_pairs or len(labelled), seed)
    return Data(train, judge, test, sft, agreement)


def split_data(scale, seed):
    """(training pairs, judge pairs, test records) of load_data."""
    data = load_data(scale, seed)
    return data.train, data.judge, data.test


def one_epoch(scale, data):
    """The scale with sft_steps / dpo_steps of 0 made one pass over the SFT records / training pairs, as the
    paper trains (the batch size divides the records; the last batch may be short)."""
    epoch = lambda records: -(-len(records) // scale.batch_size)  # noqa: E731  (ceiling division)
    return dataclasses.replace(scale, sft_steps=scale.sft_steps or epoch(data.sft),
                               dpo_steps=scale.dpo_steps or epoch(data.train))


def make_judge(kind, task, base, tokenizer, judge_records, out, prompt="standard", bf16=False, device="cpu"):
    """The judge: "proxy" (offline, on a frozen bf16/fp32 copy of the base model: the only copy a run
    makes), "api" (the paper's GPT-4 prompt; TL;DR's standard (S) or concise (C)) or a reward model name; each
    behind the degenerate-response rule (judges.GuardedJudge: a loop, a prompt copy or nothing loses)."""
    if prompt not in ("standard", "concise") or (prompt == "concise" and task != "tldr"):
        raise ValueError(f"judge prompt {prompt!r}: standard, or concise (TL;DR only)")
    if kind == "proxy":
        features = frozen_copy(base).to(torch.bfloat16 if bf16 else torch.float32)
        return GuardedJudge(ProxyJudge(features, tokenizer, judge_records))
    if kind == "api":
        template = "dialogue" if task == "hh" else "summary_concise" if prompt == "concise" else "summary"
        return GuardedJudge(ApiJudge(template, cache_path=os.path.join(out, "judge_cache.jsonl")))
    return GuardedJudge(RewardModelJudge(kind, device=device))


def best_of_n(policy, tokenizer, prompts, n, new_tokens, temperature, reward, seed=0, batch_size=32, cut=None):
    """Best-of-N (the paper's Best-of-128): n samples of the policy per prompt, the one reward(prompts,
    responses) -> scores ranks highest, an empty response only if all are (a reward model fitted on pairs
    never saw one). cut(responses) -> responses as they are judged (HH: up to the next turn), before scoring.
    Returns (the best response per prompt, every prompt's n candidates, their scores)."""
    repeated = [p for p in prompts for _ in range(n)]
    samples = generate(policy, tokenizer, repeated, new_tokens, temperature=temperature, batch_size=batch_size,
                       seed=seed)
    responses = [s["completion"] for s in samples]
    responses = cut(responses) if cut is not None else responses
    scores = reward(repeated, responses)
    candidates = [responses[i * n:(i + 1) * n] for i in range(len(prompts))]
    candidate_scores = [scores[i * n:(i + 1) * n] for i in range(len(prompts))]
    best = [c[best_scored(c, s)] for c, s in zip(candidates, candidate_scores)]
    return best, candidates, candidate_scores


# ---- memory --------------------------------------------------------------------------------------

def memory_estimate(scale, judge="proxy", config=None, device_type="cuda"):
    """Bytes at the peak of each stage of run(), estimated from the model's config (minidpo.memory).
    config: a transformers config (default: the scale's model's, from the hub or a table offline)."""
    config = config if config is not None else memory.model_config(scale.model)
    shape = memory.shape_of(config, scale.train_layers)
    bf16 = uses_bf16(scale.dtype, device_type)
    micro = scale.batch_size // scale.grad_accum
    judge_copy = {"judge copy": shape.params * (memory.BF16 if bf16 else memory.FP32)} if judge == "proxy" else {}
    prompt = scale.max_prompt_length + len(TWO_SHOT) // 3  # the 2-shot examples: ~3 characters a token
    sampling = memory.generation(shape, scale.sample_batch, prompt, scale.new_tokens, bf16)
    dpo_training = memory.training(shape, 2 * micro, scale.max_length, bf16, scale.gradient_checkpointing,
                                   scale.optimizer)
    stages = {
        "sampling": sampling,
        "judge / reward features": memory.inference(shape, 16, scale.max_length, bf16, hidden_states=True),
        "SFT": memory.training(shape, micro, scale.max_length, bf16, scale.gradient_checkpointing, "adamw"),
        "DPO reference log-probs": memory.inference(shape, 2 * micro, scale.max_length, bf16, copies=2),
        "DPO": dpo_training,
        "DPO, sampling along": {**sampling, "optimizer": dpo_training["optimizer"]},
    }
    if scale.best_of_n or scale.ppo_iterations:  # the reference stays while its reward model trains
        reward = memory.training(shape, 2 * scale.reward_batch, scale.max_length, bf16, scale.gradient_checkpointing,
                                 "adamw")
        stages["reward model"] = {**reward, "logits": 0, "reference": shape.params * memory.FP32}  # a scalar head
    if scale.ppo_iterations:  # PPO's policy trains beside the reference (its KL) and the reward model (its score)
        ppo = memory.training(shape, PPOConfig().minibatch, scale.max_prompt_length + scale.new_tokens, bf16,
                              scale.gradient_checkpointing, "adamw")
        stages["PPO"] = {**ppo, "reference": shape.params * memory.FP32,
                         "reward model": shape.params * (memory.BF16 if bf16 else memory.FP32)}
    return {stage: {**parts, **judge_copy} for stage, parts in stages.items()}


# ---- the run -------------------------------------------------------------------------------------

BETAS = {"tldr": 0.5, "hh": 0.1}  # the paper's beta per task


def check_judge(judge_fn, records, say):
    """The judge-agreement table (the offline stand-in for the paper's Table 2): the run's judge and the
    length-only LongerJudge, each against held-out labels and with the responses swapped."""
    table = {}
    for name, candidate in (("judge", judge_fn), ("longer response wins", LongerJudge())):
        table[name] = judge_agreement(candidate, records)
        agree, swap = table[name]["agreement"], table[name]["swap_consistency"]
        say(f"{name:22s} agrees with the label on {agree['win_rate']:.3f} [{agree['low']:.3f}, "
            f"{agree['high']:.3f}] of {len(records)} held-out pairs; swap-consistent on {swap['win_rate']:.3f}")
    return table


def check_degenerate_probes(judge_fn, records, say):
    """Why the degenerate-response rule: how often the bare judge prefers a loop, a copy of the prompt or a
    truncation of the chosen response to the chosen response itself, and how often the judge behind the rule does."""
    table = {"bare judge": probe_preferences(judge_fn.judge, records),
             "judge behind the rule": probe_preferences(judge_fn, records)}
    for name, shares in table.items():
        say(f"{name:22s} prefers to the chosen response: " + ", ".join(f"a {k} {v:.3f}" for k, v in shares.items()))
    judge_fn.reset_counts()
    return table


def portable(config):
    """A config with its file paths made relative (to the package for bundled data, else to the working folder):
    a summary.json names no machine's folders."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above minidpo/
    return {key: os.path.relpath(value, root if value.startswith(root) else os.getcwd())
            if isinstance(value, str) and os.path.isabs(value) else value for key, value in config.items()}


def judge_record(judge_fn, scale):
    """What judged the run: the judge's class and model, and what it cost (requests and tokens, for an API)."""
    inner = judge_fn.judge
    model = getattr(inner, "name", None) or getattr(inner, "model", None)
    if not isinstance(model, str):  # the proxy: a linear head over the base model's features
        model = f"{scale.model} features, a Bradley-Terry linear head"
    return {"class": type(inner).__name__, "model": model, "requests": getattr(inner, "requests", 0),
            "tokens": getattr(inner, "tokens", None), "ruled_degenerate": "judges.degenerate, before the judge"}


@dataclass
class WinRateRun:
    """What every step of one TL;DR or HH run shares: the test prompts and their references, the judge, and where
    each policy's win rates (results.jsonl) and judged samples (samples.jsonl) are written."""
    task: str
    scale: Scale
    out: str
    seed: int
    tokenizer: object
    prompts: list  # the test prompts
    references: list  # what every response is judged against: the human summary (TL;DR), the chosen response (HH)
    judge_fn: object
    autocast: object  # () -> the context sampling runs in
    summary: dict = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def results_path(self):
        return os.path.join(self.out, "results.jsonl")

    @property
    def samples_path(self):
        return os.path.join(self.out, "samples.jsonl")

    def say(self, message):
        print(f"[{time.time() - self.started:5.0f}s] {message}", flush=True)

    def cut(self, responses):
        """HH: every policy's response ends where it starts writing the next turn itself; TL;DR: unchanged."""
        return [end_of_turn(r) for r in responses] if self.task == "hh" else responses

    def sample(self, policy, t, model_prompts=None):
        with self.autocast():
            samples = generate(policy, self.tokenizer, model_prompts or self.prompts, self.scale.new_tokens,
                               temperature=t, batch_size=self.scale.sample_batch, seed=self.seed + 17)
        return self.cut([s["completion"] for s in samples])

    def record(self, method, step, t, responses, **extra):
        """Judge the responses against the references; append the win rate and every verdict."""
        self.judge_fn.reset_counts()
        verdicts = self.judge_fn(self.prompts, responses, self.references)
        clusters = [cluster_of(p) for p in self.prompts]
        row = {"method": method, "temperature": t, "step": step, **extra, **win_rate(verdicts, clusters=clusters),
               "ruled_degenerate": dict(self.judge_fn.ruled),  # responses the rule decided, by reason
               "degenerate_share": sum(self.judge_fn.ruled.values()) / len(responses),
               "mean_words": sum(len(r.split()) for r in responses) / len(responses)}
        if self.task == "tldr":  # against the human-written summary: a measure no judge can be fooled into
            row["rouge_l"] = sum(rouge_l(responses, self.references)) / len(responses)
        with open(self.results_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.samples_path, "a") as f:
            for p, r, b, v in zip(self.prompts, responses, self.references, verdicts):
                f.write(json.dumps({"method": method, "temperature": t, "step": step, "prompt": p, "response": r,
                                    "baseline": b, "verdict": v}) + "\n")
        self.say(f"{method:12s} T={t:.2f} step {step:4d}: win rate {row['win_rate']:.3f} "
                 f"[{row['low']:.3f}, {row['high']:.3f}] n={row['n']} invalid={row['invalid']}")

    def measure(self, policy, method, step, temperatures):
        for t in temperatures:
            self.record(method, step, t, self.sample(policy, t))


def run(task, scale_name="smoke", out=None, seed=0, judge="proxy", device=None, judge_prompt="standard", beta=None,
        **overrides):
    """The whole pipeline for task "tldr" or "hh"; beta is DPO's (None: the paper's, BETAS); overrides
    replace fields of the scale."""
    scale = dataclasses.replace(scales(task)[scale_name], **overrides)
    out = out or os.path.join("runs", f"{task}-{scale_name}")
    os.makedirs(out, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.time()
    torch.manual_seed(seed)
    beta = BETAS[task] if beta is None else beta
    base, tokenizer = load_base(scale, device)
    base.eval()
    data, experiment = prepare(task, scale, scale_name, out, seed, judge, judge_prompt, beta, base, tokenizer, device,
                               started)
    if task == "hh":  # 1. The base model's baseline: TL;DR zero-shot; HH the paper's 2-shot prompting.
        for t in scale.temperatures:
            experiment.record("two_shot", 0, t, experiment.sample(base, t, [two_shot_prompt(p) for p in
                                                                              experiment.prompts]))
    else:
        experiment.measure(base, "base", 0, (0.0,))
    policy = train_reference(experiment, base, data)
    reward = fit_reward_model(experiment, policy, data) if scale.best_of_n or scale.ppo_iterations else None
    if scale.best_of_n:
        measure_best_of_n(experiment, policy, reward)
    if scale.preferred_ft_steps:
        train_preferred_ft(experiment, policy, data)
    if scale.ppo_iterations:
        train_ppo(experiment, policy, data, reward)
    del reward
    train_dpo_along(experiment, policy, data, beta)
    return finish(experiment, scale_name)


def prepare(task, scale, scale_name, out, seed, judge, judge_prompt, beta, base, tokenizer, device, started):
    """The memory estimate, the data, the judge (and its agreement check); empty results and samples files.
    Returns (data, the WinRateRun)."""
    estimate = memory_estimate(scale, judge, base.config, device.type)
    budget = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    say = lambda msg: print(f"[{time.time() - started:5.0f}s] {msg}", flush=True)  # noqa: E731
    say(f"memory estimate per stage:\n{memory.format_estimate(estimate, budget)}")
    data = load_data(scale, seed)
    scale = one_epoch(scale, data)
    say(f"{len(data.train)} training pairs, {len(data.sft)} SFT records, {len(data.judge)} judge pairs, "
        f"{len(data.test)} test prompts; {scale.sft_steps} SFT steps, {scale.dpo_steps} DPO steps")
    bf16 = uses_bf16(scale.dtype, device.type)
    judge_fn = make_judge(judge, task, base, tokenizer, data.judge, out, judge_prompt, bf16, device)
    summary = {"task": task, "scale": scale_name, "beta": beta, "seed": seed,
               "config": portable(dataclasses.asdict(scale)), "judge": judge, "judge_prompt": judge_prompt,
               "reference_method": "sft" if scale.sft_dataset else "preferred_ft",
               "memory_estimate_gb": {stage: memory.total(parts) / memory.GB for stage, parts in estimate.items()}}
    if isinstance(judge_fn.judge, ProxyJudge):
        summary["judge_heldout_accuracy"] = judge_fn.accuracy
        say(f"offline judge: held-out pair accuracy {judge_fn.accuracy:.3f}")
    if data.agreement:
        summary["judge_agreement"] = check_judge(judge_fn, data.agreement, say)
        summary["degenerate_probes"] = check_degenerate_probes(judge_fn, data.agreement, say)
    experiment = WinRateRun(task, scale, out, seed, tokenizer, [r["prompt"] for r in data.test],
                            [r["reference"] for r in data.test], judge_fn, autocast_for(scale.dtype, device), summary,
                            started)
    for path in (experiment.results_path, experiment.samples_path):
        open(path, "w").close()
    return data, experiment


def train_reference(experiment, base, data):
    """2. SFT / Preferred-FT, in place: the base model becomes the reference policy (saved in <out>/sft, for DPO
    elsewhere, e.g. torchrun -m minidpo --model <out>/sft), measured at every temperature."""
    scale, out, tokenizer = experiment.scale, experiment.out, experiment.tokenizer
    policy = freeze_all_but_top(base, scale.train_layers)
    with checkpointing(policy, scale.gradient_checkpointing):
        sft_losses = sft_train(policy, tokenizer, data.sft, steps=scale.sft_steps, batch_size=scale.batch_size,
                               lr=scale.lr, max_length=scale.max_length, seed=experiment.seed,
                               max_prompt_length=scale.max_prompt_length, grad_accum=scale.grad_accum,
                               dtype=scale.dtype)
    experiment.say(f"SFT: loss {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f}")
    policy.save_pretrained(os.path.join(out, "sft"))
    tokenizer.save_pretrained(os.path.join(out, "sft"))
    experiment.summary["sft_loss"] = [sft_losses[0], sft_losses[-1]]
    policy.eval()
    experiment.measure(policy, experiment.summary["reference_method"], 0, scale.temperatures)
    return policy


def fit_reward_model(experiment, policy, data):
    """The learned reward model of Best-of-N and PPO (Eq. 2): the reference policy's transformer with a scalar
    head, trained on the training pairs for reward_epochs, its best validation checkpoint kept; its accuracy on
    pairs of held-out prompts reported. Not the judge: the offline judge is a linear probe on the frozen base model,
    fitted on pairs no policy or reward model sees. Returns the reward_model.RewardModel."""
    scale = experiment.scale
    config = RewardModelConfig(epochs=scale.reward_epochs, batch_size=scale.reward_batch, lr=scale.lr,
                               train_layers=scale.train_layers, max_length=scale.max_length,
                               gradient_checkpointing=scale.gradient_checkpointing, seed=experiment.seed)
    with experiment.autocast():
        reward, report = train_reward_model(policy, experiment.tokenizer, data.train[:scale.reward_pairs or None],
                                            config)
    if uses_bf16(scale.dtype, policy.device.type):  # from here on it only scores: its transformer in bf16
        reward.body.to(torch.bfloat16)
    experiment.summary["reward_model_heldout_accuracy"] = report["test_accuracy"]
    experiment.summary["reward_model"] = report
    experiment.say(f"reward model (kept step {report['step']} of {report['steps']}): validation accuracy "
                   f"{report['val_accuracy']:.3f}, held-out pair accuracy {report['test_accuracy']:.3f} on "
                   f"{report['pairs']['test']} pairs")
    return reward


def measure_best_of_n(experiment, policy, reward):
    """3. Best-of-N over the reference, ranked by the learned reward model."""
    scale = experiment.scale
    for t in scale.best_of_n_temperatures or [t for t in scale.temperatures if t > 0]:
        with experiment.autocast():
            best, _, _ = best_of_n(policy, experiment.tokenizer, experiment.prompts, scale.best_of_n,
                                   scale.new_tokens, t, reward.score, experiment.seed + 17, scale.sample_batch,
                                   cut=experiment.cut)
        experiment.record("best_of_n", 0, t, best, best_of=scale.best_of_n)


def train_preferred_ft(experiment, policy, data):
    """TL;DR's Preferred-FT: a copy of the SFT model fine-tuned on the chosen summaries of the training pairs,
    measured at every temperature, then dropped."""
    scale = experiment.scale
    preferred = copy.deepcopy(policy)
    with checkpointing(preferred, scale.gradient_checkpointing):
        losses = sft_train(preferred, experiment.tokenizer, [{"prompt": r["prompt"], "response": r["chosen"]}
                                                             for r in data.train],
                           steps=scale.preferred_ft_steps, batch_size=scale.batch_size, lr=scale.lr,
                           max_length=scale.max_length, seed=experiment.seed, max_prompt_length=scale.max_prompt_length,
                           grad_accum=scale.grad_accum, dtype=scale.dtype)
    experiment.say(f"Preferred-FT: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    experiment.summary["preferred_ft_loss"] = [losses[0], losses[-1]]
    preferred.eval()
    experiment.measure(preferred, "preferred_ft", scale.preferred_ft_steps, scale.temperatures)


def train_ppo(experiment, policy, data, reward):
    """PPO (the paper's RLHF baseline): a copy of the reference trained on the training prompts against the learned
    reward model, with the KL penalty to the reference (the model `policy` itself, read without gradients); measured at
    every temperature, then dropped. HH's rollouts are scored as they are judged: cut at the next turn."""
    scale = experiment.scale
    prompts = list(dict.fromkeys(r["prompt"] for r in data.train))
    config = PPOConfig(iterations=scale.ppo_iterations, rollouts=scale.ppo_rollouts, max_new_tokens=scale.new_tokens,
                       lr=scale.lr, target_kl=scale.ppo_target_kl, seed=experiment.seed)

    def score(samples):
        return reward.score([s["prompt"] for s in samples], experiment.cut([s["completion"] for s in samples]))

    trained = copy.deepcopy(policy)
    log = lambda row: experiment.say(f"PPO iteration {row['iteration']}: reward {row['score']:+.3f}, "  # noqa: E731
                                     f"sampled KL {row['kl']:.2f}, kl_coef {row['kl_coef']:.4f}")
    with experiment.autocast(), checkpointing(trained, scale.gradient_checkpointing):
        history = ppo_train(trained, policy, experiment.tokenizer, prompts, score, config, log=log)
    experiment.summary["ppo_history"] = history
    trained.eval()
    experiment.measure(trained, "ppo", scale.ppo_iterations, scale.temperatures)


def train_dpo_along(experiment, policy, data, beta):
    """4. DPO from the reference, in place; win rates along training at every temperature (Fig. 3 right)."""
    scale = experiment.scale
    config = runs.RunConfig(out=os.path.join(experiment.out, "dpo"), beta=beta, batch_size=scale.batch_size,
                            grad_accum=scale.grad_accum, optimizer=scale.optimizer, lr=scale.lr,
                            warmup_steps=scale.warmup_steps, max_steps=scale.dpo_steps, eval_every=0,
                            save_every=scale.dpo_steps, max_length=scale.max_length,
                            max_prompt_length=scale.max_prompt_length, dtype=scale.dtype, precompute_ref=True,
                            overwrite=True, progress=False, seed=experiment.seed)

    def along(step, trained):
        if step and scale.eval_every and step % scale.eval_every == 0 and step < scale.dpo_steps:
            experiment.measure(trained, "dpo", step, scale.temperatures)

    os.makedirs(config.out, exist_ok=True)
    with checkpointing(policy, scale.gradient_checkpointing):
        runs.train(config, data.train, [], model=policy, tokenizer=experiment.tokenizer, callback=along)
    experiment.measure(policy, "dpo", scale.dpo_steps, scale.temperatures)


def finish(experiment, scale_name):
    """summary.json and the win-rate figure; returns results.jsonl's path."""
    experiment.summary["seconds"] = time.time() - experiment.started
    experiment.summary["judge_record"] = judge_record(experiment.judge_fn, experiment.scale)
    with open(os.path.join(experiment.out, "summary.json"), "w") as f:
        json.dump(experiment.summary, f, indent=1)
    from .plots import plot_win_rates
    tldr = experiment.task == "tldr"
    figure = plot_win_rates(experiment.results_path, os.path.join(experiment.out, "win_rates.png"),
                            title=f"{'TL;DR summarization' if tldr else 'Anthropic HH dialogue'}, "
                                  f"{scale_name} scale: win rate vs the test set's reference on "
                                  f"{len(experiment.prompts)} prompts, judged by "
                                  f"{type(experiment.judge_fn.judge).__name__} behind the degenerate-response rule",
                            baseline="the human-written summary" if tldr else "the chosen response")
    experiment.say(f"results: {experiment.results_path}\nfigure: {figure}")
    return experiment.results_path


def parse_scale_overrides(items):
    """FIELD=VALUE strings -> typed overrides of Scale (booleans as true/false)."""
    from .imdb import parse_overrides
    booleans = {f.name for f in dataclasses.fields(Scale) if str(f.type) in ("bool", "<class 'bool'>")}
    plain = [item for item in items if item.partition("=")[0] not in booleans]
    out = parse_overrides(plain, Scale)
    for item in items:
        name, _, value = item.partition("=")
        if name in booleans:
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"{name} is true or false, got {value!r}")
            out[name] = value.lower() in ("true", "1")
    return out


def main(task, argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("smoke", "laptop", "paper"), default="smoke")
    parser.add_argument("--out", default=None, help=f"output folder (default: runs/{task}-<scale>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=None, help=f"DPO's beta (default: the paper's, {BETAS[task]})")
    parser.add_argument("--judge", default="proxy", help="proxy (offline) | api (OpenAI-compatible, from the "
                        "environment: MINIDPO_JUDGE_BASE_URL, MINIDPO_JUDGE_MODEL, OPENAI_API_KEY) | a reward "
                        "model's name")
    parser.add_argument("--judge_prompt", choices=("standard", "concise"), default="standard",
                        help="TL;DR's GPT-4 prompt for --judge api: standard (S, the paper's default) or concise (C, "
                             "section 6.4: (S) favours longer summaries)")
    parser.add_argument("--memory", action="store_true", help="print the memory estimate per stage (for a GPU) "
                        "and exit")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override fields of the scale, e.g. --set model=EleutherAI/pythia-410m dpo_steps=500")
    args = parser.parse_args(argv)
    overrides = parse_scale_overrides(args.set)
    if args.memory:
        scale = dataclasses.replace(scales(task)[args.scale], **overrides)
        print(memory.format_estimate(memory_estimate(scale, args.judge)))
        return
    run(task, args.scale, args.out, args.seed, args.judge, judge_prompt=args.judge_prompt, beta=args.beta,
        **overrides)
