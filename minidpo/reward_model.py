"""Bradley-Terry reward models (Eq. 2) learned from preference pairs, for PPO and Best-of-N.

RewardModel (the paper's, the default): r_phi(x, y) is a language model's transformer with a scalar
head reading the hidden state of the EOS that ends the response, trained on the pairs by minimising
Eq. 2, -E log sigma(r_phi(x, y_w) - r_phi(x, y_l)); the checkpoint with the best validation pair
accuracy is kept, and its accuracy on pairs of held-out prompts is reported. At laptop scale only the
top blocks train (train_layers).

LinearRewardModel (a cheap probe, used by the judges): w . h(x, y) + b on frozen features h, the
input embeddings and final hidden states of a language model averaged over the completion's tokens;
only the head is fitted, with the same loss.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dpo import IGNORE_INDEX, disable_dropout, ensure_pad_token, position_ids_from_mask
from .models import freeze_all_but_top
from .sampling import completion_batch
from .sft import checkpointing


@dataclass
class RewardModelConfig:
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 16  # pairs per step
    lr: float = 1e-5  # AdamW
    train_layers: int = 0  # train only the top N transformer blocks and the head (0: all)
    eval_every: int = 50  # steps between validation passes (one also ends each epoch)
    val_fraction: float = 0.1  # share of prompts whose pairs pick the checkpoint
    test_fraction: float = 0.1  # share of prompts whose pairs measure the kept checkpoint
    max_length: int = 512
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (large models)
    seed: int = 0


class RewardModel(torch.nn.Module):
    """r_phi(x, y): a copy of a causal LM's transformer (no LM head) and a scalar head on the hidden
    state of the last token, the EOS that ends every response: the one position that has read the
    whole prompt and response. Dropout off. The head starts at 0, so every pair starts at ln 2."""

    def __init__(self, lm, tokenizer, max_length=512):
        super().__init__()
        self.body = copy.deepcopy(lm.base_model)
        disable_dropout(self.body)
        self.head = torch.nn.Linear(lm.get_input_embeddings().embedding_dim, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.to(next(lm.parameters()).device)

    def encode(self, prompt, response):
        """Token ids of prompt + response + EOS (the reading of DPO's and SFT's examples). A response cut
        by max_length still ends in EOS, in place of its last kept token: the head reads only EOS positions. So
        does a response a sampler cut (a record's chosen_truncated): EOS is where the head reads, not a token the
        reward model teaches, and PPO and Best-of-N score their samples the same way."""
        from .sft import tokenize_sft
        example = tokenize_sft(self.tokenizer, prompt, response, self.max_length)
        eos = self.tokenizer.eos_token_id
        if example["input_ids"][-1] != eos:
            example["input_ids"][-1] = example["labels"][-1] = eos
        return example

    def encode_pair(self, record):
        """(chosen, rejected) encodings of a {"prompt", "chosen", "rejected"} record."""
        return self.encode(record["prompt"], record["chosen"]), self.encode(record["prompt"], record["rejected"])

    def forward(self, examples):
        """r_phi of encoded examples (a list of encode outputs) -> (B,)."""
        from .sft import pad_sft
        device = self.head.weight.device
        pad = ensure_pad_token(self.tokenizer).pad_token_id
        ids, mask, _ = (t.to(device) for t in pad_sft(examples, pad))  # right-padded
        hidden = self.body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           use_cache=False).last_hidden_state  # (B, T, d)
        last = mask.sum(-1) - 1  # (B,) the EOS closing each response
        return self.head(hidden[torch.arange(len(ids), device=device), last].float()).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts, responses, batch_size=16):
        """r_phi(x, y) of each (prompt, response) text pair: a list of floats."""
        examples = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return torch.cat([self(examples[i:i + batch_size]).cpu() for i in range(0, len(examples), batch_size)]).tolist()


def split_by_prompt(records, val_fraction, test_fraction, seed=0):
    """(train, val, test) records, every prompt's pairs in one split: pairs of one prompt share their
    completions, so a random split of pairs would leak them into validation."""
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    random.Random(seed).shuffle(prompts)
    n_val, n_test = (math.ceil(f * len(prompts)) if f > 0 else 0 for f in (val_fraction, test_fraction))
    val, test = set(prompts[:n_val]), set(prompts[n_val:n_val + n_test])
    held_out = val | test
    return ([r for r in records if r["prompt"] not in held_out], [r for r in records if r["prompt"] in val],
            [r for r in records if r["prompt"] in test])


def bradley_terry_loss(chosen_rewards, rejected_rewards):
    """Eq. 2: -log sigma(r(x, y_w) - r(x, y_l)). (B,) each -> (B,)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


@torch.no_grad()
def pair_metrics(model, pairs, batch_size=16):
    """(accuracy, mean Eq. 2 loss) of a reward model on encoded (chosen, rejected) pairs; ties count as wrong."""
    correct, loss = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        rewards = model([c for c, _ in chunk] + [r for _, r in chunk])
        chosen, rejected = rewards[:len(chunk)], rewards[len(chunk):]
        correct += (chosen > rejected).sum().item()
        loss += bradley_terry_loss(chosen, rejected).sum().item()
    return correct / max(len(pairs), 1), loss / max(len(pairs), 1)


def train_reward_model(lm, tokenizer, records, config=RewardModelConfig(), log=None):
    """Fit a RewardModel on {"prompt", "chosen", "rejected"} records with Eq. 2 and keep the checkpoint
    with the best validation accuracy (ties: the lower validation loss; no validation pairs: the last).
    Returns (model, report): the kept step, its validation accuracy, the held-out (test) pair accuracy,
    the split sizes and the validation history."""
    torch.manual_seed(config.seed)
    model = RewardModel(lm, tokenizer, config.max_length)
    freeze_all_but_top(model.body, config.train_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    splits = split_by_prompt(records, config.val_fraction, config.test_fraction, config.seed)
    train, val, test = ([model.encode_pair(r) for r in split] for split in splits)
    if not train:
        raise ValueError(f"no training pairs for the reward model among {len(records)} records")
    generator = torch.Generator().manual_seed(config.seed)
    history, best, step = [], {"step": 0, "val_accuracy": float("nan"), "val_loss": float("nan")}, 0

    def validate():
        if not val:
            best["step"] = step
            return
        accuracy, loss = pair_metrics(model, val)
        history.append({"step": step, "val_accuracy": accuracy, "val_loss": loss})
        if log is not None:
            log(history[-1])
        if "state" not in best or (accuracy, -loss) > (best["val_accuracy"], -best["val_loss"]):
            state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            best.update(step=step, val_accuracy=accuracy, val_loss=loss, state=state)

    validate()
    with checkpointing(model.body, config.gradient_checkpointing):
        model.body.train()  # dropout is off; transformers recomputes activations only in training mode
        for _ in range(config.epochs):
            order = torch.randperm(len(train), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                chunk = [train[i] for i in order[start:start + config.batch_size]]
                rewards = model([c for c, _ in chunk] + [r for _, r in chunk])
                loss = bradley_terry_loss(rewards[:len(chunk)], rewards[len(chunk):]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                if step % config.eval_every == 0:
                    validate()
            if step % config.eval_every:
                validate()
    if "state" in best:
        model.load_state_dict(best.pop("state"), strict=False)
    model.requires_grad_(False).eval()
    test_accuracy = pair_metrics(model, test)[0] if test else float("nan")
    return model, {**best, "steps": step, "test_accuracy": test_accuracy,
                   "pairs": {"train": len(train), "val": len(val), "test": len(test)}, "history": history}


@torch.no_grad()
def completion_features(model, samples, pad_id, batch_size=16):
    """h(x, y): the token embeddings and the final-layer hidden states over the completion's tokens,
    each averaged: a bag of words beside the model's contextual reading. (N, 2d)."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(samples), batch_size):
        ids, mask, labels = (t.to(device) for t in completion_batch(samples[start:start + batch_size], pad_id))
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True)
        completion = (labels != IGNORE_INDEX).unsqueeze(-1).float()  # (B, T, 1)
        hidden = torch.cat([out.hidden_states[0], out.hidden_states[-1]], -1).float()  # (B, T, 2d)
        feats.append(((hidden * completion).sum(1) / completion.sum(1).clamp(min=1)).cpu())
    return torch.cat(feats)


class LinearRewardModel:
    """w . h + b over frozen features, fitted on pairs with Eq. 2."""

    def __init__(self, dim):
        self.w = torch.zeros(dim)
        self.b = torch.zeros(())
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)

    def __call__(self, features):  # (N, d) -> (N,)
        return ((features - self.mean) / self.std) @ self.w + self.b

    def fit(self, chosen_features, rejected_features, l2=0.1, steps=200):
        """Maximum likelihood of the preferences (Eq. 2) + l2 |w|^2, by L-BFGS. Features (N, d) each."""
        both = torch.cat([chosen_features, rejected_features])
        self.mean, self.std = both.mean(0), both.std(0).clamp(min=1e-6)
        w = torch.zeros_like(self.w, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
        zc, zr = (chosen_features - self.mean) / self.std, (rejected_features - self.mean) / self.std

        def closure():
            optimizer.zero_grad()
            loss = -F.logsigmoid((zc - zr) @ w).mean() + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.w = w.detach()
        return self

    def accuracy(self, chosen_features, rejected_features):
        return (self(chosen_features) > self(rejected_features)).float().mean().item()
