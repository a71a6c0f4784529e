"""Direct Preference Optimization in one file.

Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", NeurIPS 2023 (arXiv:2305.18290). Equation numbers are the paper's.

Read top to bottom, as the paper goes:

    1. log pi(y|x)         sequence_logps          sum of response-token log-probs
    2. implicit reward     implicit_rewards        r(x, y) = beta log pi(y|x) / pi_ref(y|x)   (Eq. 5)
    3. the loss            dpo_loss                Eq. 7, plus cDPO, IPO, hinge, reference-free
    4. the gradient        gradient_weights        sigma(r_l - r_w), the weight of Section 4
    5. batching            tokenize_pair, collate, concatenated_forward, implicit_reward_scores
    6. training            TrainConfig, train      one run start to finish, DDP via torchrun
    appendix               a faster log-softmax    what the training path uses instead of 1's plain one

It imports only torch, transformers and the standard library: copied alone, train() still runs to <out>/final. What a
run needs because it can be interrupted, repeated or shared (checkpoints, exact resume, fingerprints, signals, a
reference log-prob cache) is minidpo/runs.py, which drives this same loop through RunHooks.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions that are not predictions: prompt tokens and padding

# ==== 1. log pi(y|x): the sum of the response tokens' log-probabilities =====================================

def token_logps(logits, labels, fast=False, overwrite=False):
    """log pi(y_t | x, y_<t) of every label token, and which positions are response tokens.

    logits: (B, T, V) from a causal LM on the whole prompt + response sequence.
    labels: (B, T) the same token ids, with IGNORE_INDEX on prompt and padding positions.
    fast: the same numbers through log_softmax_at (appendix), which saves memory and time on a CPU;
    overwrite (fast only): its backward may write into the logits' memory (for logits nothing else reads).
    Returns (token_logps, mask), each (B, T-1); token_logps is 0 where mask is False."""
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
    average: the per-token mean instead (an option: it changes the effective beta with length)."""
    logps, mask = token_logps(logits, labels, fast, overwrite)  # (B, T-1), (B, T-1)
    total = logps.sum(-1)  # (B,)
    return total / mask.sum(-1).clamp(min=1) if average else total

# ==== 2. The implicit reward (Eq. 5, without the beta log Z(x) that cancels in every comparison) ============

def implicit_rewards(policy_logps, reference_logps, beta):
    """r_hat(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)  (Eq. 5 up to beta log Z(x)). (B,) -> (B,)."""
    return beta * (policy_logps - reference_logps)

# ==== 3. The DPO loss (Eq. 7) and the variants people use beside it =========================================

LOSS_TYPES = ("sigmoid", "ipo", "hinge")

def check_loss_arguments(beta, loss_type, label_smoothing):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:  # at 0.5 the labels carry no information
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
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
    h_over_beta = chosen_logratios - rejected_logratios  # (B,) the margin in log-ratio units
    h = beta * h_over_beta  # (B,) = r_hat(y_w) - r_hat(y_l), the margin
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        losses = (h_over_beta - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - h)
    chosen_rewards = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta).detach()
    rejected_rewards = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta).detach()
    return losses, chosen_rewards, rejected_rewards

# ==== 4. The gradient (Section 4) ===========================================================================
# grad L = -beta E[ sigma(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w|x) - grad log pi(y_l|x)) ]

def gradient_weights(chosen_rewards, rejected_rewards):
    """sigma(r_hat(x, y_l) - r_hat(x, y_w)): how much each pair pushes the policy. (B,), (B,) -> (B,).

    Large when the implicit reward ranks the pair wrongly, near 0 when it already ranks it right by a wide margin: the
    weight that keeps DPO from degenerating like unlikelihood training."""
    return torch.sigmoid(rejected_rewards - chosen_rewards)

# ==== 5. Batching: tokenise a pair, pad a batch, one forward for chosen and rejected together ===============

def check_record(record):
    """Raise ValueError naming the field if a {"prompt", "chosen", "rejected"} record is unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, not a dict")
    for name in ("prompt", "chosen", "rejected"):
        value = record.get(name)
        if value is None:  # datasets fills a field absent from one JSON line with None
            raise ValueError(f"missing field {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"{name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"{name!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are identical")

def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=512, max_prompt_length=256, with_cuts=False):
    """Token ids and labels for one preference pair: a dict of lists chosen_input_ids, chosen_labels,
    rejected_input_ids, rejected_labels (each prompt + response, labels IGNORE_INDEX on the prompt).

    Prompt and response are tokenised separately and concatenated, so the labels decode exactly to the response and both
    responses share the prompt's tokens. EOS ends every response. If prompt + response is longer than max_length: keep
    the last max_prompt_length prompt tokens, then cut the response from the right, keeping its EOS. A response is never
    dropped entirely: ValueError. with_cuts: return (dict, {"prompt": bool, "response": bool}), what truncation cut."""
    check_record({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    prompt_ids, responses, cuts = tokenize_responses(tokenizer, prompt, (chosen, rejected), max_length,
                                                     max_prompt_length)
    example = {}
    for side, ids in zip(("chosen", "rejected"), responses):
        example[f"{side}_input_ids"] = prompt_ids + ids
        example[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + ids
    return (example, cuts) if with_cuts else example

def tokenize_responses(tokenizer, prompt, responses, max_length, max_prompt_length):
    """(prompt ids, [ids of each response, EOS-closed], cuts) within max_length, truncated as tokenize_pair says."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    # EOS closes every response (or the model never learns to stop), unless a chat template already closed it:
    # SmolLM2's turns end '<|im_end|>\n', and a second EOS would be taught.
    response_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + (
        [] if tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token) else [tokenizer.eos_token_id])
        for text in responses]
    cuts = {"prompt": len(prompt_ids) + max(map(len, response_ids)) > max_length}
    if cuts["prompt"]:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: it is what the response answers
    room = max_length - len(prompt_ids)  # response tokens that fit, EOS included
    if room < 2:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) leaves no room for a response within "
                         f"max_length={max_length}")
    cuts["response"] = any(len(ids) > room for ids in response_ids)
    response_ids = [ids if len(ids) <= room else ids[:room - 1] + [tokenizer.eos_token_id] for ids in response_ids]
    return prompt_ids, response_ids, cuts

def pad_sequences(sequences, pad_token_id, padding_side="right"):
    """[(input_ids, labels)] -> input_ids, attention_mask, labels, each (N, T). The attention mask comes from the
    lengths, never from ids == pad_token_id (the pad token is often EOS, also a real token)."""
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
    """tokenize_pair outputs -> chosen_/rejected_ input_ids, attention_mask, labels, each (B, T), one T for all, and
    kept_positions, kept_labels: response_positions of chosen and rejected stacked, made here on the host."""
    sequences = [(ex[f"{k}_input_ids"], ex[f"{k}_labels"]) for k in ("chosen", "rejected") for ex in examples]
    input_ids, attention_mask, labels = pad_sequences(sequences, pad_token_id, padding_side)  # (2B, T) each
    B, batch = len(examples), dict(zip(("kept_positions", "kept_labels"), response_positions(labels)))  # (2B, K + 1)
    for k, part in (("chosen", slice(0, B)), ("rejected", slice(B, 2 * B))):
        batch.update({f"{k}_input_ids": input_ids[part], f"{k}_attention_mask": attention_mask[part],
                      f"{k}_labels": labels[part]})
    return batch

def response_positions(labels):
    """Each row's positions whose logits predict a response token, and those tokens, laid out as sequence_logps reads
    them (the logits at positions[:, k] predict kept_labels[:, k + 1]). (N, T) -> (N, K + 1) each, K the most response
    tokens of a row; a shorter row padded with position 0 and IGNORE_INDEX. A read back on a GPU: collate makes them."""
    predicts = labels[:, 1:] != IGNORE_INDEX  # (N, T - 1): the logits at t predict the token at t + 1
    order = predicts.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[:, :int(predicts.sum(-1).max())]
    kept = predicts.gather(-1, order)  # (N, K): the predicting positions first, in order; False on padding
    positions, tokens = torch.where(kept, order, 0), torch.where(kept, labels.gather(-1, order + 1), IGNORE_INDEX)
    return F.pad(positions, (0, 1)), F.pad(tokens, (1, 0), value=IGNORE_INDEX)  # (N, K + 1) each

def position_ids_from_mask(attention_mask):
    """Positions count real tokens only: a left-padded sequence starts at 0 like an unpadded one. (B, T) -> (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)

def batch_logps(model, input_ids, attention_mask, labels, average=False, fast=False, kept=None):
    """log pi(y|x) of each padded sequence (N, T) -> (N,). lm_head is most of a small model's FLOPs: it runs only at
    the positions that predict a response token, each row's own (kept: response_positions(labels), from collate)."""
    positions, kept_labels = response_positions(labels) if kept is None else kept  # (N, K + 1) each
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(
        attention_mask), use_cache=False, logits_to_keep=positions).logits  # (N, K + 1, V)
    # With fast, these logits are ours alone: the backward may write their gradient into their memory.
    return sequence_logps(logits.float(), kept_labels, average=average, fast=fast, overwrite=fast)  # (N,)

def concatenated_forward(model, batch, average=False, fast=True):
    """log pi(y_w|x), log pi(y_l|x) from ONE forward over chosen and rejected stacked on the batch axis (one pass
    through the weights instead of two). Returns (chosen_logps, rejected_logps), each (B,)."""
    stacked = [torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])  # (2B, T)
               for key in ("input_ids", "attention_mask", "labels")]
    kept = (batch["kept_positions"], batch["kept_labels"]) if "kept_positions" in batch else None
    logps = batch_logps(model, *stacked, average=average, fast=fast, kept=kept)  # (2B,)
    B = batch["chosen_input_ids"].shape[0]
    return logps[:B], logps[B:]

@torch.no_grad()
def implicit_reward_scores(policy, reference, tokenizer, prompts, responses, beta=0.1, batch_size=8,
                           max_length=512, max_prompt_length=256, average=False):
    """Your language model is secretly a reward model: r_hat(x, y) of any responses. Returns (N,).

    prompts: one prompt for every response, or a list of N; responses: a list of N strings. Tokenised as tokenize_pair
    does, so on a training pair these are the loss's own rewards."""
    prompts = [prompts] * len(responses) if isinstance(prompts, str) else list(prompts)
    scores = []
    for start in range(0, len(responses), batch_size):
        sequences = []
        for prompt, response in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            prompt_ids, (ids,), _ = tokenize_responses(tokenizer, prompt, (response,), max_length, max_prompt_length)
            sequences.append((prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids))
        batch = [t.to(next(policy.parameters()).device) for t in pad_sequences(sequences, tokenizer.pad_token_id)]
        policy_logps = batch_logps(policy, *batch, average=average)  # (b,)
        reference_logps = batch_logps(reference, *batch, average=average)  # (b,)
        scores.append(implicit_rewards(policy_logps, reference_logps, beta))
    return torch.cat(scores) if scores else torch.zeros(0)

# ==== 6. Training: one run start to finish (TrainConfig, train), DDP via torchrun ===========================

@dataclass
class TrainConfig:
    # the model and the output folder
    model: str = ""  # policy and reference: a Hugging Face hub name or a local folder
    out: str = "out"  # output folder: metrics.jsonl, final/
    # the loss (Eq. 7 and its variants)
    beta: float = 0.1  # strength of the KL constraint (Eq. 3); the paper uses 0.1 (0.5 on TL;DR)
    loss_type: str = "sigmoid"  # sigmoid (Eq. 7) | ipo | hinge
    label_smoothing: float = 0.0  # cDPO: probability that a preference label is flipped, in [0, 0.5)
    reference_free: bool = False  # take log pi_ref = 0 (no reference model at all)
    average_log_prob: bool = False  # per-token mean log-prob instead of the paper's sum
    rpo_alpha: float = 0.0  # weight of an added NLL of the chosen response (per-token mean); 0 is plain DPO
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
    # the run
    eval_every: int = 100  # evaluate every N optimizer steps, and at the end (0: only at the end)
    log_every: int = 1  # read the metrics back to the host every N steps (between them a GPU step never waits)
    seed: int = 0  # data order and initialisation
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    disable_dropout: bool = True  # dropout off in the policy, so policy == reference at step 0 exactly
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    progress: bool = True  # tqdm progress bar on the master rank

def train(config, train_records, eval_records=None, model=None, tokenizer=None, callback=None, hooks=None):
    """Train a policy with DPO on {"prompt", "chosen", "rejected"} records; evaluate on eval_records. The model and
    tokenizer load from config.model unless given (only parameters with requires_grad train). callback(step, policy), if
    given, runs on the master rank before the first step and after every optimizer step. Writes <out>/metrics.jsonl and
    <out>/final/; returns the rows logged. hooks: what minidpo.runs adds (checkpoints, resume, signals); the default is
    a plain run."""
    run = prepare_run(config, train_records, eval_records or [], model, tokenizer, hooks or RunHooks())
    if run.step >= run.total_steps:  # a finished run, resumed: nothing to do
        return []
    from tqdm.auto import tqdm
    progress = tqdm(total=run.total_steps, initial=run.step, desc="dpo", dynamic_ncols=True,
                    disable=not (run.master and config.progress))
    if run.step == 0 and config.eval_every:
        log_eval(run, progress)  # the starting point: loss ln 2, accuracy 1/2, margins 0
    if run.master and callback is not None and run.step == 0:
        callback(run.step, run.policy)
    with progress, run.hooks.around_loop(run):
        while run.step < run.total_steps:
            run.unwritten.append(train_step(run))  # its values stay on the device until read_back
            read_back(run, every=config.log_every)
            progress.update(1)
            if config.eval_every and run.step % config.eval_every == 0 and run.step < run.total_steps:
                log_eval(run, progress)
            if run.master and callback is not None:
                callback(run.step, run.policy)
            run.hooks.after_step(run)
        log_eval(run, progress)
        read_back(run)
    if run.master:
        run.hooks.save_final(run)
    if run.world_size > 1:
        torch.distributed.barrier()
    return run.logged

class RunHooks:
    """The seam through which minidpo.runs adds what real runs need. These defaults are a plain run, hook by hook:"""

    def tokenize(self, run, records):  # -> tokenize_pair dicts; a bad record is an error naming it
        examples = []
        for i, record in enumerate(records):
            try:
                check_record(record)
                examples.append(tokenize_pair(run.tokenizer, record["prompt"], record["chosen"], record["rejected"],
                                              run.config.max_length, run.config.max_prompt_length))
            except ValueError as e:
                name = record.get("_source", f"record {i}") if isinstance(record, dict) else f"record {i}"
                raise ValueError(f"{name}: {e}") from None
        return examples
    def batch(self, run, examples):  # -> the examples collated, on the device (runs: prefix sharing packs them here)
        return to_device(collate(examples, run.tokenizer.pad_token_id, run.config.padding_side), run.device)
    forward = staticmethod(concatenated_forward)  # -> (chosen, rejected) log-probs of a batch (runs: prefix sharing)
    def start(self, run): return 0  # -> the step to start from (runs: resume from a checkpoint)
    def reference_logps(self, run): return None, None  # -> precomputed (chosen, rejected) of train, eval, or None
    def around_loop(self, run): return contextlib.nullcontext()  # the loop runs inside it (runs: signals)
    def after_step(self, run): pass  # on every rank after every step (runs: read_back, checkpoints, signals)
    def save_final(self, run):  # on the master rank after the last evaluation
        run.policy.save_pretrained(os.path.join(run.config.out, "final"))
        run.tokenizer.save_pretrained(os.path.join(run.config.out, "final"))

@dataclass
class Run:
    """What one run holds while it trains: built by prepare_run, advanced by train_step."""
    config: TrainConfig
    hooks: RunHooks
    rank: int = 0  # this process's rank under torchrun
    master: bool = True  # rank 0: it logs and saves
    world_size: int = 1
    device: torch.device = None
    tokenizer: object = None
    train_examples: list = field(default_factory=list)  # tokenize_pair dicts
    eval_examples: list = field(default_factory=list)
    steps_per_epoch: int = 0  # full global batches per pass over train_examples
    total_steps: int = 0  # optimizer steps in the whole run
    micro_batch: int = 0  # pairs per rank per forward
    policy: torch.nn.Module = None  # the model that trains (its DDP wrapper, when world_size > 1, is ddp_policy)
    ddp_policy: torch.nn.Module = None
    reference: torch.nn.Module = None  # pi_ref, frozen; None when reference-free or its log-probs are precomputed
    train_ref: tuple = None  # precomputed (chosen, rejected) reference log-probs of train_examples, (N,) each, or None
    eval_ref: tuple = None
    autocast: object = contextlib.nullcontext  # () -> the context the forward passes run in
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    step: int = 0  # optimizer steps done
    logged: list = field(default_factory=list)  # every metrics row of this process
    unwritten: list = field(default_factory=list)  # rows not yet read back and written (read_back)

def prepare_run(config, train_records, eval_records, model, tokenizer, hooks):
    """Everything the loop needs, checked before the slow parts: examples, models, optimizer, step."""
    rank, world_size, device = setup_distributed()
    validate_config(config, world_size)
    run = Run(config=config, hooks=hooks, rank=rank, master=rank == 0, world_size=world_size, device=device)
    torch.manual_seed(config.seed)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    if model is None:  # a hub name or a folder (a GGUF file: load it with minidpo.models and pass it in)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    run.tokenizer = ensure_pad_token(tokenizer)
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and config.max_length > context:
        raise ValueError(f"max_length {config.max_length} is beyond the model's context of {context} tokens")
    run.train_examples, run.eval_examples = hooks.tokenize(run, train_records), hooks.tokenize(run, eval_records)
    run.steps_per_epoch = len(run.train_examples) // config.batch_size
    if run.steps_per_epoch == 0:
        raise ValueError(f"{len(run.train_examples)} training records are fewer than batch_size {config.batch_size}")
    run.total_steps = config.max_steps or run.steps_per_epoch * config.epochs  # max_steps wins over epochs
    run.micro_batch = config.batch_size // (world_size * config.grad_accum)
    run.policy = model.to(device).train()  # the policy trains; the reference is a frozen copy of where it started
    if config.disable_dropout:
        disable_dropout(run.policy)
    run.reference = None if config.reference_free else frozen_copy(run.policy)
    if uses_bf16(config.dtype, device.type):
        run.autocast = lambda: bf16_autocast(device.type)
    run.optimizer, run.scheduler = make_optimizer(trainable(run.policy), config)
    run.step = hooks.start(run)
    if run.master and run.step == 0:  # a new run, a new log
        os.makedirs(config.out, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(config.out, "metrics.jsonl"))
    run.train_ref, run.eval_ref = hooks.reference_logps(run)
    run.ddp_policy = run.policy if world_size == 1 else torch.nn.parallel.DistributedDataParallel(
        run.policy, device_ids=[device.index] if device.type == "cuda" else None)
    return run

def validate_config(config, world_size=1):
    """Raise ValueError for a configuration that cannot train correctly (before anything is loaded)."""
    check_loss_arguments(config.beta, config.loss_type, config.label_smoothing)
    choices = {"optimizer": ("rmsprop", "adamw"), "dtype": ("auto", "fp32", "bf16"), "padding_side": ("left", "right")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ValueError(f"unknown {name} {getattr(config, name)!r}; expected one of {allowed}")
    if config.max_prompt_length >= config.max_length:
        raise ValueError(f"max_prompt_length ({config.max_prompt_length}) must be < max_length ({config.max_length})")
    if config.grad_accum < 1 or config.batch_size < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    if config.batch_size % (world_size * config.grad_accum):
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by world_size ({world_size}) "
                         f"x grad_accum ({config.grad_accum})")
    if config.lr <= 0 or config.epochs < 1 or min(config.warmup_steps, config.max_steps, config.rpo_alpha) < 0:
        raise ValueError("lr must be > 0, epochs >= 1, and warmup_steps, max_steps and rpo_alpha >= 0")

def train_step(run):
    """One optimizer step on the next global batch; returns its metrics row, its values still on the device."""
    config, device = run.config, run.device
    epoch, position = divmod(run.step, run.steps_per_epoch)  # the order depends only on (seed, epoch): resume
    global_batch = batch_order(len(run.train_examples), config.batch_size, config.seed, epoch)[position]  # lands on it
    stats_and_counts = []
    for micro, indices in enumerate(shard(global_batch, config.grad_accum, run.rank, run.world_size)):
        batch = run.hooks.batch(run, [run.train_examples[i] for i in indices])
        reference_logps = None if run.train_ref is None else (run.train_ref[0][indices], run.train_ref[1][indices])
        if run.world_size > 1:  # all-reduce gradients only on the last micro-batch; set before the forward
            run.ddp_policy.require_backward_grad_sync = micro == config.grad_accum - 1
        with run.autocast():
            loss, stats = dpo_batch_loss(run.ddp_policy, run.reference, batch, config, reference_logps,
                                         run.hooks.forward)
        (loss / config.grad_accum).backward()
        stats_and_counts.append((stats, len(indices)))
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(run.policy), max(config.max_grad_norm, 0) or math.inf)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    means = reduce_stats(stats_and_counts, run.world_size, device)  # (len(METRIC_KEYS),)
    return {"step": run.step, "split": "train", **dict(zip(METRIC_KEYS, means)), "lr": lr, "grad_norm": grad_norm}

def dpo_batch_loss(policy, reference, batch, config, reference_logps=None, forward=concatenated_forward):
    """The loss and per-example statistics of one micro-batch, its log-probs from forward (RunHooks.forward).
    reference_logps: precomputed (chosen, rejected), each (B,); otherwise the reference runs live."""
    policy_chosen, policy_rejected = forward(policy, batch, average=config.average_log_prob)
    if config.reference_free:
        reference_logps = (torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected))
    elif reference_logps is None:
        with torch.no_grad():
            reference_logps = forward(reference, batch, average=config.average_log_prob)
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

# ---- what is logged: metrics.jsonl ---------------------------------------------------------------

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected")

def preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps):
    """Per-batch means, 0-d tensors (all-reduced under DDP); accuracy counts a tie as 1/2, so 0.5 at step 0."""
    correct = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return {"loss": losses.detach().mean(), "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(), "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": correct.mean(), "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean()}

def reduce_stats(stats_and_counts, world_size, device):
    """Example-weighted means of preference_metrics over micro-batches and ranks, on the device: (len(METRIC_KEYS),)."""
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=device)
    for stats, count in stats_and_counts:
        sums[:-1] += torch.stack([stats[k].double() for k in METRIC_KEYS]) * count
        sums[-1] += count
    all_reduce_sum(sums, world_size)
    return sums[:-1] / sums[-1]

def read_back(run, every=1):
    """Every `every` steps: the rows' device values read back in ONE transfer, then logged (from step 1 on: a failed run
    leaves no log). A non-finite loss or grad norm stops the run here, after its update, before any later checkpoint."""
    if run.step == 0 or run.step % every or not run.unwritten:
        return
    rows, run.unwritten = run.unwritten, []
    on_device = [(row, k) for row in rows for k, v in row.items() if torch.is_tensor(v)]
    for (row, k), value in zip(on_device, torch.stack([row[k].double() for row, k in on_device]).tolist()):
        row[k] = value
    bad = next((i for i, row in enumerate(rows) if not math.isfinite(row["loss"] + row.get("grad_norm", 0))), len(rows))
    run.logged.extend(rows[:bad])
    if run.master:
        with open(os.path.join(run.config.out, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[:bad])
    if bad < len(rows):
        raise FloatingPointError(f"step {rows[bad]['step']} is not finite: {rows[bad]}")

@torch.no_grad()
def log_eval(run, progress):
    """Preference metrics of the policy on all the held-out examples, logged as an "eval" row."""
    if not run.eval_examples:
        return
    run.policy.eval()
    stats_and_counts = []
    my_examples = list(range(run.rank, len(run.eval_examples), run.world_size))
    for start in range(0, len(my_examples), run.micro_batch):
        indices = my_examples[start:start + run.micro_batch]
        batch = run.hooks.batch(run, [run.eval_examples[i] for i in indices])
        reference_logps = None if run.eval_ref is None else (run.eval_ref[0][indices], run.eval_ref[1][indices])
        with run.autocast():
            _, stats = dpo_batch_loss(run.policy, run.reference, batch, run.config, reference_logps, run.hooks.forward)
        stats_and_counts.append((stats, len(indices)))
    run.policy.train()
    means = reduce_stats(stats_and_counts, run.world_size, run.device)  # (len(METRIC_KEYS),)
    run.unwritten.append(row := {"step": run.step, "split": "eval", **dict(zip(METRIC_KEYS, means))})
    read_back(run)  # its values are floats from here on (at step 0 they wait for step 1, and format as tensors)
    if run.master:
        progress.write(f"eval step {run.step}: loss {row['loss']:.4f} margin {row['rewards/margin']:.4f}")

# ---- the optimizer, models, ranks and batches ------------------------------------------------------

def make_optimizer(params, config):
    """(optimizer, schedule): RMSprop or AdamW, linear warmup over warmup_steps, then constant (as the authors')."""
    params = list(params)
    if config.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=config.lr)
    else:  # fused: one pass per tensor
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    warmup = config.warmup_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))

def trainable(model): return [p for p in model.parameters() if p.requires_grad]

def ensure_pad_token(tokenizer):
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out by length: any id will do
    return tokenizer

def disable_dropout(model):
    for dropout in (module for module in model.modules() if isinstance(module, torch.nn.Dropout)):
        dropout.p = 0.0

def uses_bf16(dtype, device_type):
    """The one rule for the whole package: bf16 autocast for dtype "bf16", or "auto" on a GPU; fp32 otherwise."""
    return dtype == "bf16" or (dtype == "auto" and device_type == "cuda")

def bf16_autocast(device_type):
    """bf16 autocast for the forward passes; the weights stay fp32. Its cache of bf16 weight copies is off: autocast
    keeps a trainable weight's copy until the OUTERMOST autocast region exits, so a loop run inside a caller's autocast
    (an experiment's, say) would compute every step with the weights of its first."""
    return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)

def frozen_copy(model):
    """The reference model pi_ref: a copy of the initial policy, eval mode, no gradients, never DDP."""
    return copy.deepcopy(model).eval().requires_grad_(False)

def setup_distributed():
    """(rank, world_size, device); under torchrun (RANK, WORLD_SIZE set) a process group: nccl on GPU, gloo on CPU."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")  # and left at exit, its threads joined:
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
    return rank, world_size, device

def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor

def batch_order(num_records, batch_size, seed, epoch):
    """Each step's records in one epoch: a permutation seeded by (seed, epoch), cut into whole global batches."""
    perm = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [perm[i:i + batch_size] for i in range(0, num_records - batch_size + 1, batch_size)]

def shard(indices, grad_accum, rank, world_size):
    """Split one global batch into grad_accum micro-batches, and each micro-batch across ranks."""
    micro, per_rank = len(indices) // grad_accum, len(indices) // grad_accum // world_size  # pairs in each
    return [indices[a * micro + rank * per_rank: a * micro + (rank + 1) * per_rank] for a in range(grad_accum)]

def to_device(batch, device):  # to a GPU from pinned memory: the copy does not wait for the queued kernels
    cuda = device.type == "cuda"
    return {key: (value.pin_memory() if cuda else value).to(device, non_blocking=cuda) if torch.is_tensor(value)
            else value for key, value in batch.items()}

# ==== Appendix: a faster log-softmax at the labels (what token_logps(fast=True) uses) =======================

def log_softmax_at(logits, labels, overwrite=False):
    """log softmax(logits)[labels], the same numbers as log_softmax + gather; (..., V), (...) -> (...)."""
    return _LogSoftmaxAt.apply(logits, labels, overwrite)

class _LogSoftmaxAt(torch.autograd.Function):
    """z_y - logsumexp(z) with a lean backward, (1[j = y] - softmax(z)_j) * grad. The vocabulary axis makes these the
    largest tensors of a small model's step: on a CPU both passes go over blocks of rows that stay in cache, and the
    backward writes one (N, V) buffer, or with overwrite the logits' own memory."""

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
        if flat.device.type != "cpu" or unused.any():  # on a GPU unconditionally: no read back to the host
            grad_flat.masked_fill_(unused, 0.0)
        return grad_flat.view(ctx.shape), None, None

def _block_rows(flat):
    """Rows per block: ~4 MB on a CPU (the block stays in cache), everything at once on a GPU."""
    return max(1, (1 << 22) // (flat.shape[-1] * flat.element_size()) if flat.device.type == "cpu" else flat.shape[0])
