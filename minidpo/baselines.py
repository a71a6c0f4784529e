"""The paper's baselines that train on the same preference pairs as DPO (Section 6).

Preferred-FT: supervised fine-tuning on the chosen responses only, -log pi(y_w|x).
Unlikelihood (Welleck et al. 2019): also push the rejected response's tokens down through
log(1 - pi): -log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | x, y_l,<t)).
Both take log-probs, like dpo_loss, so a tabular bandit and a language model use the same code.
"""

from __future__ import annotations

import torch


def preferred_ft_loss(policy_chosen_logps):
    """-log pi(y_w|x). (B,) -> (B,)."""
    return -policy_chosen_logps


def log1mexp(logp):
    """log(1 - exp(logp)) for logp <= 0, stable at both ends (Maechler 2012). Any shape."""
    logp = logp.clamp(max=-1e-7)  # pi = 1 exactly would be log 0
    return torch.where(logp > -0.6931, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def unlikelihood_loss(policy_chosen_logps, rejected_token_logps, rejected_mask=None, alpha=1.0):
    """-log pi(y_w|x) - alpha * sum_t log(1 - pi(y_l,t | ...)).

    policy_chosen_logps: (B,) summed log-probs of the chosen responses.
    rejected_token_logps: (B, T) per-token log-probs of the rejected responses (token_logps in dpo.py),
    or (B,) when each response is a single token (a bandit). rejected_mask: (B, T), True on response
    tokens. Returns (B,).
    """
    unlikely = log1mexp(rejected_token_logps)
    if rejected_mask is not None:
        unlikely = torch.where(rejected_mask, unlikely, torch.zeros_like(unlikely))
    if unlikely.dim() > 1:
        unlikely = unlikely.sum(-1)
    return -policy_chosen_logps - alpha * unlikely
