"""Direct Preference Optimization in one file.

Rafailov, Sharma, Mitchell, Ermon, Manning, Finn. "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", NeurIPS 2023 (arXiv:2305.18290). Equation numbers below are the
paper's.

Read top to bottom, as the paper goes:

    1. log pi(y|x)         sequence_logps          sum of response-token log-probs
    2. implicit reward     implicit_rewards        r(x, y) = beta log pi(y|x) / pi_ref(y|x)   (Eq. 5)
    3. the loss            dpo_loss                Eq. 7, plus cDPO, IPO, hinge, reference-free
    4. the gradient        gradient_weights        sigma(r_l - r_w), the weight of Section 4
    5. batching            tokenize_pair, collate, concatenated_forward
    6. training            TrainConfig, train      DDP via torchrun, checkpoint/resume

This file imports only torch, transformers and the standard library (tqdm comes with transformers),
so it can be copied alone into another project.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of positions that are not predictions: prompt tokens and padding


# --------------------------------------------------------------------------------------------------
# 1. log pi(y|x): the sum of the response tokens' log-probabilities
# --------------------------------------------------------------------------------------------------

class _LogSoftmaxAt(torch.autograd.Function):
    """log softmax(z)[y] = z_y - logsumexp(z) at given labels, with a lean backward.

    The gradient is 1[j = y] - softmax(z)_j times the incoming gradient. The vocabulary axis makes
    these the largest tensors of a small model's step, so on the CPU both passes go over blocks of
    rows that stay in cache, and the backward writes one (N, V) buffer (or, with overwrite, reuses
    the logits' own memory: only for logits nobody else holds). test_core checks it against autograd.
    """

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
            out = grad_flat[start:start + n]
            torch.sub(flat[start:start + n], lse[start:start + n], out=out).exp_().mul_(-g[start:start + n])
        grad_flat.scatter_add_(-1, labels.reshape(-1, 1), g)  # + 1[j = y] * g
        unused = (g == 0) & ~lse.isfinite()  # NaN logits of a fully masked padding row: no gradient
        if unused.any():
            grad_flat.masked_fill_(unused, 0.0)
        return grad_flat.view(ctx.shape), None, None


def _block_rows(flat):
    """Rows per block: ~4 MB on the CPU (the block stays in cache), everything at once on a GPU."""
    if flat.device.type != "cpu":
        return max(flat.shape[0], 1)
    return max(1, (1 << 22) // (flat.shape[-1] * flat.element_size()))


def token_logps(logits, labels, overwrite=False):
    """log pi(y_t | x, y_<t) of every label token, and which positions are response tokens.

    logits: (B, T, V) from a causal LM on the full prompt + response sequence.
    labels: (B, T) the same token ids, with IGNORE_INDEX on prompt and padding positions.
    overwrite: the backward may write the gradient into the logits' memory (saves a (B, T, V)
    buffer; only for logits that nothing else reads afterwards; autograd refuses a second backward).
    Returns (token_logps, mask), each (B, T-1); token_logps is 0 where mask is False.
    """
    # Off by one: the logits at position t predict the token at position t + 1.
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX  # (B, T-1) prompt tokens are conditioning, not predictions
    safe_labels = labels.masked_fill(~mask, 0)  # any valid index; these positions are dropped
    # log softmax(z)_y = z_y - logsumexp(z), without materialising a second (B, T, V) tensor. The
    # last position predicts nothing (label 0, dropped): slicing the small output, not the logits,
    # saves a copy of the logits in the backward.
    logps = _LogSoftmaxAt.apply(logits, F.pad(safe_labels, (0, 1)), overwrite)[:, :-1]  # (B, T-1)
    # where, not multiply: a fully masked padding row may hold NaN logits, and NaN * 0 = NaN.
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def sequence_logps(logits, labels, average=False, overwrite=False):
    """log pi(y|x) of each sequence in a batch: the sum over response tokens (the paper's choice).

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX on prompt and padding positions.
    average: the per-token mean instead of the sum (changes the effective beta with length).
    overwrite: see token_logps.
    Returns (B,).
    """
    logps, mask = token_logps(logits, labels, overwrite)  # (B, T-1), (B, T-1)
    total = logps.sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


# --------------------------------------------------------------------------------------------------
# 2. The implicit reward (Eq. 5, without the beta log Z(x) that cancels in every comparison)
# --------------------------------------------------------------------------------------------------

def implicit_rewards(policy_logps, reference_logps, beta):
    """r_hat(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)  (Eq. 5 up to beta log Z(x)). (B,) -> (B,)."""
    return beta * (policy_logps - reference_logps)


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
    """Eq. 7 and its variants. All inputs (B,) log-probs; returns (losses, chosen_rewards, rejected_rewards), each (B,).

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

    rewards/accuracy counts a tie as one half, so it is 0.5 at initialisation (policy == reference).
    """
    correct = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    return {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": correct.mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


# --------------------------------------------------------------------------------------------------
# 5. Batching: tokenise a pair, pad a batch, one forward for chosen and rejected together
# --------------------------------------------------------------------------------------------------

def _check_text(value, field):
    if not isinstance(value, str):
        raise ValueError(f"{field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{field!r} is empty")


def tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=512, max_prompt_length=256):
    """Token ids and labels for one preference pair. Returns a dict of Python lists:
    chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels (each prompt + response).

    Prompt and response are tokenised separately and concatenated, so the labels decode exactly to
    the response and the prompt's tokens are the same for both responses. EOS ends every response,
    or the model never learns to stop. Truncation: if prompt + response is longer than max_length,
    keep only the last max_prompt_length prompt tokens, then cut the response from the right,
    keeping its EOS. A response is never dropped entirely: that is a ValueError.
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    for field, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        _check_text(value, field)
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")

    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    responses = {}
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        responses[field] = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    longest = max(len(r) for r in responses.values())
    if len(prompt_ids) + longest > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: it is what the response answers
    room = max_length - len(prompt_ids)  # response tokens that fit, EOS included
    if room < 2:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) leaves no room for a response within "
                         f"max_length={max_length}")

    out = {}
    for field, ids in responses.items():
        if len(ids) > room:
            ids = ids[:room - 1] + [tokenizer.eos_token_id]
        out[f"{field}_input_ids"] = prompt_ids + ids
        out[f"{field}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + ids
    return out


def collate(examples, pad_token_id, padding_side="right"):
    """Pad a list of tokenize_pair outputs into tensors (B, T), one T for chosen and rejected alike:
    chosen_/rejected_ input_ids, attention_mask, labels. The attention mask comes from the lengths,
    never from ids == pad_token_id (the pad token is often EOS, which is also a real token)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(ex[f"{k}_input_ids"]) for ex in examples for k in ("chosen", "rejected"))
    batch = {}
    for k in ("chosen", "rejected"):
        ids, mask, labels = [], [], []
        for ex in examples:
            n = len(ex[f"{k}_input_ids"])
            pad = T - n
            def place(seq, fill):
                return seq + [fill] * pad if padding_side == "right" else [fill] * pad + seq
            ids.append(place(list(ex[f"{k}_input_ids"]), pad_token_id))
            mask.append(place([1] * n, 0))
            labels.append(place(list(ex[f"{k}_labels"]), IGNORE_INDEX))
        batch[f"{k}_input_ids"] = torch.tensor(ids, dtype=torch.long)  # (B, T)
        batch[f"{k}_attention_mask"] = torch.tensor(mask, dtype=torch.long)  # (B, T)
        batch[f"{k}_labels"] = torch.tensor(labels, dtype=torch.long)  # (B, T)
    return batch


def position_ids_from_mask(attention_mask):
    """Positions count real tokens only, so a left-padded sequence starts at 0 like an unpadded one. (B, T) -> (B, T)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def concatenated_forward(model, batch, average=False):
    """log pi(y_w|x) and log pi(y_l|x) from ONE forward over chosen and rejected stacked on the batch
    axis (one pass through the weights instead of two). Returns (chosen_logps, rejected_logps), each (B,)."""
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # (2B, T)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T)
    # The output projection (lm_head) is most of a small model's FLOPs: apply it only from the
    # position before the earliest response token on, since earlier logits predict prompt tokens.
    is_response = labels != IGNORE_INDEX  # (2B, T)
    start = max(int(is_response.to(torch.uint8).argmax(-1).min()) - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   logits_to_keep=labels.shape[1] - start).logits  # (2B, T - start, V)
    # These logits are ours alone: the backward may write their gradient into their memory.
    logps = sequence_logps(logits.float(), labels[:, start:], average=average, overwrite=True)  # (2B,)
    B = batch["chosen_input_ids"].shape[0]
    return logps[:B], logps[B:]


# --------------------------------------------------------------------------------------------------
# 6. Training: TrainConfig, train(), DDP via torchrun, checkpoint/resume
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # what to train on
    model: str = ""  # policy and reference: a Hugging Face hub name or a local folder
    gguf_file: str = ""  # a .gguf file inside `model` to load instead (dequantised to fp32)
    dataset: str = ""  # preference records: a JSON-lines file here; any load_preferences source via the CLI
    out: str = "out"  # output folder: metrics.jsonl, checkpoint/, final/
    eval_size: int = 64  # records held out (after a seeded shuffle) for evaluation; 0 for none
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
    # bookkeeping
    eval_every: int = 100  # evaluate every N optimizer steps, and at the end (0: only at the end)
    save_every: int = 0  # write the checkpoint every N steps, and at the end (0: only at the end)
    seed: int = 0  # data order and initialisation
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    precompute_ref: bool = False  # compute the reference log-probs once before training, then free the reference model
    disable_dropout: bool = True  # dropout off in the policy, so policy == reference at step 0 exactly
    num_threads: int = 0  # torch CPU threads (0: torch's default)
    resume: bool = False  # continue from <out>/checkpoint
    overwrite: bool = False  # allow starting afresh in an <out> that already holds a run
    progress: bool = True  # tqdm progress bar on the master rank


def validate_config(config, world_size=1):
    """Raise ValueError for a configuration that cannot train correctly."""
    c = config
    check_loss_arguments(c.beta, c.loss_type, c.label_smoothing)
    if c.rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {c.rpo_alpha}")
    if c.optimizer not in ("rmsprop", "adamw"):
        raise ValueError(f"unknown optimizer {c.optimizer!r}; expected rmsprop or adamw")
    if c.dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown dtype {c.dtype!r}; expected auto, fp32 or bf16")
    if c.padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {c.padding_side!r}")
    if c.max_prompt_length >= c.max_length:
        raise ValueError(f"max_prompt_length ({c.max_prompt_length}) must be < max_length ({c.max_length})")
    if c.grad_accum < 1 or c.batch_size < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    if c.batch_size % (world_size * c.grad_accum):
        raise ValueError(f"batch_size ({c.batch_size}) must be divisible by world_size ({world_size}) "
                         f"x grad_accum ({c.grad_accum})")
    if c.lr <= 0 or c.warmup_steps < 0 or c.epochs < 1 or c.max_steps < 0:
        raise ValueError("lr must be > 0, warmup_steps >= 0, epochs >= 1, max_steps >= 0")


# ---- records -------------------------------------------------------------------------------------

def check_record(record):
    """Raise ValueError naming the field if a {"prompt", "chosen", "rejected"} record is unusable."""
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, not a dict")
    for field in ("prompt", "chosen", "rejected"):
        if record.get(field) is None:  # datasets fills a field absent from one JSON line with None
            raise ValueError(f"missing field {field!r}")
        _check_text(record[field], field)
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are identical")


def read_jsonl(path):
    """Records from a JSON-lines file, one object per line (blank lines skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


def tokenize_records(tokenizer, records, max_length=512, max_prompt_length=256, skip_invalid=False):
    """tokenize_pair over a list of records. A bad record is an error naming its index and field,
    listing every bad record; with skip_invalid they are dropped and reported instead.
    Returns (examples, kept_indices)."""
    examples, kept, errors = [], [], []
    for i, record in enumerate(records):
        try:
            check_record(record)
            examples.append(tokenize_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                                          max_length=max_length, max_prompt_length=max_prompt_length))
            kept.append(i)
        except ValueError as e:
            errors.append(f"record {i}: {e}")
    if errors:
        listing = "\n  ".join(errors[:20]) + ("\n  ..." if len(errors) > 20 else "")
        if not skip_invalid:
            raise ValueError(f"{len(errors)} of {len(records)} records are invalid "
                             f"(pass skip_invalid to drop them):\n  {listing}")
        print(f"skipping {len(errors)} of {len(records)} invalid records:\n  {listing}")
    return examples, kept


# ---- models --------------------------------------------------------------------------------------

def load_model_and_tokenizer(name, gguf_file=""):
    """A causal LM in fp32 and its tokenizer, from a hub name or folder (or a GGUF file in it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantised to fp32 on load, but the model stays marked as quantised and
        # save_pretrained refuses it; the marker is all that is left of the quantisation.
        model.hf_quantizer.remove_quantization_config(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    return model, tokenizer


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def frozen_copy(model):
    """The reference model pi_ref: a copy of the initial policy, eval mode, no gradients, never DDP."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


# ---- distributed ---------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, device). Under torchrun, RANK/LOCAL_RANK/WORLD_SIZE are set and a process
    group is started: nccl on GPU, gloo on CPU. Otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def all_reduce_sum(tensor, world_size):
    if world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


# ---- the pieces of a step ------------------------------------------------------------------------

def batch_order(num_records, batch_size, seed, epoch):
    """The records of each optimizer step in one epoch: a seeded permutation cut into global batches
    (the last partial batch is dropped). Returns a list of index lists."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_records, generator=generator).tolist()
    return [perm[i:i + batch_size] for i in range(0, num_records - batch_size + 1, batch_size)]


def shard(indices, grad_accum, rank, world_size):
    """Split one global batch into grad_accum micro-batches, and each micro-batch across ranks."""
    micro = len(indices) // grad_accum
    per_rank = micro // world_size
    return [indices[a * micro + rank * per_rank: a * micro + (rank + 1) * per_rank] for a in range(grad_accum)]


def move(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def precompute_reference_logps(reference, examples, pad_token_id, device, batch_size, rank=0, world_size=1,
                               average=False, padding_side="right", autocast=contextlib.nullcontext):
    """log pi_ref(y_w|x), log pi_ref(y_l|x) of every example, computed once: (N,), (N,).
    A sequence shared by several pairs (several pairs per prompt, as in the paper's IMDb data) is
    scored once. Each rank scores every world_size-th distinct sequence; a sum over ranks fills in the rest."""
    distinct = {}  # (input_ids, labels) -> position among the distinct sequences
    where = []  # for each example, the positions of its chosen and rejected sequences
    for ex in examples:
        keys = [(tuple(ex[f"{k}_input_ids"]), tuple(ex[f"{k}_labels"])) for k in ("chosen", "rejected")]
        where.append([distinct.setdefault(key, len(distinct)) for key in keys])
    sequences = list(distinct)
    logps = torch.zeros(len(sequences), dtype=torch.float32, device=device)
    mine = list(range(rank, len(sequences), world_size))
    for start in range(0, len(mine), 2 * batch_size):
        # Distinct sequences, two by two, stand in for (chosen, rejected): the training forward.
        idx = mine[start:start + 2 * batch_size]
        firsts, seconds = idx[0::2], idx[1::2]
        if len(seconds) < len(firsts):
            seconds.append(firsts[-1])  # an odd count: the last sequence fills both places
        as_pairs = [{"chosen_input_ids": list(sequences[a][0]), "chosen_labels": list(sequences[a][1]),
                     "rejected_input_ids": list(sequences[b][0]), "rejected_labels": list(sequences[b][1])}
                    for a, b in zip(firsts, seconds)]
        batch = move(collate(as_pairs, pad_token_id, padding_side), device)
        with autocast():
            chosen, rejected = concatenated_forward(reference, batch, average=average)
        logps[seconds] = rejected.float()
        logps[firsts] = chosen.float()
    all_reduce_sum(logps, world_size)
    where = torch.tensor(where, dtype=torch.long, device=device).reshape(-1, 2)  # (N, 2)
    return logps[where[:, 0]], logps[where[:, 1]]


def dpo_batch_loss(policy, reference, batch, config, reference_logps=None):
    """The loss and per-example statistics of one micro-batch.
    reference_logps: precomputed (chosen, rejected), each (B,); otherwise the reference runs live."""
    policy_chosen, policy_rejected = concatenated_forward(policy, batch, average=config.average_log_prob)
    if config.reference_free:
        reference_chosen = reference_rejected = torch.zeros_like(policy_chosen)
    elif reference_logps is not None:
        reference_chosen, reference_rejected = reference_logps
    else:
        with torch.no_grad():
            reference_chosen, reference_rejected = concatenated_forward(reference, batch,
                                                                        average=config.average_log_prob)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected,
        beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        reference_free=config.reference_free)
    stats = preference_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    loss = losses.mean()
    if config.rpo_alpha:
        # -log pi(y_w|x) per token: keeps the chosen log-prob from falling while the margin grows.
        n_tokens = (batch["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(-1)  # (B,)
        chosen_mean = policy_chosen if config.average_log_prob else policy_chosen / n_tokens  # (B,)
        loss = loss - config.rpo_alpha * chosen_mean.mean()
    return loss, stats


METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
               "logps/chosen", "logps/rejected")


def reduce_stats(stats_and_counts, world_size, device):
    """Example-weighted means of preference_metrics over micro-batches and ranks -> {key: float}."""
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=device)
    for stats, count in stats_and_counts:
        sums[:-1] += torch.stack([stats[k].double() for k in METRIC_KEYS]) * count
        sums[-1] += count
    all_reduce_sum(sums, world_size)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(METRIC_KEYS)}


@torch.no_grad()
def evaluate(policy, reference, examples, config, pad_token_id, device, rank, world_size, micro_batch,
             reference_logps=None, autocast=contextlib.nullcontext):
    """Preference metrics of the policy on held-out examples, averaged over all of them."""
    was_training = policy.training
    policy.eval()
    stats_and_counts = []
    mine = list(range(rank, len(examples), world_size))
    for start in range(0, len(mine), micro_batch):
        idx = mine[start:start + micro_batch]
        batch = move(collate([examples[i] for i in idx], pad_token_id, config.padding_side), device)
        ref = None if reference_logps is None else (reference_logps[0][idx], reference_logps[1][idx])
        with autocast():
            _, stats = dpo_batch_loss(policy, reference, batch, config, ref)
        stats_and_counts.append((stats, len(idx)))
    policy.train(was_training)
    return reduce_stats(stats_and_counts, world_size, device)


# ---- checkpoints ---------------------------------------------------------------------------------

def atomic_save_dir(path, write):
    """write(tmp_dir) fills a temporary folder, which then replaces `path`. If anything fails midway,
    `path` (or, between the two renames, `path`.old) still holds the previous complete save."""
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    old = f"{path}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out):
    """<out>/checkpoint if complete, else the <out>/checkpoint.old left by a save cut between renames."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def save_checkpoint(out, policy, tokenizer, optimizer, scheduler, step):
    def write(tmp):
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng}, os.path.join(tmp, "trainer_state.pt"))
    atomic_save_dir(os.path.join(out, "checkpoint"), write)


def load_checkpoint(path, policy, optimizer, scheduler):
    """Restore weights, optimizer, schedule and RNG from `path`; returns the step it was saved at."""
    # weights_only: a checkpoint is data, never code to unpickle.
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    saved = type(policy).from_pretrained(path, dtype=torch.float32)
    policy.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def rewrite_metrics_upto(path, step):
    """Drop metric rows after `step` (written after the checkpoint a resumed run starts from), so
    that a resumed run appends and never repeats a step."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


# ---- the loop ------------------------------------------------------------------------------------

def make_optimizer(params, config):
    params = list(params)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr)
    # The fused kernel: the same update in one pass over each parameter instead of several.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def warmup_schedule(optimizer, warmup_steps):
    """Linear warmup over warmup_steps, then constant (as the authors' code)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


def split_records(records, eval_size, seed):
    """A seeded shuffle, then the last eval_size records are held out: (train, eval)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = len(records) - eval_size
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


def train(config, train_records=None, eval_records=None, model=None, tokenizer=None, callback=None):
    """Train a policy with DPO. Records are {"prompt", "chosen", "rejected"} dicts; if not given they
    are read from config.dataset (JSON lines) and config.eval_size of them are held out. The model
    and tokenizer are loaded from config.model unless given (only its parameters with requires_grad
    are trained). callback(step, policy), if given, runs on the master rank before the first step and
    after every optimizer step (e.g. to sample from the policy). Writes <out>/metrics.jsonl,
    <out>/checkpoint/ and <out>/final/. Returns the metric rows this call logged."""
    rank, world_size, device = setup_distributed()
    master = rank == 0
    validate_config(config, world_size)
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    out = config.out
    metrics_path = os.path.join(out, "metrics.jsonl")
    resume_from = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_from is None and master:
        print(f"--resume: no checkpoint in {out}, starting from step 0")
    if (not config.resume and not config.overwrite
            and (latest_checkpoint(out) or os.path.exists(metrics_path))):
        raise ValueError(f"{out} already holds a run: pass resume to continue it, overwrite to start "
                         f"afresh, or choose another out")
    if world_size > 1:
        torch.distributed.barrier()  # every rank has looked at <out> before the master writes to it

    # data
    if train_records is None:
        if not config.dataset:
            raise ValueError("no training data: set dataset (a JSON-lines file) or pass train_records")
        records = read_jsonl(config.dataset)
        train_records, held_out = split_records(records, config.eval_size, config.seed)
        eval_records = held_out if eval_records is None else eval_records
    if model is None:
        model, tokenizer = load_model_and_tokenizer(config.model, config.gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    tok = dict(max_length=config.max_length, max_prompt_length=config.max_prompt_length,
               skip_invalid=config.skip_invalid)
    train_examples, _ = tokenize_records(tokenizer, train_records, **tok)
    eval_examples, _ = tokenize_records(tokenizer, eval_records or [], **tok)
    steps_per_epoch = len(train_examples) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_examples)} training records are fewer than batch_size ({config.batch_size})")
    total_steps = config.max_steps or steps_per_epoch * config.epochs  # max_steps wins over epochs
    micro_batch = config.batch_size // (world_size * config.grad_accum)  # pairs per rank per forward

    # models: the policy trains, the reference is a frozen copy of where it started
    policy = model.to(device)
    if config.disable_dropout:
        disable_dropout(policy)
    policy.train()
    reference = None if config.reference_free else frozen_copy(policy)
    use_bf16 = config.dtype == "bf16" or (config.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    train_ref = eval_ref = None
    if config.precompute_ref and reference is not None:
        kw = dict(device=device, batch_size=micro_batch, rank=rank, world_size=world_size,
                  average=config.average_log_prob, padding_side=config.padding_side, autocast=autocast)
        train_ref = precompute_reference_logps(reference, train_examples, pad, **kw)
        eval_ref = precompute_reference_logps(reference, eval_examples, pad, **kw)
        reference = None  # the reference model is not needed again: free its memory

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = warmup_schedule(optimizer, config.warmup_steps)
    step = 0
    if resume_from:
        step = load_checkpoint(resume_from, policy, optimizer, scheduler)
        if master:
            rewrite_metrics_upto(metrics_path, step)
            print(f"resumed from {resume_from} at step {step}")
    elif master:
        os.makedirs(out, exist_ok=True)
        open(metrics_path, "w").close()  # a fresh run starts a fresh log
    if step >= total_steps:
        if master:
            print(f"{out}: the run already finished at step {step}; nothing to do")
        return []
    ddp_policy = policy
    if world_size > 1:
        ddp_policy = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None)

    logged = []

    def log(row):
        logged.append(row)
        if master:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def run_eval():
        if eval_examples:
            row = {"step": step, "split": "eval"}
            row.update(evaluate(policy, reference, eval_examples, config, pad, device, rank, world_size,
                                micro_batch, eval_ref, autocast))
            log(row)
            if master:
                say = progress.write if progress is not None else print
                say(f"eval step {step}: loss {row['loss']:.4f} accuracy {row['rewards/accuracy']:.3f} "
                    f"margin {row['rewards/margin']:.4f}")

    progress = None
    if master and config.progress:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc="dpo", dynamic_ncols=True)
    if step == 0 and config.eval_every:
        run_eval()  # the starting point: loss ln 2, accuracy 1/2, margins 0
    if master and callback is not None and step == 0:
        callback(step, policy)
    order_epoch, order = None, None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the data order depends only on (seed, epoch): resume lands on the same batch
            order_epoch, order = epoch, batch_order(len(train_examples), config.batch_size, config.seed, epoch)
        global_batch = order[position]
        stats_and_counts = []
        for a, idx in enumerate(shard(global_batch, config.grad_accum, rank, world_size)):
            batch = move(collate([train_examples[i] for i in idx], pad, config.padding_side), device)
            ref = None if train_ref is None else (train_ref[0][idx], train_ref[1][idx])
            if world_size > 1:  # all-reduce gradients only on the last micro-batch; set before the forward
                ddp_policy.require_backward_grad_sync = a == config.grad_accum - 1
            with autocast():
                loss, stats = dpo_batch_loss(ddp_policy, reference, batch, config, ref)
            bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device), world_size)
            if bad.item() > 0:  # every rank stops together, before any update or save
                raise FloatingPointError(
                    f"step {step + 1}: the loss is {loss.item()} on micro-batch {a} (records {idx[:8]}...); "
                    f"stopped before the update. The last checkpoint in {out} is intact.")
            (loss / config.grad_accum).backward()
            stats_and_counts.append((stats, len(idx)))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "split": "train"}
        row.update(reduce_stats(stats_and_counts, world_size, device))
        row.update(lr=lr, grad_norm=grad_norm.item())
        log(row)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracy']:.2f}",
                                 margin=f"{row['rewards/margin']:.3f}")
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            run_eval()
        if master and config.save_every and step % config.save_every == 0 and step < total_steps:
            save_checkpoint(out, policy, tokenizer, optimizer, scheduler, step)
        if master and callback is not None:
            callback(step, policy)
    run_eval()
    if progress is not None:
        progress.close()
    if master:
        save_checkpoint(out, policy, tokenizer, optimizer, scheduler, step)
        atomic_save_dir(os.path.join(out, "final"),
                        lambda tmp: (policy.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    if world_size > 1:
        torch.distributed.barrier()
    return logged
