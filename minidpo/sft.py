"""Supervised fine-tuning: the reference policy of the paper's experiments, and Preferred-FT.

The loss is the negative log-likelihood of the response given the prompt, per-token mean by default
(summed with average=False); prompt tokens are labelled -100 and never predicted. The loop is the
DPO loop's in miniature: gradient accumulation, bf16 autocast on a GPU, optional gradient
checkpointing, and DDP under torchrun:

    torchrun --nproc_per_node=8 -m minidpo.sft --model EleutherAI/pythia-2.8b \\
        --dataset CarperAI/openai_summarize_tldr --out runs/tldr-sft --steps 2000 --grad_accum 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

from .dpo import (
    IGNORE_INDEX,
    all_reduce_sum,
    batch_logps,
    bf16_autocast,
    ensure_pad_token,
    pad_sequences,
    setup_distributed,
    shard,
    uses_bf16,
)


def tokenize_sft(tokenizer, prompt, response, max_length=512, max_prompt_length=None, truncated=False):
    """input_ids and labels (lists) of prompt + response + EOS, the prompt masked. An empty prompt
    (plain language modelling, e.g. IMDb reviews) starts from EOS as GPT-2's document separator.
    truncated: the response was cut by a sampler's token budget, so it gets no EOS (it did not end).

    Truncation keeps the response, as tokenize_pair does: if prompt + response is longer than
    max_length, only the last max_prompt_length prompt tokens are kept (default: half of max_length;
    the end of the prompt is what the response answers), then the response is cut from the right
    (a cut response does not end in EOS: it did not end there)."""
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [eos]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + ([] if truncated else [eos])
    if len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: it is what the response answers
    response_ids = response_ids[:max_length - len(prompt_ids)]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def pad_sft(examples, pad_token_id):
    """Right-pad {"input_ids", "labels"} lists into tensors (ids, attention mask, labels), each (B, T)."""
    return pad_sequences([(e["input_ids"], e["labels"]) for e in examples], pad_token_id)


def sft_loss(model, ids, mask, labels, average=True):
    """Mean over the batch of -log pi(response | prompt), per token (average) or summed. Scalar.
    The lean log-prob path of DPO: logits only at the positions that predict response tokens, backward in place."""
    return -batch_logps(model, ids, mask, labels, average=average, fast=True).mean()


# ---- the loop ------------------------------------------------------------------------------------

def autocast_for(dtype, device):
    """A context factory: bf16 autocast for dtype "bf16", or "auto" on a GPU; fp32 otherwise."""
    if dtype not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, fp32 or bf16")
    if uses_bf16(dtype, device.type):
        return lambda: bf16_autocast(device.type)
    return contextlib.nullcontext


@contextlib.contextmanager
def checkpointing(model, enabled=True):
    """Gradient (activation) checkpointing inside the block: each transformer block keeps only its
    input and recomputes the rest in the backward, trading a forward's compute for memory."""
    if not enabled:
        yield model
        return
    model.activation_checkpointing_enable()
    try:
        yield model
    finally:
        model.activation_checkpointing_disable()
        if hasattr(model, "_require_grads_hook"):  # enabling made the embeddings' output require grad
            model.disable_input_require_grads()


def fit(policy, num_examples, step_loss, steps, batch_size=8, lr=1e-5, seed=0, callback=None, max_grad_norm=1.0,
        grad_accum=1, autocast=contextlib.nullcontext, ddp_policy=None, optimizer="adamw", warmup_steps=0):
    """The small loop every supervised baseline shares: seeded batches drawn without replacement,
    cycling over the data; AdamW (torch's defaults) or RMSprop (the paper's) on the parameters that require grad, a
    linear warmup over warmup_steps as dpo.make_optimizer's; clipping. step_loss(indices)
    returns the mean loss of those examples. Each batch is split into grad_accum micro-batches whose
    gradients add up (the memory of one micro-batch), and under torchrun each micro-batch across the
    ranks: step_loss must then run the DDP-wrapped `ddp_policy`. callback(step, policy) runs on the
    first rank before the first step and after each. Returns the per-step losses (of the whole batch)."""
    rank, world_size, _ = setup_distributed()  # torchrun's environment (main starts the process group)
    if batch_size % (grad_accum * world_size):
        raise ValueError(f"batch_size ({batch_size}) must be divisible by grad_accum ({grad_accum}) x world size "
                         f"({world_size})")
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    if optimizer not in ("adamw", "rmsprop"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected adamw or rmsprop")
    optimizer = torch.optim.AdamW(params, lr=lr) if optimizer == "adamw" else torch.optim.RMSprop(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    order, losses = [], []
    if callback is not None and rank == 0:
        callback(0, policy)
    policy.train()
    for step in range(1, steps + 1):
        while len(order) < batch_size:  # cycle over the data, a fresh permutation each pass
            order += torch.randperm(num_examples, generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch_loss = torch.zeros(1, device=device)
        for micro, part in enumerate(shard(idx, grad_accum, rank, world_size)):
            if ddp_policy is not None:  # all-reduce gradients only on the last micro-batch; set before the forward
                ddp_policy.require_backward_grad_sync = micro == grad_accum - 1
            with autocast():
                loss = step_loss(part)
            (loss / grad_accum).backward()
            batch_loss += loss.detach().float() / grad_accum
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_sum(batch_loss, world_size).item() / world_size)
        if callback is not None and rank == 0:
            callback(step, policy)
    return losses


def sft_train(policy, tokenizer, records, steps, batch_size=8, lr=1e-5, max_length=512, average=True, seed=0,
              callback=None, max_prompt_length=None, grad_accum=1, dtype="auto", gradient_checkpointing=False,
              optimizer="adamw", warmup_steps=0):
    """Fine-tune `policy` in place on {"prompt", "response"} records (with "truncated": true, a response cut by a
    sampler's budget, taught without EOS: tokenize_sft). Returns the per-step losses.
    batch_size sequences per optimizer step, in grad_accum micro-batches; dtype auto (bf16 autocast
    on a GPU, fp32 on a CPU) | fp32 | bf16; under torchrun, DDP over the ranks (the same global batch)."""
    device = next(policy.parameters()).device
    examples = [tokenize_sft(tokenizer, r["prompt"], r["response"], max_length, max_prompt_length,
                             r.get("truncated", False)) for r in records]
    pad = ensure_pad_token(tokenizer).pad_token_id
    _, world_size, _ = setup_distributed()
    ddp_policy = None
    if world_size > 1:
        ddp_policy = torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None)
    model = ddp_policy or policy

    def step_loss(idx):
        ids, mask, labels = (t.to(device) for t in pad_sft([examples[i] for i in idx], pad))
        return sft_loss(model, ids, mask, labels, average=average)

    with checkpointing(policy, gradient_checkpointing):
        return fit(policy, len(examples), step_loss, steps, batch_size, lr, seed, callback,
                   grad_accum=grad_accum, autocast=autocast_for(dtype, device), ddp_policy=ddp_policy,
                   optimizer=optimizer, warmup_steps=warmup_steps)


# ---- the command line (torchrun-ready) -----------------------------------------------------------

def load_sft_records(source, split="train", format="auto"):
    """{"prompt", "response"} records: TL;DR-style SFT data (prompt, label) as they are, or the chosen
    responses of any preference source (Preferred-FT). format: auto (by the columns) | sft | chosen."""
    from .data import load_preferences, load_tldr_sft
    if format == "auto":
        try:
            return list(load_tldr_sft(source, split))
        except (ValueError, KeyError):
            format = "chosen"
    if format == "sft":
        return list(load_tldr_sft(source, split))
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in load_preferences(source, split)]


def main(argv=None):
    from .models import load_model_and_tokenizer
    parser = argparse.ArgumentParser(prog="python -m minidpo.sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a hub name or local folder")
    parser.add_argument("--dataset", required=True, help="SFT data (prompt, label) or any preference source")
    parser.add_argument("--split", default="train")
    parser.add_argument("--format", choices=("auto", "sft", "chosen"), default="auto")
    parser.add_argument("--out", required=True, help="writes <out>/metrics.jsonl and <out>/final/")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per optimizer step, all ranks")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_prompt_length", type=int, default=384)
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rank, world_size, device = setup_distributed()
    torch.manual_seed(args.seed)
    records = load_sft_records(args.dataset, args.split, args.format)
    policy, tokenizer = load_model_and_tokenizer(args.model)
    losses = sft_train(policy.to(device), tokenizer, records, args.steps, args.batch_size, args.lr, args.max_length,
                       seed=args.seed, max_prompt_length=args.max_prompt_length, grad_accum=args.grad_accum,
                       dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps({"step": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses))
        policy.save_pretrained(os.path.join(args.out, "final"))
        tokenizer.save_pretrained(os.path.join(args.out, "final"))
        print(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}; model in {os.path.join(args.out, 'final')}")
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
