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

from .baselines import preferred_ft_loss, sequence_unlikelihood_loss, unlikelihood_loss
from .dpo import dpo_loss, gradient_weights, implicit_rewards
from .plackett_luce import plackett_luce_loss


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


def project_reward(ref_logps, reward, beta):
    """Theorem 1's projection (Sec. 5.1): r(x, y) - beta log Z(x), the one reward of r's class (rewards that
    differ by a function of x) that is a reparameterisation beta log pi(y|x) / pi_ref(y|x). (P, K) -> (P, K)."""
    return reward - beta * log_partition(ref_logps, reward, beta).unsqueeze(-1)


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
    Returns counts (P, K, K): counts[x, w, l] = times y_w = w was preferred to y_l = l."""
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
    yw = torch.where(first_wins, y1, y2)
    yl = torch.where(first_wins, y2, y1)
    keep = y1 != y2
    flat = (x * K + yw) * K + yl
    return torch.bincount(flat[keep], minlength=P * K * K).reshape(P, K, K).to(torch.float64)


def preference_distribution(bandit):
    """The population preference_counts samples from: the exact fraction of all pairs that are
    (x, y_w, y_l), pi_ref(y_w|x) pi_ref(y_l|x) sigma(r(x, y_w) - r(x, y_l)) normalised, 0 where y_w == y_l.
    (P, K, K), sums to 1; usable wherever a count table is."""
    ref = bandit.ref_logps.exp()
    wins = torch.sigmoid(bandit.reward.unsqueeze(-1) - bandit.reward.unsqueeze(-2))  # (P, K, K) Eq. 1
    table = ref.unsqueeze(-1) * ref.unsqueeze(-2) * wins
    table.diagonal(dim1=1, dim2=2).zero_()
    return table / table.sum()


@dataclass
class Rankings:
    """Distinct rankings of responses and how often each occurred (App. A.3's data)."""
    x: torch.Tensor  # (N,) prompt
    ranked: torch.Tensor  # (N, size) response ids, best first
    weight: torch.Tensor  # (N,) fraction of all rankings


def sample_rankings(bandit, num_rankings, size=4, seed=0):
    """num_rankings rankings: x uniform, `size` responses drawn independently from pi_ref(.|x) (as the IMDb
    data draws 4 samples per prefix), ordered by Plackett-Luce (Eq. 18) on the true reward. Sorting
    r + Gumbel noise samples the Plackett-Luce order exactly. Returns Rankings of the distinct ones."""
    g = torch.Generator().manual_seed(seed)
    P, K = bandit.shape
    x = torch.randint(0, P, (num_rankings,), generator=g)
    drawn = torch.multinomial(bandit.ref_logps.exp()[x], size, replacement=True, generator=g)  # (N, size)
    uniform = torch.rand(num_rankings, size, generator=g, dtype=torch.float64)
    gumbel = -(-uniform.clamp(min=1e-300).log()).log()
    order = (bandit.reward[x.unsqueeze(-1), drawn] + gumbel).argsort(-1, descending=True)
    ranked = drawn.gather(-1, order)  # (N, size) best first
    key = x
    for k in range(size):
        key = key * K + ranked[:, k]
    distinct, count = key.unique(return_counts=True)
    columns = []
    for _ in range(size):
        distinct, column = distinct.div(K, rounding_mode="floor"), distinct % K
        columns.append(column)
    return Rankings(distinct, torch.stack(columns[::-1], -1), count.to(torch.float64) / num_rankings)


def pairs(counts):
    """The distinct (x, y_w, y_l) of a count table and their weights (fractions of all pairs)."""
    x, yw, yl = counts.nonzero(as_tuple=True)
    weight = counts[x, yw, yl]
    return x, yw, yl, weight / weight.sum()


# ---- learning from preferences ---------------------------------------------------------------------

def reward_model_loss(reward, counts):
    """Eq. 2 averaged over the pairs: -E log sigma(r(x, y_w) - r(x, y_l)). reward (P, K) -> scalar."""
    x, yw, yl, weight = pairs(counts)
    return -(weight * F.logsigmoid(reward[x, yw] - reward[x, yl])).sum()


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
    dpo (any dpo_loss variant via dpo_kwargs) | unweighted | preferred_ft | unlikelihood | unlikelihood_token
    | plackett_luce, named as in minidpo.baselines.
    unweighted: -(r_hat(y_w) - r_hat(y_l)), whose gradient is DPO's with the weight sigma(r_hat_l - r_hat_w)
    replaced by 1. unlikelihood: the paper's, -log pi(y_w|x) + alpha log pi(y_l|x), unbounded below;
    unlikelihood_token: the bounded form of Welleck et al., -log pi(y_w|x) - alpha log(1 - pi(y_l|x)) (a bandit's
    response is one token). plackett_luce takes Rankings for counts; its "chosen" is the best, "rejected" the worst.
    Returns (loss, per-pair chosen rewards, per-pair rejected rewards, weights)."""
    if method == "plackett_luce":
        return ranking_loss(policy_logps, ref_logps, counts, beta)
    x, yw, yl, weight = pairs(counts)
    chosen, rejected = policy_logps[x, yw], policy_logps[x, yl]  # (N,) log pi(y_w|x), log pi(y_l|x)
    if method == "dpo":
        losses, cr, rr = dpo_loss(chosen, rejected, ref_logps[x, yw], ref_logps[x, yl], beta=beta, **dpo_kwargs)
    elif method == "unweighted":
        cr, rr = implicit_rewards(chosen, ref_logps[x, yw], beta), implicit_rewards(rejected, ref_logps[x, yl], beta)
        losses, cr, rr = -(cr - rr), cr.detach(), rr.detach()
    elif method in ("preferred_ft", "unlikelihood", "unlikelihood_token"):
        if method == "preferred_ft":
            losses = preferred_ft_loss(chosen)
        elif method == "unlikelihood":
            losses = sequence_unlikelihood_loss(chosen, rejected, alpha=alpha)
        else:
            losses = unlikelihood_loss(chosen, rejected, alpha=alpha)
        cr = implicit_rewards(chosen, ref_logps[x, yw], beta).detach()
        rr = implicit_rewards(rejected, ref_logps[x, yl], beta).detach()
    else:
        raise ValueError(f"unknown method {method!r}")
    return (weight * losses).sum(), cr, rr, weight


def ranking_loss(policy_logps, ref_logps, rankings, beta=0.1):
    """plackett_luce_loss averaged over Rankings, in policy_loss's form: (loss, best-ranked rewards,
    worst-ranked rewards, weights)."""
    prompt = rankings.x.unsqueeze(-1)  # (N, 1)
    policy, reference = policy_logps[prompt, rankings.ranked], ref_logps[prompt, rankings.ranked]  # (N, size)
    losses = plackett_luce_loss(policy, reference, beta)
    rewards = implicit_rewards(policy, reference, beta).detach()
    return (rankings.weight * losses).sum(), rewards[:, 0], rewards[:, -1], rankings.weight


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


# ---- gradient noise (Sec. 5.2) ----------------------------------------------------------------------

def policy_gradient_moments(policy_logps, ref_logps, reward, beta, baseline=None):
    """The one-sample policy-gradient (REINFORCE) estimate of the gradient of Eq. 3, averaged over prompts,
    with respect to a tabular policy's logits, exactly: x uniform, y ~ pi(.|x), and in row x the estimate
    (r(x, y) - beta log pi(y|x) / pi_ref(y|x) - b(x)) * grad log pi(y|x), grad log pi(y|x) = e_y - pi(.|x).
    baseline: b(x), (P,), or None for none. Returns (its mean (P, K), its variance E||g - mean||^2)."""
    P, K = policy_logps.shape
    probs = policy_logps.exp()  # (P, K)
    advantage = reward - beta * (policy_logps - ref_logps)  # (P, K)
    if baseline is not None:
        advantage = advantage - baseline.unsqueeze(-1)
    score = torch.eye(K, dtype=probs.dtype) - probs.unsqueeze(1)  # (P, K, K): [x, y] = grad log pi(y|x)
    estimate = advantage.unsqueeze(-1) * score  # (P, K, K): the estimate's row x when (x, y) is drawn
    chance = probs / P  # (P, K) the probability of drawing (x, y)
    mean = (chance.unsqueeze(-1) * estimate).sum(1)  # (P, K)
    return mean, (chance * estimate.pow(2).sum(-1)).sum() - mean.pow(2).sum()


def dpo_gradient_moments(policy_logps, ref_logps, counts, beta):
    """The one-pair estimate of the gradient of Eq. 7 with respect to a tabular policy's logits, exactly:
    a pair drawn with its frequency, and in row x the estimate -beta sigma(r_hat_l - r_hat_w) (e_w - e_l)
    (the softmax's -pi(.|x) cancels between chosen and rejected). Returns (mean (P, K), variance)."""
    x, yw, yl, freq = pairs(counts)
    weight = gradient_weights(implicit_rewards(policy_logps[x, yw], ref_logps[x, yw], beta),
                              implicit_rewards(policy_logps[x, yl], ref_logps[x, yl], beta))  # (N,)
    size = -beta * weight  # (N,) the estimate is size * (e_w - e_l) in row x
    mean = torch.zeros_like(policy_logps)
    mean.index_put_((x, yw), freq * size, accumulate=True)
    mean.index_put_((x, yl), -freq * size, accumulate=True)
    return mean, (freq * 2 * size.pow(2)).sum() - mean.pow(2).sum()  # ||e_w - e_l||^2 = 2


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
