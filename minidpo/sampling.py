"""Batched sampling from a causal LM with a KV cache, and the exact sequence-level KL along samples."""

from __future__ import annotations

import torch

from .dpo import IGNORE_INDEX, ensure_pad_token, pad_sequences, position_ids_from_mask


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=32, temperature=1.0, batch_size=32, seed=0):
    """Sample one completion per prompt, in batches, with the KV cache (transformers' generate).

    temperature 0 is greedy decoding; otherwise pure sampling at that temperature (no top-k or top-p,
    so the samples come from the policy whose KL we measure). A completion ends at EOS (kept in its
    ids) or after max_new_tokens. Returns one dict per prompt: prompt, completion (text),
    prompt_ids, completion_ids."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = ensure_pad_token(tokenizer).pad_token_id
    eos = tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        ids, mask, _ = pad_sequences([(ids, ids) for ids in prompt_ids], pad, padding_side="left")
        torch.manual_seed(seed + start)  # each batch seeded: the same prompts give the same samples
        kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        # generate derives position ids from the attention mask, so left padding is handled
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, **kwargs)
        for row, p, p_ids in zip(generated[:, ids.shape[1]:].tolist(), chunk, prompt_ids):
            completion = row[:row.index(eos) + 1] if eos in row else row
            out.append({"prompt": p, "prompt_ids": p_ids, "completion_ids": completion,
                        "completion": tokenizer.decode(completion, skip_special_tokens=True)})
    model.train(was_training)
    return out


def completion_batch(samples, pad_id):
    """Right-padded prompt + completion tensors with labels on the completion only: (ids, mask, labels), each (B, T)."""
    from .sft import pad_sft
    return pad_sft([{"input_ids": s["prompt_ids"] + s["completion_ids"],
                     "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s["completion_ids"]} for s in samples], pad_id)


@torch.no_grad()
def sequence_kl(policy, reference, samples, pad_id, batch_size=16):
    """KL(pi || pi_ref) of each sample, as in the paper: the sum over the completion's tokens of the
    exact KL between the two next-token distributions, along the policy's own samples. Its mean over
    samples from pi is an unbiased estimate of the sequence-level KL. Both models are read in eval mode
    (dropout off): with dropout on, KL(pi || pi) would not be 0. Always computed in fp32, even inside a caller's bf16
    autocast: bf16 logits of a real model are too coarse for a KL of a few hundredths of a nat. Returns (N,)."""
    device = next(policy.parameters()).device
    modes = policy.training, reference.training
    policy.eval()
    reference.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        ids, mask, labels = (t.to(device) for t in completion_batch(samples[start:start + batch_size], pad_id))
        pos = position_ids_from_mask(mask)
        with torch.autocast(device.type, enabled=False):  # fp32 forwards: see the docstring
            logp, logq = (model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
                          .log_softmax(-1) for model in (policy, reference))  # (B, T-1, V) each
        per_token = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1) KL of each next-token distribution
        predicts_completion = labels[:, 1:] != IGNORE_INDEX
        out.append(torch.where(predicts_completion, per_token, torch.zeros_like(per_token)).sum(-1).cpu())
    policy.train(modes[0])
    reference.train(modes[1])
    return torch.cat(out)
