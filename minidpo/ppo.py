"""A small, readable PPO for language models — the RLHF baseline DPO is compared with.

Each iteration: sample completions from the policy; score them with a reward (the ground truth for
PPO-GT, a learned Bradley-Terry reward model for PPO); turn the score into per-token rewards with a
KL penalty to the reference, r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)) plus the score on the
last token (Ziegler et al. 2019); estimate advantages with GAE against a value head on the policy's
hidden states; then a few epochs of the clipped PPO objective. kl_coef adapts toward a target KL.

Measured like every other method: dropout off in the policy (as in DPO, the authors' code and TRL), so
the old log-probs, the KL penalty and the controller see the policy itself, and KL(pi || pi_ref) starts
at exactly 0. The scores are whitened per rollout batch (mean 0, std 1), so one kl_coef means the same
trade-off whatever the reward's scale (a classifier's probability, VADER, a reward model's logit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .dpo import disable_dropout, ensure_pad_token, position_ids_from_mask, token_logps
from .sampling import completion_batch, generate


@dataclass
class PPOConfig:
    iterations: int = 12  # rollout + update rounds
    rollouts: int = 32  # prompts sampled per iteration (one completion each)
    max_new_tokens: int = 24  # completion length
    temperature: float = 1.0  # sampling temperature of the rollouts
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch: int = 8  # sequences per gradient step
    lr: float = 1e-5  # AdamW learning rate (policy and value head)
    clip: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # value-function clip
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    init_kl_coef: float = 0.1  # initial KL penalty coefficient
    target_kl: float = 6.0  # adaptive KL target (sequence-level, nats); 0 keeps kl_coef fixed
    horizon: int | None = None  # adaptive KL horizon in episodes; None: 20 rollout batches, as in Ziegler et al.
    whiten_scores: bool = True  # normalise the scores per rollout batch (mean 0, std 1)
    max_grad_norm: float = 1.0
    seed: int = 0


# ---- the pieces, each checked against hand-computed values in the tests -----------------------------

def kl_penalised_rewards(scores, logps, ref_logps, mask, kl_coef):
    """Per-token rewards: -kl_coef (log pi - log pi_ref) on every completion token, plus the sequence's
    score on its last token. scores (B,); logps, ref_logps, mask (B, T). Returns (B, T)."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)  # (B,) index of the last completion token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over the completion tokens (mask) of each row.
    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}; V and A are 0 after the
    last completion token. Returns (advantages, returns), each (B, T), zero outside the mask."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Outside the completion, carry the values of the token after it unchanged.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def clipped_policy_loss(logps, old_logps, advantages, mask, clip=0.2):
    """PPO's clipped surrogate, -min(rho A, clip(rho, 1 - c, 1 + c) A), mean over completion tokens."""
    ratio = torch.exp(logps - old_logps)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (loss * mask).sum() / mask.sum()


def clipped_value_loss(values, old_values, returns, mask, clip=0.2):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), mean over completion tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum()


def whiten(x, mask):
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) / (var.sqrt() + 1e-8) * mask


ZIEGLER_HORIZON_BATCHES = 20  # Ziegler et al. 2019: a horizon of 10,000 episodes, rollout batches of 512


class AdaptiveKL:
    """kl_coef <- kl_coef (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)  (Ziegler et al. 2019),
    n the episodes since the last update. The horizon is counted in episodes, so it must match the
    rollout batch: 10,000 episodes with batches of 512 move kl_coef by up to 1 % per iteration, but
    with batches of 64 by 0.13 %, and 200 iterations could not reach a target at all."""

    def __init__(self, coef, target, horizon):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n):
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n / self.horizon
        return self.coef


# ---- the loop -------------------------------------------------------------------------------------

def forward(model, value_head, ids, mask, labels):
    """Token log-probs (B, T-1) and values (B, T-1), aligned with the tokens they predict."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                output_hidden_states=True, use_cache=False)
    logps, _ = token_logps(out.logits.float(), labels)
    values = value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)  # V at position t-1 for token t
    return logps, values


def ppo_train(policy, reference, tokenizer, prompts, score_fn, config=PPOConfig(), callback=None, log=None):
    """Train `policy` in place with PPO. score_fn(samples) -> list of floats, one per sample.
    callback(iteration, policy) runs before the first iteration and after each one. Returns the history."""
    torch.manual_seed(config.seed)  # the run is reproducible alone, whatever ran before it
    disable_dropout(policy)  # old log-probs, KL penalty and controller must see the policy, not dropout noise
    reference.eval()
    device = next(policy.parameters()).device
    pad = ensure_pad_token(tokenizer).pad_token_id
    hidden = policy.get_input_embeddings().embedding_dim
    value_head = torch.nn.Linear(hidden, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    kl_ctl = AdaptiveKL(config.init_kl_coef, config.target_kl,
                        config.horizon or ZIEGLER_HORIZON_BATCHES * config.rollouts)
    rng = random.Random(config.seed)
    history = []
    if callback is not None:
        callback(0, policy)
    for it in range(1, config.iterations + 1):
        batch_prompts = [rng.choice(prompts) for _ in range(config.rollouts)]
        samples = generate(policy, tokenizer, batch_prompts, config.max_new_tokens, config.temperature,
                           batch_size=config.rollouts, seed=config.seed * 1000 + it)
        scores = torch.tensor(score_fn(samples), dtype=torch.float32, device=device)
        normalised = (scores - scores.mean()) / (scores.std(correction=0) + 1e-8) if config.whiten_scores else scores
        ids, mask, labels = (t.to(device) for t in completion_batch(samples, pad))
        token_mask = (labels[:, 1:] != -100).float()
        with torch.no_grad():
            old_logps, old_values = forward(policy, value_head, ids, mask, labels)
            ref_logps, _ = token_logps(reference(input_ids=ids, attention_mask=mask,
                                                 position_ids=position_ids_from_mask(mask)).logits.float(), labels)
            rewards = kl_penalised_rewards(normalised, old_logps, ref_logps, token_mask, kl_ctl.coef)
            advantages, returns = gae(rewards, old_values * token_mask, token_mask, config.gamma, config.lam)
            advantages = whiten(advantages, token_mask)
        policy.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(config.seed + it))
            for start in range(0, len(samples), config.minibatch):
                mb = order[start:start + config.minibatch].to(device)
                logps, values = forward(policy, value_head, ids[mb], mask[mb], labels[mb])
                loss = (clipped_policy_loss(logps, old_logps[mb], advantages[mb], token_mask[mb], config.clip)
                        + config.vf_coef * clipped_value_loss(values, old_values[mb], returns[mb], token_mask[mb],
                                                              config.value_clip))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
        sampled_kl = ((old_logps - ref_logps) * token_mask).sum(-1).mean().item()
        kl_ctl.update(sampled_kl, config.rollouts)
        row = {"iteration": it, "score": scores.mean().item(), "kl": sampled_kl, "kl_coef": kl_ctl.coef}
        history.append(row)
        if log is not None:
            log(row)
        if callback is not None:
            callback(it, policy)
    return history
