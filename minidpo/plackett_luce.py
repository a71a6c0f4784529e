"""DPO on rankings of K responses: the Plackett-Luce model of the paper's App. A.3.

Shown K responses y_1..y_K to a prompt x, a person ranks them, best first, as tau. The Plackett-Luce
model (Eq. 18) says they pick the best with probability softmax over the rewards, then the best of the
rest, and so on:

    p*(tau | y_1..y_K, x) = prod_{k=1}^K exp(r*(x, y_tau(k))) / sum_{j=k}^K exp(r*(x, y_tau(j))).

At K = 2 this is Bradley-Terry (Eq. 1). Put the reparameterised reward (Eq. 5) into every factor and
beta log Z(x), common to all K responses, cancels from each numerator and denominator as it does in
Eq. 6. Maximum likelihood over a policy pi_theta gives the K-wise DPO loss (App. A.3)

    L = -E log prod_{k=1}^K exp(r_hat(x, y_tau(k))) / sum_{j=k}^K exp(r_hat(x, y_tau(j))),

with r_hat(x, y) = beta log pi_theta(y|x) / pi_ref(y|x) the implicit reward; at K = 2 it is Eq. 7.
"""

from __future__ import annotations

from .dpo import implicit_rewards


def plackett_luce_loss(policy_logps, reference_logps, beta=0.1):
    """The DPO loss on rankings (App. A.3). policy_logps, reference_logps: (B, K) log pi(y|x) of K
    responses to each prompt, in ranked order, best first. Returns losses (B,)."""
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2:
        raise ValueError(f"expected (B, K) log-probs with K >= 2 ranked responses, got shape "
                         f"{tuple(policy_logps.shape)}")
    if policy_logps.shape != reference_logps.shape:
        raise ValueError(f"policy {tuple(policy_logps.shape)} and reference {tuple(reference_logps.shape)} "
                         f"log-probs differ in shape")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rewards = implicit_rewards(policy_logps, reference_logps, beta)  # (B, K) ranked best first
    # log sum_{j >= k} exp(r_hat_j): rank k is a softmax choice among the responses not yet ranked.
    remaining = rewards.flip(-1).logcumsumexp(-1).flip(-1)  # (B, K)
    return (remaining - rewards).sum(-1)  # the last factor is exp(r_K) / exp(r_K) = 1: it adds 0
