"""The bandit where the DPO derivation is exact (pitfall 10), and the baselines' losses."""

import math

import pytest
import torch

import minidpo
from minidpo import bandit as bd
from minidpo.baselines import log1mexp, preferred_ft_loss, unlikelihood_loss


@pytest.fixture(scope="module")
def problem():
    return bd.make_bandit(num_prompts=3, num_responses=24, seed=0)


def test_closed_form_optimum_maximises_the_kl_constrained_objective(problem):
    beta = 0.5
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    torch.testing.assert_close(star.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    best = bd.rlhf_objective(star, problem.ref_logps, problem.reward, beta)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        other = (star + 0.1 * torch.randn(star.shape, generator=g, dtype=torch.float64)).log_softmax(-1)
        assert (bd.rlhf_objective(other, problem.ref_logps, problem.reward, beta) < best).all()
    # Eq. 3 at the optimum equals beta log Z(x) (a known identity), a second oracle.
    torch.testing.assert_close(best, beta * bd.log_partition(problem.ref_logps, problem.reward, beta))


def test_reparameterised_reward_is_the_true_reward_minus_beta_log_z(problem):
    beta = 0.3
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    recovered = minidpo.implicit_rewards(star, problem.ref_logps, beta)  # Eq. 5 without beta log Z
    log_z = bd.log_partition(problem.ref_logps, problem.reward, beta).unsqueeze(-1)
    torch.testing.assert_close(recovered, problem.reward - beta * log_z)


def test_dpo_on_enough_pairs_converges_to_the_optimum_and_equals_rlhf(problem):
    beta = 0.5
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    counts = bd.preference_counts(problem, 1_000_000, seed=0)
    policy, _ = bd.train_policy("dpo", problem, counts, beta=beta, steps=1500, lr=0.05)
    assert bd.kl(policy, star).max() < 1e-3
    # RLHF the long way: the maximum-likelihood reward (Eq. 2), then the exact optimum of Eq. 3.
    rlhf = bd.optimal_policy(problem.ref_logps, bd.fit_reward(counts), beta)
    assert bd.kl(policy, rlhf).max() < 1e-8


def test_preference_counts_follow_bradley_terry(problem):
    counts = bd.preference_counts(problem, 200_000, seed=1)
    x, w, l = 0, *problem.reward[0].topk(2).indices.tolist()  # two likely-enough responses
    n = counts[x, w, l] + counts[x, l, w]
    assert n > 100
    expected = torch.sigmoid(problem.reward[x, w] - problem.reward[x, l]).item()
    assert counts[x, w, l].item() / n.item() == pytest.approx(expected, abs=4 / math.sqrt(n.item()))
    assert counts.diagonal(dim1=1, dim2=2).sum() == 0
    deterministic = bd.preference_counts(problem, 10_000, seed=1, deterministic=True)
    x, w, l = deterministic.nonzero(as_tuple=True)
    assert (problem.reward[x, w] > problem.reward[x, l]).all()


def test_log1mexp_matches_the_direct_formula():
    logp = torch.tensor([-1e-5, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(logp), torch.log(1 - torch.exp(logp)))


def test_unlikelihood_and_preferred_ft_by_hand():
    chosen = torch.tensor([math.log(0.5)])
    rejected_tokens = torch.tensor([[math.log(0.2), math.log(0.9), 0.0]])
    mask = torch.tensor([[True, True, False]])
    expected = -math.log(0.5) - 0.5 * (math.log(0.8) + math.log(0.1))
    assert unlikelihood_loss(chosen, rejected_tokens, mask, alpha=0.5).item() == pytest.approx(expected)
    assert preferred_ft_loss(chosen).item() == pytest.approx(math.log(2))


def test_frontier_at_kl_inverts_the_kl_of_the_optimum(problem):
    star = bd.optimal_policy(problem.ref_logps, problem.reward, 0.7)
    beta, best = bd.frontier_at_kl(problem.ref_logps, problem.reward, bd.kl(star, problem.ref_logps).mean().item())
    assert beta == pytest.approx(0.7, rel=1e-6)
    assert best == pytest.approx(bd.expected_reward(star, problem.reward).mean().item())
