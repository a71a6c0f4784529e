"""Direct Preference Optimization in one file.

Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", NeurIPS 2023 (arXiv:2305.18290). Equation numbers are the paper's.

Read top to bottom, as the paper goes:

    1. log pi(y|x)         sequence_logps          sum of response-token log-probs
    2. implicit reward     implicit_rewards        r(x, y) = beta log pi(y|x) / pi_ref(y|x)   (Eq. 5)
    3. the loss            dpo_loss                Eq. 7, plus cDPO, IPO, hinge, reference-free
    4. the gradient        gradient_weights        sigma(r_l - r_w), the weight of Section 4
    5. batching            tokenize_pair, collate, concatenated_forward
    6. training            TrainConfig, train      DDP via torchrun, checkpoints, exact resume
    appendix               a faster log-softmax    what the training path uses instead of 1's plain one

It imports only torch, transformers and the standard library, so it can be copied alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
from array import array
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions that are not predictions: prompt tokens and padding


# --------------------------------------------------------------------------------------------------
# 1. log pi(y|x): the sum of the response tokens' log-probabilities
# --------------------------------------------------------------------------------------------------

def token_logps(logits, labels, fast=False, overwrite=False):
    """log pi(y_t | x, y_<t) of every label token, and which positions are response tokens.

    logits: (B, T, V) from a causal LM on the whole prompt + response sequence.
    labels: (B, T) the same token ids, with IGNORE_INDEX on prompt and padding positions.
    fast: the same numbers through log_softmax_at (appendix), which saves memory and time on a CPU;
    overwrite (fast only): its backward may write into the logits' memory (for logits nothing else reads).
    Returns (token_logps, mask), each (B, T-1); token_logps is 0 where mask is False.
    """
    labels = labels[:, 1:]  # (B, T-1) off by one: the logits at position t predict the token at t + 1
    mask = labels != IGNORE_INDEX  # (B, T-1) prompt tokens are conditioning, not predictions
    safe_labels = labels.masked_fill(~mask, 0)  # any valid index: these positions are dropped below
    if fast:  # slice the small output, not the logits: a slice of the logits would be copied in backward
        logps = log_softmax_at(logits, F.pad(safe_labels, (0, 1)), overwrite)[:, :-1]  # (B, T-1)
    else:
        log_probs = logits[:, :-1].log_softmax(-1)  # (B, T-1, V)
        logps = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    # where, not multiply: a fully masked padding row may hold NaN logits, and NaN * 0 = NaN.
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def sequence_logps(logits, labels, average=False, fast=False, overwrite=False):
    """log pi(y|x) of each sequence: the sum over response tokens (the paper's choice). Returns (B,).

    average: the per-token mean instead (an option: it changes the effective beta with length).
    """
    logps, mask = token_logps(logits, labels, fast, overwrite)  # (B, T-1), (B, T-1)
    total = logps.sum(-1)  # (B,)
    return total / mask.sum(-1).clamp(min=1) if average else total


# --------------------------------------------------------------------------------------------------
# 2. The implicit reward (Eq. 5, without the beta log Z(x) that cancels in every comparison)
# --------------------------------------------------------------------------------------------------

def implicit_rewards(policy_logps, reference_logps, beta):
    """r_hat(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)  (Eq. 5 up to beta log Z(x)). (B,) -> (B,)."""
    return beta * (policy_logps - reference_logps)


@torch.no_grad()
def implicit_reward_scores(policy, reference, tokenizer, prompts, responses, beta=0.1, batch_size=8,
                           max_length=512, max_prompt_length=256, average=False):
    """Your language model is secretly a reward model: r_hat(x, y) of any responses. Returns (N,).

    prompts: one prompt for every response, or a list of N; responses: a list of N strings.
    Tokenised as tokenize_pair does, so on a training pair these are the loss's own rewards.
    """
    prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
    scores = []
    for start in range(0, len(responses), batch_size):
        sequences = []
        for prompt, response in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            prompt_ids, (ids,), _, _ = _pair_tokens(tokenizer, prompt, (response,), max_length, max_prompt_length)
            sequences.append((prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids))
        batch = [t.to(next(policy.parameters()).device) for t in pad_sequences(sequences, tokenizer.pad_token_id)]
        policy_logps = batch_logps(policy, *batch, average=average)  # (b,)
        reference_logps = batch_logps(reference, *batch, average=average)  # (b,)
        scores.append(implicit_rewards(policy_logps, reference_logps, beta))
    return torch.cat(scores) if scores else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# 3. The DPO loss (Eq. 7) and the variants people use beside it
# --------------------------------------------------------------------------------------------------

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_loss_arguments(beta, loss_type, label_smoothing):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:  # at 0.5 the labels carry no information
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps,
             beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False):
    """Eq. 7 and its variants. Inputs (B,) log-probs; returns (losses, chosen_rewards, rejected_rewards), each (B,).

    With h = beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]:
      sigmoid  -(1 - eps) log sigma(h) - eps log sigma(-h)   Eq. 7; eps = label_smoothing > 0 is cDPO
      ipo      (h / beta - 1 / (2 beta))^2                   Azar et al. 2023
      hinge    max(0, 1 - h)                                 SLiC-style
    reference_free: pi_ref log-probs are taken as 0, in the loss and in the returned rewards.
    The rewards are the implicit rewards (Eq. 5), detached: they are for logging and weighting.
    """
    check_loss_arguments(beta, loss_type, label_smoothing)
    if reference_free:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)

    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) log pi/pi_ref of y_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) ... of y_l
    logits = chosen_logratios - rejected_logratios  # (B,) the margin without beta
    h = beta * logits  # (B,) = r_hat(y_w) - r_hat(y_l)

    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - h)

    chosen_rewards = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta).detach()
    rejected_rewards = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------------------------------
# 4. The gradient (Section 4)
#    grad L = -beta E[ sigma(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w|x) - grad log pi(y_l|x)) ]
# --------------------------------------------------------------------------------------------------

def gradient_weights(chosen_rewards, rejected_rewards):
    """sigma(r_hat(x, y_l) - r_hat(x, y_w)): how much each pair pushes the policy. (B,), (B,) -> (B,).

    Large when the implicit reward ranks the pair wrongly, near 0 when it already ranks it right
    by a wide margin: the weight that keeps DPO from degenerating like unlikelihood training.
    """
    return torch.sigmoid(rejected_rewards - chosen_rewards)


def preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Per-batch means for logging, as 0-d tensors (so they can be all-reduced under DDP).
    rewards/accuracy counts a tie as one half, so it is 0.5 at initialisation (policy == reference)."""
    correct = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return {"loss": losses.detach().mean(), "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(), "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": correct.mean(), "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean()}


METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected")


# --------------------------------------------------------------------------------------------------
# 5. Batching: tokenise a pair, pad a batch, one forward for chosen and rejected together
# --------------------------------------------------------------------------------------------------

def check_record(record):
    """Raise ValueError naming the field if a {"prompt", "chosen", "rejected"} record is unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, not a dict")
    for field in ("prompt", "chosen", "rejected"):
        value = record.get(field)
        if value is None:  # datasets fills a field absent from one JSON line with None
            raise ValueError(f"missing field {field!r}")
        if not isinstance(value, str):
            raise ValueError(f"{field!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{field!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are identical")


def _response_ids(tokenizer, text):
    """The response's tokens, closed by EOS (or the model never learns to stop), unless a chat
    template already closed it: SmolLM2's turns end '<|im_end|>\\n', and a second EOS would be taught."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    closed = tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token)
    return ids if closed else ids + [tokenizer.eos_token_id]


def _pair_tokens(tokenizer, prompt, responses, max_length, max_prompt_length):
    """(prompt ids, [response ids], prompt_cut, response_cut) within max_length; see tokenize_pair."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = [_response_ids(tokenizer, text) for text in responses]
    prompt_cut = len(prompt_ids) + max(map(len, response_ids)) > max_length
    if prompt_cut:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: it is what the response answers
    room = max_length - len(prompt_ids)  # response tokens that fit, EOS included
    if room < 2:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) leaves no room for a response within "
                         f"max_length={max_length}")
    response_cut = any(len(ids) > room for ids in response_ids)
    response_ids = [ids if len(ids) <= room else ids[:room - 1] + [tokenizer.eos_token_id] for ids in response_ids]
    return prompt_ids, response_ids, prompt_cut, response_cut


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=512, max_prompt_length=256):
    """Token ids and labels for one preference pair: a dict of lists chosen_input_ids, chosen_labels,
    rejected_input_ids, rejected_labels (each prompt + response, labels IGNORE_INDEX on the prompt).

    Prompt and response are tokenised separately and concatenated, so the labels decode exactly to
    the response and both responses share the prompt's tokens. EOS ends every response. If prompt +
    response is longer than max_length: keep the last max_prompt_length prompt tokens, then cut the
    response from the right, keeping its EOS. A response is never dropped entirely: ValueError.
    """
    return _tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length)[0]


def _tokenize_pair(tokenizer, prompt, chosen, rejected, max_length, max_prompt_length):
    """(tokenize_pair's dict, prompt_cut, response_cut)."""
    check_record({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompt_ids, responses, prompt_cut, response_cut = _pair_tokens(
        tokenizer, prompt, (chosen, rejected), max_length, max_prompt_length)
    out = {}
    for field, ids in zip(("chosen", "rejected"), responses):
        out[f"{field}_input_ids"] = prompt_ids + ids
        out[f"{field}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + ids
    return out, prompt_cut, response_cut


def pad_sequences(sequences, pad_token_id, padding_side="right"):
    """[(input_ids, labels)] -> input_ids, attention_mask, labels, each (N, T). The attention mask comes
    from the lengths, never from ids == pad_token_id (the pad token is often EOS, also a real token)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(ids) for ids, _ in sequences)

    def pad(values, fill):
        padding = [fill] * (T - len(values))
        return list(values) + padding if padding_side == "right" else padding + list(values)

    input_ids = torch.tensor([pad(ids, pad_token_id) for ids, _ in sequences])  # (N, T)
    attention_mask = torch.tensor([pad([1] * len(ids), 0) for ids, _ in sequences])  # (N, T)
    labels = torch.tensor([pad(labels, IGNORE_INDEX) for _, labels in sequences])  # (N, T)
    return input_ids, attention_mask, labels


def collate(examples, pad_token_id, padding_side="right"):
    """Pad tokenize_pair outputs to tensors (B, T), one T for chosen and rejected alike:
    chosen_/rejected_ input_ids, attention_mask, labels."""
    sequences = [(ex[f"{k}_input_ids"], ex[f"{k}_labels"]) for k in ("chosen", "rejected") for ex in examples]
    input_ids, attention_mask, labels = pad_sequences(sequences, pad_token_id, padding_side)  # (2B, T) each
    B = len(examples)
    batch = {}
    for k, part in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch.update({f"{k}_input_ids": input_ids[part], f"{k}_attention_mask": attention_mask[part],
                      f"{k}_labels": labels[part]})
    return batch


def position_ids_from_mask(attention_mask):
    """Positions count real tokens only: a left-padded sequence starts at 0 like an unpadded one. (B, T) -> (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def batch_logps(model, input_ids, attention_mask, labels, average=False, fast=False):
    """log pi(y|x) of each padded sequence (N, T) -> (N,)."""
    # lm_head is most of a small model's FLOPs: apply it only from the position before the earliest
    # response token on, since earlier logits predict prompt tokens.
    is_response = labels != IGNORE_INDEX  # (N, T)
    start = max(int(is_response.to(torch.uint8).argmax(-1).min()) - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(
        attention_mask), use_cache=False, logits_to_keep=labels.shape[1] - start).logits  # (N, T - start, V)
    # With fast, these logits are ours alone: the backward may write their gradient into their memory.
    return sequence_logps(logits.float(), labels[:, start:], average=average, fast=fast, overwrite=fast)  # (N,)


def concatenated_forward(model, batch, average=False, fast=True):
    """log pi(y_w|x), log pi(y_l|x) from ONE forward over chosen and rejected stacked on the batch axis
    (one pass through the weights instead of two). Returns (chosen_logps, rejected_logps), each (B,)."""
    stacked = [torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])  # (2B, T)
               for key in ("input_ids", "attention_mask", "labels")]
    logps = batch_logps(model, *stacked, average=average, fast=fast)  # (2B,)
    B = batch["chosen_input_ids"].shape[0]
    return logps[:B], logps[B:]


HINTS = {"leaves no room": "raise --max_length or lower --max_prompt_length",
         "identical": "drop those records, or pass --skip_invalid"}


def tokenize_records(tokenizer, records, max_length=512, max_prompt_length=256, skip_invalid=False, verbose=True):
    """tokenize_pair over records, each named by its "_source" key (file:line) or its index. A bad record
    is an error listing every bad one; skip_invalid drops and reports them. Truncation is reported once.
    Returns (examples, kept_indices)."""
    examples, kept, errors, cut = [], [], [], {"pairs": 0, "prompt": 0, "response": 0}
    for i, record in enumerate(records):
        try:
            check_record(record)
            example, prompt_cut, response_cut = _tokenize_pair(
                tokenizer, record["prompt"], record["chosen"], record["rejected"], max_length, max_prompt_length)
        except ValueError as e:
            name = record.get("_source", f"record {i}") if isinstance(record, dict) else f"record {i}"
            errors.append((name, str(e)))
            continue
        examples.append(example)
        kept.append(i)
        cut["pairs"] += prompt_cut or response_cut
        cut["prompt"] += prompt_cut
        cut["response"] += response_cut
    _report_bad_records(errors, len(records), skip_invalid, verbose)
    if verbose and cut["pairs"]:
        print(f"truncated {cut['pairs']} of {len(examples)} pairs to max_length={max_length} "
              f"(prompt cut in {cut['prompt']}, response cut in {cut['response']})")
    return examples, kept


def _report_bad_records(errors, total, skip_invalid, verbose):
    if not errors:
        return
    reasons = {re.sub(r"\d+", "N", reason) for _, reason in errors}  # "the prompt (41 tokens)" is alike for all N
    if len(errors) == total and len(reasons) == 1:  # dropping them all would leave nothing to train on
        name, reason = errors[0]
        hint = next((fix for key, fix in HINTS.items() if key in reason), "check the data")
        raise ValueError(f"all {total} records fail alike, e.g. {name}: {reason}; {hint}")
    listing = "\n  ".join(f"{name}: {reason}" for name, reason in errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
    if not skip_invalid:
        raise ValueError(f"{len(errors)} of {total} records are invalid (--skip_invalid drops them):\n  {listing}")
    if verbose:
        print(f"skipping {len(errors)} of {total} invalid records:\n  {listing}")


# --------------------------------------------------------------------------------------------------
# 6. Training: TrainConfig, train(), DDP via torchrun, checkpoints and exact resume
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # what to train on
    model: str = ""  # policy and reference: a Hugging Face hub name or a local folder
    gguf_file: str = ""  # a .gguf file inside `model` to load instead (dequantised to fp32)
    dataset: str = ""  # where the records come from: the CLI reads it with minidpo.data.load_preferences
    out: str = "out"  # output folder: metrics.jsonl, checkpoint/, final/
    eval_size: int | None = None  # records held out for evaluation (None: min(64, 10% of them); 0: none)
    skip_invalid: bool = False  # drop bad records, reporting how many and which, instead of stopping
    # the loss (Eq. 7 and its variants)
    beta: float = 0.1  # strength of the KL constraint (Eq. 3); the paper uses 0.1 (0.5 on TL;DR)
    loss_type: str = "sigmoid"  # sigmoid (Eq. 7) | ipo | hinge
    label_smoothing: float = 0.0  # cDPO: probability that a preference label is flipped, in [0, 0.5)
    reference_free: bool = False  # take log pi_ref = 0 (no reference model at all)
    average_log_prob: bool = False  # per-token mean log-prob instead of the paper's sum
    rpo_alpha: float = 0.0  # weight of an added NLL of the chosen response (per-token mean); 0 is plain DPO
    # tokens
    max_length: int = 512  # longest prompt + response, in tokens
    max_prompt_length: int = 256  # prompt tokens kept (from the end) when a pair is too long
    padding_side: str = "right"  # right | left; position ids make both give the same log-probs
    # optimisation (the paper: batch 64, RMSprop, lr 1e-6, 150 warmup steps)
    batch_size: int = 64  # global batch in pairs per optimizer step, whatever the world size and grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "rmsprop"  # rmsprop | adamw
    lr: float = 1e-6  # peak learning rate
    warmup_steps: int = 150  # linear warmup from lr/(warmup+1) to lr, then constant
    weight_decay: float = 0.0  # for adamw
    max_grad_norm: float = 10.0  # clip the global gradient norm to this (0: no clipping)
    epochs: int = 1  # passes over the training records (when max_steps is 0)
    max_steps: int = 0  # train for exactly this many optimizer steps, as many epochs as that takes (0: use epochs)
    # the run (of these, eval_every, save_every, num_threads, resume, overwrite and progress may change on resume)
    eval_every: int = 100  # evaluate every N optimizer steps, and at the end (0: only at the end)
    save_every: int = 0  # write the checkpoint every N steps and at the end (0: every 10% of the run)
    seed: int = 0  # data order and initialisation
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    precompute_ref: bool = False  # compute the reference log-probs once before training, then free the reference model
    reference_logps_file: str = ""  # where they are kept ("": <out>/reference_logps.pt); one reference, one file
    disable_dropout: bool = True  # dropout off in the policy, so policy == reference at step 0 exactly
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    resume: bool = False  # continue from <out>/checkpoint
    overwrite: bool = False  # start afresh in an <out> that holds a run, deleting what it left
    progress: bool = True  # tqdm progress bar on the master rank


BOOKKEEPING = {"out", "eval_every", "save_every", "max_steps", "epochs", "num_threads", "resume", "overwrite",
               "progress", "skip_invalid", "precompute_ref", "reference_logps_file"}  # what a resumed run may change


def validate_config(config, world_size=1):
    """Raise ValueError for a configuration that cannot train correctly (before anything is loaded)."""
    check_loss_arguments(config.beta, config.loss_type, config.label_smoothing)
    choices = {"optimizer": ("rmsprop", "adamw"), "dtype": ("auto", "fp32", "bf16"), "padding_side": ("left", "right")}
    for field, allowed in choices.items():
        if getattr(config, field) not in allowed:
            raise ValueError(f"unknown {field} {getattr(config, field)!r}; expected one of {allowed}")
    if config.rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {config.rpo_alpha}")
    if config.max_prompt_length >= config.max_length:
        raise ValueError(f"max_prompt_length ({config.max_prompt_length}) must be < max_length ({config.max_length})")
    if config.grad_accum < 1 or config.batch_size < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    if config.batch_size % (world_size * config.grad_accum):
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by world_size ({world_size}) "
                         f"x grad_accum ({config.grad_accum})")
    counts = (config.warmup_steps, config.max_steps, config.eval_size or 0)
    if config.lr <= 0 or config.epochs < 1 or min(counts) < 0:
        raise ValueError("lr must be > 0, warmup_steps >= 0, epochs >= 1, max_steps >= 0, eval_size >= 0")


# ---- models and ranks ----------------------------------------------------------------------------

def load_model_and_tokenizer(name, gguf_file=""):
    """A causal LM in fp32 and its tokenizer, from a hub name or folder (or a GGUF file in it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: dequantised, but still marked, and
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses a marked model
    return model, ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out by length: any id will do
    return tokenizer


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def bf16_autocast(device_type):
    """bf16 autocast for the forward passes; the weights stay fp32. Its cache of bf16 weight copies is off:
    autocast keeps a trainable weight's copy until the OUTERMOST autocast region exits, so a loop run inside
    a caller's autocast (an experiment's, say) would compute every step with the weights of its first."""
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)


def frozen_copy(model):
    """The reference model pi_ref: a copy of the initial policy, eval mode, no gradients, never DDP."""
    reference = copy.deepcopy(model).eval()
    return reference.requires_grad_(False)


def setup_distributed():
    """(rank, world_size, device). Under torchrun RANK/LOCAL_RANK/WORLD_SIZE are set: start a process
    group, nccl on GPU, gloo on CPU. Otherwise a single process."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def batch_order(num_records, batch_size, seed, epoch):
    """The records of each optimizer step in one epoch: a permutation seeded by (seed, epoch) cut
    into global batches (the last partial batch dropped), so a resumed run lands on the same batch."""
    perm = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, num_records - batch_size + 1, batch_size)]


def shard(indices, grad_accum, rank, world_size):
    """Split one global batch into grad_accum micro-batches, and each micro-batch across ranks."""
    micro = len(indices) // grad_accum
    per_rank = micro // world_size
    return [indices[a * micro + rank * per_rank: a * micro + (rank + 1) * per_rank] for a in range(grad_accum)]


def to_device(batch, device):
    return {key: tensor.to(device) for key, tensor in batch.items()}


# ---- the reference, the loss of a batch, evaluation ----------------------------------------------

@torch.no_grad()
def precompute_reference_logps(reference, examples, pad_token_id, device, batch_size, rank=0, world_size=1,
                               average=False, padding_side="right", autocast=contextlib.nullcontext):
    """log pi_ref(y_w|x), log pi_ref(y_l|x) of every example, computed once: (N,), (N,). A sequence
    shared by several pairs (several pairs per prompt, as in the paper's IMDb data) is scored once;
    each rank scores every world_size-th distinct sequence and a sum over ranks fills in the rest."""
    distinct = {}  # (input_ids, labels) -> its index among the distinct sequences
    positions = [[distinct.setdefault((tuple(ex[f"{k}_input_ids"]), tuple(ex[f"{k}_labels"])), len(distinct))
                  for k in ("chosen", "rejected")] for ex in examples]
    sequences = list(distinct)
    logps = torch.zeros(len(sequences), dtype=torch.float32, device=device)
    mine = list(range(rank, len(sequences), world_size))
    for start in range(0, len(mine), 2 * batch_size):  # as many sequences as a training forward
        indices = mine[start:start + 2 * batch_size]
        padded = [t.to(device) for t in pad_sequences([sequences[i] for i in indices], pad_token_id, padding_side)]
        with autocast():
            logps[indices] = batch_logps(reference, *padded, average=average, fast=True).float()  # as training
    all_reduce_sum(logps, world_size)
    positions = torch.tensor(positions, dtype=torch.long, device=device).reshape(-1, 2)  # (N, 2)
    return logps[positions[:, 0]], logps[positions[:, 1]]


def dpo_batch_loss(policy, reference, batch, config, reference_logps=None):
    """The loss and per-example statistics of one micro-batch.
    reference_logps: precomputed (chosen, rejected), each (B,); otherwise the reference runs live."""
    policy_chosen, policy_rejected = concatenated_forward(policy, batch, average=config.average_log_prob)
    if config.reference_free:
        reference_logps = (torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected))
    elif reference_logps is None:
        with torch.no_grad():
            reference_logps = concatenated_forward(reference, batch, average=config.average_log_prob)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, *reference_logps, beta=config.beta, loss_type=config.loss_type,
        label_smoothing=config.label_smoothing)
    stats = preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    loss = losses.mean()
    if config.rpo_alpha:  # -log pi(y_w|x) per token: keeps the chosen log-prob from falling as the margin grows
        n_tokens = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # (B,)
        chosen_mean = policy_chosen if config.average_log_prob else policy_chosen / n_tokens  # (B,)
        loss = loss - config.rpo_alpha * chosen_mean.mean()
    return loss, stats


def reduce_stats(stats_and_counts, world_size, device):
    """Example-weighted means of preference_metrics over micro-batches and ranks -> {key: float}."""
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=device)
    for stats, count in stats_and_counts:
        sums[:-1] += torch.stack([stats[k].double() for k in METRIC_KEYS]) * count
        sums[-1] += count
    all_reduce_sum(sums, world_size)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(METRIC_KEYS)}


@torch.no_grad()
def evaluate(run, policy):
    """Preference metrics of the policy on the held-out examples, averaged over all of them."""
    was_training = policy.training
    policy.eval()
    stats_and_counts = []
    my_examples = list(range(run.rank, len(run.eval_examples), run.world_size))
    for start in range(0, len(my_examples), run.micro_batch):
        indices = my_examples[start:start + run.micro_batch]
        batch = collate([run.eval_examples[i] for i in indices], run.pad_token_id, run.config.padding_side)
        reference_logps = None if run.eval_ref is None else (run.eval_ref[0][indices], run.eval_ref[1][indices])
        with run.autocast():
            _, stats = dpo_batch_loss(policy, run.reference, to_device(batch, run.device), run.config, reference_logps)
        stats_and_counts.append((stats, len(indices)))
    policy.train(was_training)
    return reduce_stats(stats_and_counts, run.world_size, run.device)


# ---- the output folder: checkpoints, the log, the run's settings ---------------------------------

RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "final", "final.old", "final.tmp",
             "reference_logps.pt", "reference_logps.pt.tmp", "training.png")  # what a run leaves in <out>


def check_out_folder(config, master):
    """The checkpoint to resume from, or None for a fresh run; --overwrite deletes what an old run left."""
    out, left = config.out, [name for name in RUN_FILES if os.path.exists(os.path.join(config.out, name))]
    if config.resume:
        if not os.path.exists(out):
            if master:
                print(f"--resume: {out} does not exist; starting a new run there")
            return None
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {out} (is --out right?). A run saves one every --save_every "
                             f"steps and at the end; start afresh with --overwrite")
        return checkpoint
    if left and not config.overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start afresh, "
                         f"or choose another --out")
    return None


def atomic_save_dir(path, write):
    """write(tmp) fills a temporary folder, which then replaces `path`. If anything fails midway, `path`
    (or, between the two renames, `path`.old) still holds the previous complete save, and no .tmp is left."""
    tmp, old = f"{path}.tmp", f"{path}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not save {path} ({type(e).__name__}: {e}); the previous save there is intact") from e
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out):
    """<out>/checkpoint if complete, else the <out>/checkpoint.old left by a save cut between renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.exists(os.path.join(out, name, "trainer_state.pt")):
            return os.path.join(out, name)
    return None


def save_checkpoint(out, policy, tokenizer, optimizer, scheduler, step, run_settings=None):
    def write(tmp):
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "run_settings.json"), "w") as f:
            json.dump(run_settings or {}, f, indent=1)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                               if torch.cuda.is_available() else {})}
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng}, os.path.join(tmp, "trainer_state.pt"))  # last: it marks the save complete
    atomic_save_dir(os.path.join(out, "checkpoint"), write)


def load_checkpoint(path, policy, optimizer, scheduler):
    """Restore weights, optimizer, schedule and RNG from `path`; returns the step it was saved at."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)  # data, not code
    policy.load_state_dict(type(policy).from_pretrained(path, dtype=torch.float32).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def saved_run_settings(checkpoint):
    """The settings saved with a checkpoint (TrainConfig's fields and the fingerprints), or {} if none."""
    path = os.path.join(checkpoint, "run_settings.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_resumed_settings(path, run_settings):
    """A resumed run must follow the saved one's trajectory: any change but bookkeeping is an error."""
    saved = saved_run_settings(path)
    differs = [key for key, value in run_settings.items() if key in saved and saved[key] != value]
    changed = [f"{key if key in FINGERPRINTS else '--' + key} {saved[key]!r} -> {run_settings[key]!r}"
               for key in differs if key not in BOOKKEEPING]
    if changed:
        raise ValueError(f"--resume with settings that differ from the run in {path}:\n  " + "\n  ".join(changed)
                         + "\nresume with the old values, or start afresh with --overwrite (or another --out)")


def rewrite_metrics_upto(path, step, eval_every):
    """Keep the metric rows an uninterrupted run would have logged by `step`, so that a resumed run appends
    and never repeats a step; a torn last line (a crash mid-write) is dropped, a bad line elsewhere is an error."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a JSON metrics row; fix or delete that line") from None
            print(f"{path}: dropped a torn last line (a crash while it was written)")
    periodic_eval = lambda row: row["step"] == 0 or (eval_every and row["step"] % eval_every == 0)  # noqa: E731
    keep = [row for row in rows if row["step"] < step or (row["step"] == step and (
        row["split"] == "train" or periodic_eval(row)))]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in keep)
    os.replace(path + ".tmp", path)


FINGERPRINTS = ("train_data", "eval_data", "initial_weights")  # saved with the settings, compared on resume


def fingerprint(examples):
    """A hash of tokenised examples: the data a run trains on, as the model sees it."""
    digest = hashlib.sha256()
    for ex in examples:
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            digest.update(array("q", ex[key]).tobytes() + b"|")
    return digest.hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model):
    """A hash of the model's starting weights (each tensor's sum, to 6 digits): a different model passed
    under the same name is a different run."""
    sums = ",".join(f"{name}:{p.double().sum().item():.6e}" for name, p in model.named_parameters())
    return hashlib.sha256(sums.encode()).hexdigest()[:16]


def reference_logps_cached(run, compute):
    """Precomputed reference log-probs, saved once in <out>; a restart reuses them when the data, model
    and tokenisation are the same (a full reference pass saved per restart), else recomputes, saying why."""
    path = run.config.reference_logps_file or os.path.join(run.config.out, "reference_logps.pt")
    key = json.dumps({k: run.settings[k] for k in ("model", "gguf_file", "average_log_prob", "dtype", *FINGERPRINTS)},
                     sort_keys=True)
    if os.path.exists(path):
        saved = torch.load(path, map_location=run.device, weights_only=True)
        if saved["key"] == key:
            return saved["train"], saved["eval"]
        if run.master:
            print(f"{path} was computed for other data, model or settings: recomputing")
    train_ref, eval_ref = compute(run.train_examples), compute(run.eval_examples)
    if run.master:
        torch.save({"key": key, "train": train_ref, "eval": eval_ref}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return train_ref, eval_ref


class StopSignals:
    """SIGTERM (a scheduler's preemption) or Ctrl-C: finish the step, save, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingStopped(Exception):
    """Raised by train() after a signal stopped it and its checkpoint was saved: --resume continues it."""


# ---- the loop ------------------------------------------------------------------------------------

def make_optimizer(params, config):
    params = list(params)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)  # one pass per tensor
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def warmup_schedule(optimizer, warmup_steps):
    """Linear warmup over warmup_steps, then constant (as the authors' code)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


def prepare_run(config, train_records, eval_records, model, tokenizer):
    """Everything the loop needs, checked before the slow parts: examples, models, optimizer, step."""
    rank, world_size, device = setup_distributed()
    run = SimpleNamespace(config=config, rank=rank, world_size=world_size, device=device, master=rank == 0)
    validate_config(config, world_size)
    resume_from = check_out_folder(config, run.master)
    if run.master and config.overwrite and not config.resume:
        for name in RUN_FILES:  # everything --resume would read, so two runs are never spliced
            path = os.path.join(config.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(config.out, exist_ok=True)
    if world_size > 1:
        torch.distributed.barrier()  # no rank reads <out> while the master clears it
    torch.manual_seed(config.seed)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, config.gguf_file)
    run.tokenizer, run.pad_token_id = tokenizer, ensure_pad_token(tokenizer).pad_token_id
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and config.max_length > context:
        raise ValueError(f"--max_length {config.max_length} is beyond the model's context of {context} tokens")
    run.train_examples, run.eval_examples = [tokenize_records(
        tokenizer, records or [], config.max_length, config.max_prompt_length, config.skip_invalid, run.master)[0]
        for records in (train_records, eval_records)]
    run.steps_per_epoch = len(run.train_examples) // config.batch_size
    if run.steps_per_epoch == 0:
        raise ValueError(f"{len(run.train_examples)} training records are fewer than --batch_size "
                         f"{config.batch_size}: lower --batch_size")
    run.total_steps = config.max_steps or run.steps_per_epoch * config.epochs  # max_steps wins over epochs
    run.save_every = config.save_every or max(1, math.ceil(run.total_steps / 10))
    run.micro_batch = config.batch_size // (world_size * config.grad_accum)  # pairs per rank per forward
    run.settings = {**dataclasses.asdict(config), "train_data": fingerprint(run.train_examples),
                    "eval_data": fingerprint(run.eval_examples), "initial_weights": weights_fingerprint(model)}
    if resume_from:
        check_resumed_settings(resume_from, run.settings)
    # the models: the policy trains, the reference is a frozen copy of where it started
    run.policy = model.to(device)
    if config.disable_dropout:
        disable_dropout(run.policy)
    run.policy.train()
    run.reference = None if config.reference_free else frozen_copy(run.policy)
    bf16 = config.dtype == "bf16" or (config.dtype == "auto" and device.type == "cuda")
    run.autocast = (lambda: bf16_autocast(device.type)) if bf16 else contextlib.nullcontext
    run.train_ref = run.eval_ref = None
    if config.precompute_ref and run.reference is not None:
        run.train_ref, run.eval_ref = reference_logps_cached(run, lambda examples: precompute_reference_logps(
            run.reference, examples, run.pad_token_id, device, run.micro_batch, rank, world_size,
            config.average_log_prob, config.padding_side, run.autocast))
        run.reference = None  # not needed again: free its memory
    run.params = [p for p in run.policy.parameters() if p.requires_grad]
    run.optimizer = make_optimizer(run.params, config)
    run.scheduler = warmup_schedule(run.optimizer, config.warmup_steps)
    run.step, run.order_epoch, run.logged, run.unwritten = 0, None, [], []
    if resume_from:
        run.step = load_checkpoint(resume_from, run.policy, run.optimizer, run.scheduler)
        if run.master:
            rewrite_metrics_upto(os.path.join(config.out, "metrics.jsonl"), run.step, config.eval_every)
            print(f"resumed from {resume_from} at step {run.step}")
    run.ddp_policy = run.policy if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        run.policy, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def train_step(run):
    """One optimizer step on the next global batch; returns its metrics row."""
    config, device = run.config, run.device
    epoch, position = divmod(run.step, run.steps_per_epoch)
    if epoch != run.order_epoch:  # the order depends only on (seed, epoch): resume lands on the same batch
        run.order_epoch, run.order = epoch, batch_order(len(run.train_examples), config.batch_size, config.seed, epoch)
    stats_and_counts = []
    for micro, indices in enumerate(shard(run.order[position], config.grad_accum, run.rank, run.world_size)):
        batch = to_device(collate([run.train_examples[i] for i in indices], run.pad_token_id, config.padding_side),
                          device)
        reference_logps = None if run.train_ref is None else (run.train_ref[0][indices], run.train_ref[1][indices])
        if run.world_size > 1:  # all-reduce gradients only on the last micro-batch; set before the forward
            run.ddp_policy.require_backward_grad_sync = micro == config.grad_accum - 1
        with run.autocast():
            loss, stats = dpo_batch_loss(run.ddp_policy, run.reference, batch, config, reference_logps)
        if all_reduce_sum(torch.tensor([float(not torch.isfinite(loss))], device=device), run.world_size).item():
            raise FloatingPointError(f"step {run.step + 1}: the loss is {loss.item()} on micro-batch {micro} (records "
                                     f"{indices[:8]}...); stopped before the update. The last checkpoint is intact.")
        (loss / config.grad_accum).backward()
        stats_and_counts.append((stats, len(indices)))
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"step": run.step, "split": "train", **reduce_stats(stats_and_counts, run.world_size, device),
            "lr": lr, "grad_norm": grad_norm.item()}


def log(run, row):
    """Keep the row and append it to metrics.jsonl; rows before the first step wait for it, so a run that
    fails before training leaves no log that would block the same command."""
    run.logged.append(row)
    run.unwritten.append(row)
    if run.master and run.step > 0:
        with open(os.path.join(run.config.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in run.unwritten)
        run.unwritten = []


def log_eval(run, progress):
    if run.eval_examples:
        row = {"step": run.step, "split": "eval", **evaluate(run, run.policy)}
        log(run, row)
        if run.master:
            (progress.write if progress else print)(f"eval step {run.step}: loss {row['loss']:.4f} accuracy "
                                                    f"{row['rewards/accuracy']:.3f} margin {row['rewards/margin']:.4f}")


def save(run):
    save_checkpoint(run.config.out, run.policy, run.tokenizer, run.optimizer, run.scheduler, run.step, run.settings)


def train(config, train_records, eval_records=None, model=None, tokenizer=None, callback=None):
    """Train a policy with DPO on {"prompt", "chosen", "rejected"} records; evaluate on eval_records.
    The model and tokenizer load from config.model unless given (only parameters with requires_grad
    train). callback(step, policy), if given, runs on the master rank before the first step and after
    every optimizer step. Writes <out>/metrics.jsonl, <out>/checkpoint/, <out>/final/; returns the rows
    logged. SIGTERM or Ctrl-C: the step finishes, the checkpoint is saved, TrainingStopped is raised."""
    run = prepare_run(config, train_records, eval_records, model, tokenizer)
    if run.step >= run.total_steps:
        if run.master:
            print(f"{config.out}: the run already finished at step {run.step}; nothing to do")
        return []
    progress = None
    if run.master and config.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=run.total_steps, initial=run.step, desc="dpo", dynamic_ncols=True)
    if run.step == 0 and config.eval_every:
        log_eval(run, progress)  # the starting point: loss ln 2, accuracy 1/2, margins 0
    if run.master and callback is not None and run.step == 0:
        callback(run.step, run.policy)
    with StopSignals() as signals:
        while run.step < run.total_steps:
            row = train_step(run)
            log(run, row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}")
            if config.eval_every and run.step % config.eval_every == 0 and run.step < run.total_steps:
                log_eval(run, progress)
            if run.master and run.step % run.save_every == 0 and run.step < run.total_steps:
                save(run)
            if run.master and callback is not None:
                callback(run.step, run.policy)
            stop = torch.tensor([float(signals.received is not None)], device=run.device)
            if all_reduce_sum(stop, run.world_size).item() and run.step < run.total_steps:  # all ranks stop together
                message = f"stopped at step {run.step}: checkpoint in {os.path.join(config.out, 'checkpoint')}"
                if run.master:
                    save(run)
                    print(f"{message}; continue with --resume")
                if progress is not None:
                    progress.close()
                raise TrainingStopped(message)
    log_eval(run, progress)
    if progress is not None:
        progress.close()
    if run.master:
        save(run)
        atomic_save_dir(os.path.join(config.out, "final"),
                        lambda tmp: (run.policy.save_pretrained(tmp), run.tokenizer.save_pretrained(tmp)))
    if run.world_size > 1:
        torch.distributed.barrier()
    return run.logged


# --------------------------------------------------------------------------------------------------
# Appendix: a faster log-softmax at the labels (what token_logps(fast=True) uses)
# --------------------------------------------------------------------------------------------------

def log_softmax_at(logits, labels, overwrite=False):
    """log softmax(logits)[labels], the same numbers as log_softmax + gather; (..., V), (...) -> (...)."""
    return _LogSoftmaxAt.apply(logits, labels, overwrite)


class _LogSoftmaxAt(torch.autograd.Function):
    """z_y - logsumexp(z) with a lean backward, (1[j = y] - softmax(z)_j) * grad. The vocabulary axis makes
    these the largest tensors of a small model's step: on a CPU both passes go over blocks of rows that
    stay in cache, and the backward writes one (N, V) buffer, or with overwrite the logits' own memory."""

    @staticmethod
    def forward(ctx, logits, labels, overwrite=False):  # (..., V), (...) valid indices
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
        lse = torch.cat([rows.logsumexp(-1) for rows in flat.split(_block_rows(flat))])  # (N,)
        ctx.save_for_backward(flat, labels, lse)
        ctx.shape, ctx.overwrite = logits.shape, overwrite
        return flat.gather(-1, labels.reshape(-1, 1)).squeeze(-1).sub_(lse).view(labels.shape)  # (...)

    @staticmethod
    def backward(ctx, grad):  # (...)
        flat, labels, lse = ctx.saved_tensors
        grad_flat = flat if ctx.overwrite else torch.empty_like(flat)  # (N, V)
        g, lse = grad.reshape(-1, 1), lse.unsqueeze(-1)  # (N, 1), (N, 1)
        n = _block_rows(flat)
        for start in range(0, flat.shape[0], n):  # -softmax(z) * g, block by block
            block = slice(start, start + n)
            torch.sub(flat[block], lse[block], out=grad_flat[block]).exp_().mul_(-g[block])
        grad_flat.scatter_add_(-1, labels.reshape(-1, 1), g)  # + 1[j = y] * g
        unused = (g == 0) & ~lse.isfinite()  # NaN logits of a fully masked padding row: no gradient
        if unused.any():
            grad_flat.masked_fill_(unused, 0.0)
        return grad_flat.view(ctx.shape), None, None


def _block_rows(flat):
    """Rows per block: ~4 MB on a CPU (the block stays in cache), everything at once on a GPU."""
    if flat.device.type != "cpu":
        return max(flat.shape[0], 1)
    return max(1, (1 << 22) // (flat.shape[-1] * flat.element_size()))
