"""Supervised fine-tuning: the reference policy of the paper's experiments, and Preferred-FT.

The loss is the negative log-likelihood of the response given the prompt, per-token mean by default
(summed with average=False); prompt tokens are labelled -100 and never predicted.
"""

from __future__ import annotations

import torch

from .dpo import IGNORE_INDEX, position_ids_from_mask, sequence_logps


def tokenize_sft(tokenizer, prompt, response, max_length=512):
    """input_ids and labels (lists) of prompt + response + EOS, the prompt masked. An empty prompt
    (plain language modelling, e.g. IMDb reviews) starts from EOS as GPT-2's document separator."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [eos]
    response_ids = (tokenizer(response, add_special_tokens=False)["input_ids"] + [eos])[:max(1, max_length - len(prompt_ids))]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def pad_sft(examples, pad_token_id):
    """Right-pad {"input_ids", "labels"} lists into tensors (ids, attention mask, labels), each (B, T)."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [pad_token_id] * (T - len(e["input_ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (T - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (T - len(e["labels"])) for e in examples])
    return ids, mask, labels


def sft_loss(model, ids, mask, labels, average=True):
    """Mean over the batch of -log pi(response | prompt), per token (average) or summed. Scalar."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return -sequence_logps(logits.float(), labels, average=average).mean()


def fit(policy, num_examples, step_loss, steps, batch_size=8, lr=1e-5, seed=0, callback=None, max_grad_norm=1.0):
    """The small loop every supervised baseline shares: seeded batches drawn without replacement,
    cycling over the data; AdamW on the parameters that require grad; clipping. step_loss(indices)
    returns the loss of a batch. callback(step, policy) runs before the first step and after each.
    Returns the per-step losses."""
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, losses = [], []
    if callback is not None:
        callback(0, policy)
    policy.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        loss = step_loss(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, policy)
    return losses


def sft_train(policy, tokenizer, records, steps, batch_size=8, lr=1e-5, max_length=512, average=True, seed=0,
              callback=None):
    """Fine-tune `policy` in place on {"prompt", "response"} records. Returns the per-step losses."""
    device = next(policy.parameters()).device
    examples = [tokenize_sft(tokenizer, r["prompt"], r["response"], max_length) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def step_loss(idx):
        ids, mask, labels = (t.to(device) for t in pad_sft([examples[i] for i in idx], pad))
        return sft_loss(policy, ids, mask, labels, average=average)

    return fit(policy, len(examples), step_loss, steps, batch_size, lr, seed, callback)
