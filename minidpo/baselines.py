"""The paper's baselines that train on the same preference pairs as DPO (Section 6).

Preferred-FT: supervised fine-tuning on the chosen responses only, -log pi(y_w|x).
Unlikelihood, as the paper states it (§6, App. C): maximise log pi(y_w|x) and minimise log pi(y_l|x)
with a weight alpha, at the sequence level: -log pi(y_w|x) + alpha log pi(y_l|x). Nothing bounds the
second term, so the policy can always lower the loss by driving log pi(y_l|x) to -inf: the
degeneration the paper reports.
Unlikelihood, token level (Welleck et al. 2019), a bounded variant: push each rejected token down
through log(1 - pi): -log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | x, y_l,<t)).
All take log-probs, like dpo_loss, so a tabular bandit and a language model use the same code.
"""

from __future__ import annotations

import torch

from .dpo import disable_dropout

BASELINES = ("preferred_ft", "unlikelihood", "unlikelihood_token")


def preferred_ft_loss(policy_chosen_logps):
    """-log pi(y_w|x). (B,) -> (B,)."""
    return -policy_chosen_logps


def sequence_unlikelihood_loss(policy_chosen_logps, policy_rejected_logps, alpha=1.0):
    """The paper's Unlikelihood: -log pi(y_w|x) + alpha log pi(y_l|x), summed log-probs, (B,) -> (B,).
    Unbounded below, unlike the token-level form."""
    return -policy_chosen_logps + alpha * policy_rejected_logps


def log1mexp(logp):
    """log(1 - exp(logp)) for logp <= 0, stable at both ends (Maechler 2012). Any shape."""
    logp = logp.clamp(max=-1e-7)  # pi = 1 exactly would be log 0
    return torch.where(logp > -0.6931, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def unlikelihood_loss(policy_chosen_logps, rejected_token_logps, rejected_mask=None, alpha=1.0, average=False):
    """The token-level form (Welleck et al.): -log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | ...)), >= 0.

    policy_chosen_logps: (B,) log-probs of the chosen responses (summed, or per-token means).
    rejected_token_logps: (B, T) per-token log-probs of the rejected responses (token_logps in dpo.py),
    or (B,) when each response is a single token (a bandit). rejected_mask: (B, T), True on response
    tokens. average: the unlikelihood term as a mean over the rejected tokens instead of a sum.
    Returns (B,).
    """
    unlikely = log1mexp(rejected_token_logps)
    if rejected_mask is not None:
        unlikely = torch.where(rejected_mask, unlikely, torch.zeros_like(unlikely))
    if unlikely.dim() > 1:
        count = rejected_mask.sum(-1) if rejected_mask is not None else unlikely.shape[-1]
        unlikely = unlikely.sum(-1) / count if average else unlikely.sum(-1)
    return -policy_chosen_logps - alpha * unlikely


# ---- training a language model with them ----------------------------------------------------------

def train_baseline(method, policy, tokenizer, records, steps, batch_size=8, lr=1e-5, alpha=1.0, max_length=512,
                   max_prompt_length=256, seed=0, callback=None, optimizer="adamw", warmup_steps=0):
    """Train `policy` in place on preference records, dropout off (as DPO trains), with one of
        preferred_ft         -mean_t log pi(y_w,t | x, y_w,<t)                       (SFT on the chosen)
        unlikelihood         -log pi(y_w|x) + alpha log pi(y_l|x)                     (the paper's, summed)
        unlikelihood_token   -mean_t log pi(y_w,t | ...) - alpha mean_t log(1 - pi(y_l,t | ...))
    The token-level variant uses per-token means, so that alpha weighs its two terms independently of
    length. callback(step, policy) runs before the first step and after each. optimizer (adamw | rmsprop) and
    warmup_steps as sft.fit's. Returns the per-step losses."""
    from .data import tokenize_records
    from .dpo import collate, position_ids_from_mask, to_device, token_logps
    from .sft import fit, sft_train

    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINES}")
    torch.manual_seed(seed)
    disable_dropout(policy)  # as in DPO: the policy at step 0 is the reference exactly
    if method == "preferred_ft":
        chosen = [{"prompt": r["prompt"], "response": r["chosen"], "truncated": r.get("chosen_truncated", False)}
                  for r in records]
        return sft_train(policy, tokenizer, chosen,
                         steps, batch_size, lr, max_length, seed=seed, callback=callback, optimizer=optimizer,
                         warmup_steps=warmup_steps)
    device = next(policy.parameters()).device
    examples, _ = tokenize_records(tokenizer, records, max_length, max_prompt_length, verbose=False)  # as DPO's

    def step_loss(idx):
        batch = to_device(collate([examples[i] for i in idx], tokenizer.pad_token_id), device)
        per_kind = {}
        for kind in ("chosen", "rejected"):
            mask = batch[f"{kind}_attention_mask"]
            logits = policy(input_ids=batch[f"{kind}_input_ids"], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)).logits.float()
            per_kind[kind] = token_logps(logits, batch[f"{kind}_labels"])  # (B, T-1) and its mask
        (chosen, chosen_mask), (rejected, rejected_mask) = per_kind["chosen"], per_kind["rejected"]
        if method == "unlikelihood":
            return sequence_unlikelihood_loss(chosen.sum(-1), rejected.sum(-1), alpha).mean()
        chosen_mean = chosen.sum(-1) / chosen_mask.sum(-1)  # (B,) per-token mean log pi(y_w)
        return unlikelihood_loss(chosen_mean, rejected, rejected_mask, alpha=alpha, average=True).mean()

    return fit(policy, len(examples), step_loss, steps, batch_size, lr, seed, callback, optimizer=optimizer,
               warmup_steps=warmup_steps)


def best_of_n_kl(n):
    """KL(best-of-n || pi_ref) for a continuous reward: log n - (n - 1) / n (Stiennon et al. 2020)."""
    import math
    return math.log(n) - (n - 1) / n
