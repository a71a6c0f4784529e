"""A discrete contextual bandit where every quantity in the DPO derivation is exact.

P prompts x, K responses y each; the reference policy pi_ref(y|x) is a softmax over given logits, the
true reward r(x, y) is a table. Policies are (P, K) tables of log-probabilities. Nothing is sampled
from a language model, so the closed-form optimum (Eq. 4) can be computed exactly and compared with
what DPO learns from preference pairs. Used by notebook 01 and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .baselines import preferred_ft_loss, unlikelihood_loss
from .dpo import dpo_loss, implicit_rewards


@dataclass
class Bandit:
    ref_logps: torch.Tensor  # (P, K) log pi_ref(y|x)
    reward: torch.Tensor  # (P, K) r(x, y)

    @property
    def shape(self):
        return tuple(self.reward.shape)


def make_bandit(num_prompts=3, num_responses=24, seed=0, reward_scale=1.0, ref_scale=1.0):
    """A random bandit: pi_ref from N(0, ref_scale^2) logits, rewards N(0, reward_scale^2), seeded."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = ref_scale * torch.randn(num_prompts, num_responses, generator=g, dtype=torch.float64)
    reward = reward_scale * torch.randn(num_prompts, num_responses, generator=g, dtype=torch.float64)
    return Bandit(ref_logits.log_softmax(-1), reward)


# ---- the closed form (Eqs. 3-6) -----------------------------------------------------------------

def log_partition(ref_logps, reward, beta):
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x, y) / beta). (P, K) -> (P,)."""
    return torch.logsumexp(ref_logps + reward / beta, dim=-1)


def optimal_policy(ref_logps, reward, beta):
    """Eq. 4: log pi*(y|x) = log pi_ref(y|x) + r(x, y) / beta - log Z(x). (P, K) -> (P, K)."""
    return ref_logps + reward / beta - log_partition(ref_logps, reward, beta).unsqueeze(-1)


def kl(p_logps, q_logps):
    """KL(p || q) per prompt, exact. (P, K), (P, K) -> (P,)."""
    return (p_logps.exp() * (p_logps - q_logps)).sum(-1)


def expected_reward(policy_logps, reward):
    """E_{y ~ pi(.|x)} r(x, y) per prompt. (P, K) -> (P,)."""
    return (policy_logps.exp() * reward).sum(-1)


def rlhf_objective(policy_logps, ref_logps, reward, beta):
    """Eq. 3 per prompt: E_pi[r] - beta KL(pi || pi_ref). (P, K) -> (P,)."""
    return expected_reward(policy_logps, reward) - beta * kl(policy_logps, ref_logps)


# ---- preference data (Eq. 1) ----------------------------------------------------------------------

def preference_counts(bandit, num_pairs, seed=0, deterministic=False):
    """Sample num_pairs comparisons: x uniform, y1, y2 ~ pi_ref(.|x) independently (the paper samples
    completions from the reference/SFT model), the winner by Bradley-Terry (Eq. 1), or always the
    higher-reward response if deterministic. Pairs with y1 == y2 carry no preference and are dropped.
    Returns counts (P, K, K): counts[x, w, l] = times w was preferred to l."""
    g = torch.Generator().manual_seed(seed)
    P, K = bandit.shape
    x = torch.randint(0, P, (num_pairs,), generator=g)
    probs = bandit.ref_logps.exp()[x]  # (N, K)
    y1 = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    y2 = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    r1, r2 = bandit.reward[x, y1], bandit.reward[x, y2]
    if deterministic:
        first_wins = r1 > r2
    else:
        first_wins = torch.rand(num_pairs, generator=g, dtype=torch.float64) < torch.sigmoid(r1 - r2)
    w = torch.where(first_wins, y1, y2)
    l = torch.where(first_wins, y2, y1)
    keep = y1 != y2
    flat = (x * K + w) * K + l
    return torch.bincount(flat[keep], minlength=P * K * K).reshape(P, K, K).to(torch.float64)


def pairs(counts):
    """The distinct (x, y_w, y_l) of a count table and their weights (fractions of all pairs)."""
    x, w, l = counts.nonzero(as_tuple=True)
    weight = counts[x, w, l]
    return x, w, l, weight / weight.sum()


# ---- learning from preferences ---------------------------------------------------------------------

def reward_model_loss(reward, counts):
    """Eq. 2 averaged over the pairs: -E log sigma(r(x, y_w) - r(x, y_l)). reward (P, K) -> scalar."""
    x, w, l, weight = pairs(counts)
    return -(weight * F.logsigmoid(reward[x, w] - reward[x, l])).sum()


def fit_reward(counts, steps=300):
    """Maximum-likelihood tabular reward (Eq. 2) by L-BFGS, from zero. (P, K, K) -> (P, K)."""
    P, K, _ = counts.shape
    reward = torch.zeros(P, K, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([reward], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = reward_model_loss(reward, counts)
        loss.backward()
        return loss

    optimizer.step(closure)
    return reward.detach()


def policy_loss(method, policy_logps, ref_logps, counts, beta=0.1, alpha=1.0, **dpo_kwargs):
    """The mean loss over all pairs of a tabular policy, for method in
    dpo (any dpo_loss variant via dpo_kwargs) | preferred_ft | unlikelihood.
    Returns (loss, per-pair chosen rewards, per-pair rejected rewards, weights)."""
    x, w, l, weight = pairs(counts)
    chosen, rejected = policy_logps[x, w], policy_logps[x, l]  # (N,) log pi(y_w|x), log pi(y_l|x)
    if method == "dpo":
        losses, cr, rr = dpo_loss(chosen, rejected, ref_logps[x, w], ref_logps[x, l], beta=beta, **dpo_kwargs)
    else:
        losses = preferred_ft_loss(chosen) if method == "preferred_ft" else unlikelihood_loss(chosen, rejected, alpha=alpha)
        cr = implicit_rewards(chosen, ref_logps[x, w], beta).detach()
        rr = implicit_rewards(rejected, ref_logps[x, l], beta).detach()
    return (weight * losses).sum(), cr, rr, weight


def train_policy(method, bandit, counts, beta=0.1, steps=1500, lr=0.05, record_every=0, **loss_kwargs):
    """Train a tabular policy (logits initialised at pi_ref) with Adam on the full batch of pairs.
    Returns (final log-probs (P, K), history): history has one dict per record_every steps with the
    step, loss, policy log-probs and the per-pair chosen/rejected rewards."""
    logits = bandit.ref_logps.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    history = []
    for step in range(steps + 1):
        policy_logps = logits.log_softmax(-1)
        loss, cr, rr, weight = policy_loss(method, policy_logps, bandit.ref_logps, counts, beta=beta, **loss_kwargs)
        if record_every and step % record_every == 0:
            history.append({"step": step, "loss": loss.item(), "logps": policy_logps.detach().clone(),
                            "chosen_rewards": cr, "rejected_rewards": rr, "weight": weight})
        if step == steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits.detach().log_softmax(-1), history


def frontier_at_kl(ref_logps, reward, target_kl, iters=60):
    """The best mean reward any policy reaches at mean KL(pi || pi_ref) = target_kl: the optimum of
    Eq. 4 for the beta that has that KL, found by bisection on log beta (KL falls as beta grows).
    Returns (beta, reward)."""
    lo, hi = -12.0, 12.0  # log beta
    for _ in range(iters):
        mid = (lo + hi) / 2
        pi = optimal_policy(ref_logps, reward, float(torch.tensor(mid).exp()))
        if kl(pi, ref_logps).mean() > target_kl:
            lo = mid
        else:
            hi = mid
    beta = float(torch.tensor((lo + hi) / 2).exp())
    return beta, expected_reward(optimal_policy(ref_logps, reward, beta), reward).mean().item()
