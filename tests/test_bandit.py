"""The bandit where the DPO derivation is exact (pitfall 10), and the baselines' losses."""

import math

import pytest
import torch
import torch.nn.functional as F

import minidpo
from minidpo import bandit as bd
from minidpo.baselines import log1mexp, preferred_ft_loss, unlikelihood_loss
from minidpo.plackett_luce import plackett_luce_loss


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
    x, yw, yl = 0, *problem.reward[0].topk(2).indices.tolist()  # two likely-enough responses
    n = counts[x, yw, yl] + counts[x, yl, yw]
    assert n > 100
    expected = torch.sigmoid(problem.reward[x, yw] - problem.reward[x, yl]).item()
    assert counts[x, yw, yl].item() / n.item() == pytest.approx(expected, abs=4 / math.sqrt(n.item()))
    assert counts.diagonal(dim1=1, dim2=2).sum() == 0
    deterministic = bd.preference_counts(problem, 10_000, seed=1, deterministic=True)
    x, yw, yl = deterministic.nonzero(as_tuple=True)
    assert (problem.reward[x, yw] > problem.reward[x, yl]).all()


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


def test_bandit_unlikelihoods_are_the_papers_and_wellecks_forms_written_out(problem):
    counts = bd.preference_counts(problem, 20_000, seed=8)
    x, yw, yl, freq = bd.pairs(counts)
    logits = (problem.ref_logps + 0.3 * torch.randn(problem.shape, generator=torch.Generator().manual_seed(4),
                                                    dtype=torch.float64)).requires_grad_(True)
    logps = logits.log_softmax(-1)
    alpha = 2.0
    paper, *_ = bd.policy_loss("unlikelihood", logps, problem.ref_logps, counts, alpha=alpha)
    torch.testing.assert_close(paper, (freq * (-logps[x, yw] + alpha * logps[x, yl])).sum())
    bounded, *_ = bd.policy_loss("unlikelihood_token", logps, problem.ref_logps, counts, alpha=alpha)
    torch.testing.assert_close(bounded, (freq * (-logps[x, yw] - alpha * torch.log(1 - logps[x, yl].exp()))).sum())
    # the paper's gradient in the logits, by hand: -W(y) + alpha L(y) + (1 - alpha) f(x) pi(y|x), with W, L the
    # fractions of pairs that y won and lost and f(x) the fraction on x (the softmax spreads each push over pi)
    (grad,) = torch.autograd.grad(paper, logits)
    wins, losses = torch.zeros(problem.shape, dtype=torch.float64), torch.zeros(problem.shape, dtype=torch.float64)
    wins.index_put_((x, yw), freq, accumulate=True)
    losses.index_put_((x, yl), freq, accumulate=True)
    per_prompt = wins.sum(-1, keepdim=True)  # each pair counts once, on its prompt
    torch.testing.assert_close(grad, -wins + alpha * losses + (1 - alpha) * per_prompt * logps.detach().exp())
    # at alpha = 1 it is the unweighted loss divided by beta, up to a constant
    beta = 0.5
    unweighted, *_ = bd.policy_loss("unweighted", logps, problem.ref_logps, counts, beta=beta)
    paper_1, *_ = bd.policy_loss("unlikelihood", logps, problem.ref_logps, counts, alpha=1.0)
    constant = (freq * (problem.ref_logps[x, yw] - problem.ref_logps[x, yl])).sum()
    torch.testing.assert_close(paper_1, unweighted / beta - constant)
    with pytest.raises(ValueError):
        bd.policy_loss("unlikelyhood", logps, problem.ref_logps, counts)


def test_frontier_at_kl_inverts_the_kl_of_the_optimum(problem):
    star = bd.optimal_policy(problem.ref_logps, problem.reward, 0.7)
    beta, best = bd.frontier_at_kl(problem.ref_logps, problem.reward, bd.kl(star, problem.ref_logps).mean().item())
    assert beta == pytest.approx(0.7, rel=1e-6)
    assert best == pytest.approx(bd.expected_reward(star, problem.reward).mean().item())


# ---- Plackett-Luce (App. A.3) -----------------------------------------------------------------------

def test_plackett_luce_loss_matches_the_product_of_choices_written_out():
    g = torch.Generator().manual_seed(0)
    policy = torch.randn(5, 4, generator=g, dtype=torch.float64)
    reference = torch.randn(5, 4, generator=g, dtype=torch.float64)
    beta = 0.3
    expected = torch.zeros(5, dtype=torch.float64)
    for b in range(5):
        scores = [math.exp(beta * (policy[b, k] - reference[b, k]).item()) for k in range(4)]
        probability = 1.0
        for k in range(4):  # Eq. 18: choose rank k among the responses not yet ranked
            probability *= scores[k] / sum(scores[k:])
        expected[b] = -math.log(probability)
    torch.testing.assert_close(plackett_luce_loss(policy, reference, beta), expected)


def test_plackett_luce_loss_is_the_dpo_loss_at_two_responses():
    g = torch.Generator().manual_seed(1)
    chosen, rejected, ref_chosen, ref_rejected = torch.randn(4, 16, generator=g, dtype=torch.float64)
    pairwise, _, _ = minidpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.2)
    ranked = plackett_luce_loss(torch.stack([chosen, rejected], -1), torch.stack([ref_chosen, ref_rejected], -1), 0.2)
    torch.testing.assert_close(ranked, pairwise)


def test_plackett_luce_loss_ignores_a_per_prompt_constant_and_depends_on_the_order():
    g = torch.Generator().manual_seed(2)
    policy, reference = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    shifted = policy + torch.tensor([[1.0], [-4.0], [2.5]], dtype=torch.float64)  # beta log Z(x) cancels
    torch.testing.assert_close(plackett_luce_loss(shifted, reference, 0.5), plackett_luce_loss(policy, reference, 0.5))
    reversed_order = plackett_luce_loss(policy.flip(-1), reference.flip(-1), 0.5)
    assert not torch.allclose(reversed_order, plackett_luce_loss(policy, reference, 0.5))


@pytest.mark.parametrize("shape, beta", [((4,), 0.1), ((4, 1), 0.1), ((4, 3), 0.0)])
def test_plackett_luce_loss_rejects_bad_arguments(shape, beta):
    with pytest.raises(ValueError):
        plackett_luce_loss(torch.zeros(shape), torch.zeros(shape), beta)
    with pytest.raises(ValueError):
        plackett_luce_loss(torch.zeros(4, 3), torch.zeros(4, 2), 0.1)


# ---- the additions of notebook 01: projection, population, unweighted loss, Plackett-Luce, gradient noise --

def test_project_reward_is_the_one_reparameterisation_in_the_reward_class(problem):
    beta = 0.4
    shift = torch.tensor([[2.0], [-3.0], [0.7]], dtype=torch.float64)
    projected = bd.project_reward(problem.ref_logps, problem.reward, beta)
    # the same member for every reward of the class (Theorem 1), and it is beta log pi*/pi_ref (Eq. 5)
    torch.testing.assert_close(bd.project_reward(problem.ref_logps, problem.reward + shift, beta), projected)
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    torch.testing.assert_close(projected, minidpo.implicit_rewards(star, problem.ref_logps, beta))
    # it only shifts each prompt's rewards
    offset = projected - problem.reward
    torch.testing.assert_close(offset, offset[:, :1].expand_as(offset))


def test_preference_distribution_is_the_limit_of_the_sampled_counts(problem):
    population = bd.preference_distribution(problem)
    assert population.sum().item() == pytest.approx(1.0)
    assert population.diagonal(dim1=1, dim2=2).abs().max() == 0
    counts = bd.preference_counts(problem, 400_000, seed=3)
    frequency = counts / counts.sum()
    assert (frequency - population).abs().max() < 4 * population.max().sqrt() / math.sqrt(counts.sum())


def test_at_the_optimum_the_two_orders_of_every_pair_balance(problem):
    """The DPO gradient on the exact population vanishes at pi*: the weights are the opposite orders' probabilities."""
    beta = 0.5
    population = bd.preference_distribution(problem)
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    logits = star.clone().requires_grad_(True)
    loss, *_ = bd.policy_loss("dpo", logits.log_softmax(-1), problem.ref_logps, population, beta=beta)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().max() < 1e-12
    # elsewhere it does not vanish (so the check above can fail)
    logits = (star + 0.3 * torch.randn(star.shape, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)).requires_grad_(True)
    loss, *_ = bd.policy_loss("dpo", logits.log_softmax(-1), problem.ref_logps, population, beta=beta)
    assert torch.autograd.grad(loss, logits)[0].abs().max() > 1e-4
    # half of the weight is on the noisy order (the lower-reward response won)
    _, chosen, rejected, weight = bd.policy_loss("dpo", star, problem.ref_logps, population, beta=beta)
    x, yw, yl, _ = bd.pairs(population)
    pushes = weight * minidpo.gradient_weights(chosen, rejected)
    noisy = problem.reward[x, yw] < problem.reward[x, yl]
    assert (pushes[noisy].sum() / pushes.sum()).item() == pytest.approx(0.5, abs=1e-12)


def test_unweighted_gradient_is_dpo_gradient_without_the_weight(problem):
    beta = 0.5
    counts = bd.preference_counts(problem, 20_000, seed=2)
    x, yw, yl, freq = bd.pairs(counts)
    policy = (problem.ref_logps + 0.3 * torch.randn(problem.shape, generator=torch.Generator().manual_seed(1),
                                                    dtype=torch.float64)).log_softmax(-1)
    logits = policy.clone().requires_grad_(True)
    loss, *_ = bd.policy_loss("unweighted", logits.log_softmax(-1), problem.ref_logps, counts, beta=beta)
    (autograd,) = torch.autograd.grad(loss, logits)
    # the paper's gradient (Sec. 4) with sigma(r_l - r_w) replaced by 1: -beta E[grad log pi(y_w) - grad log pi(y_l)]
    logits = policy.clone().requires_grad_(True)
    logps = logits.log_softmax(-1)
    (formula,) = torch.autograd.grad(-beta * (freq * (logps[x, yw] - logps[x, yl])).sum(), logits)
    torch.testing.assert_close(autograd, formula)
    # and it is constant: -beta times each response's net wins
    net = torch.zeros(problem.shape, dtype=torch.float64)
    net.index_put_((x, yw), freq, accumulate=True)
    net.index_put_((x, yl), -freq, accumulate=True)
    torch.testing.assert_close(autograd, -beta * net)


def test_sample_rankings_follow_plackett_luce(problem):
    rankings = bd.sample_rankings(problem, 200_000, size=2, seed=4)
    assert rankings.weight.sum().item() == pytest.approx(1.0)
    assert (rankings.ranked >= 0).all() and (rankings.ranked < problem.shape[1]).all()
    # at size 2 Plackett-Luce is Bradley-Terry: check one frequent pair of distinct responses
    x, a, b = 0, *problem.ref_logps[0].topk(2).indices.tolist()
    on_x = rankings.x == x
    first_a = (on_x & (rankings.ranked[:, 0] == a) & (rankings.ranked[:, 1] == b))
    first_b = (on_x & (rankings.ranked[:, 0] == b) & (rankings.ranked[:, 1] == a))
    n_a, n_b = rankings.weight[first_a].sum().item() * 200_000, rankings.weight[first_b].sum().item() * 200_000
    n = n_a + n_b
    expected = torch.sigmoid(problem.reward[x, a] - problem.reward[x, b]).item()
    assert n > 1000
    assert n_a / n == pytest.approx(expected, abs=4 / math.sqrt(n))


def test_plackett_luce_training_on_rankings_of_two_equals_dpo_on_the_same_pairs(problem):
    beta = 0.5
    rankings = bd.sample_rankings(problem, 20_000, size=2, seed=5)
    distinct = rankings.ranked[:, 0] != rankings.ranked[:, 1]  # a pair of equal responses says nothing
    P, K = problem.shape
    counts = torch.zeros(P, K, K, dtype=torch.float64)
    counts.index_put_((rankings.x[distinct], rankings.ranked[distinct, 0], rankings.ranked[distinct, 1]),
                      rankings.weight[distinct], accumulate=True)
    rankings = bd.Rankings(rankings.x[distinct], rankings.ranked[distinct],
                           rankings.weight[distinct] / rankings.weight[distinct].sum())
    from_rankings, _ = bd.train_policy("plackett_luce", problem, rankings, beta=beta, steps=200, lr=0.05)
    from_pairs, _ = bd.train_policy("dpo", problem, counts, beta=beta, steps=200, lr=0.05)
    torch.testing.assert_close(from_rankings, from_pairs)


def test_plackett_luce_dpo_on_four_way_rankings_approaches_the_optimum(problem):
    beta = 0.5
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    rankings = bd.sample_rankings(problem, 25_000, size=4, seed=0)
    policy, _ = bd.train_policy("plackett_luce", problem, rankings, beta=beta, steps=400, lr=0.1)
    assert bd.kl(policy, star).mean() < 0.02 < bd.kl(problem.ref_logps, star).mean()


def test_gradient_moments_means_are_the_autograd_gradients(problem):
    beta = 0.5
    counts = bd.preference_counts(problem, 20_000, seed=6)
    logits = (problem.ref_logps + 0.4 * torch.randn(problem.shape, generator=torch.Generator().manual_seed(2),
                                                    dtype=torch.float64)).requires_grad_(True)
    logps = logits.log_softmax(-1)
    (eq3,) = torch.autograd.grad(bd.rlhf_objective(logps, problem.ref_logps, problem.reward, beta).mean(), logits,
                                 retain_graph=True)
    (eq7,) = torch.autograd.grad(bd.policy_loss("dpo", logps, problem.ref_logps, counts, beta=beta)[0], logits)
    policy = logps.detach()
    baseline = beta * bd.log_partition(problem.ref_logps, problem.reward, beta)
    for b in (None, baseline, torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)):  # a baseline leaves the mean
        mean, _ = bd.policy_gradient_moments(policy, problem.ref_logps, problem.reward, beta, b)
        torch.testing.assert_close(mean, eq3)
    torch.testing.assert_close(bd.dpo_gradient_moments(policy, problem.ref_logps, counts, beta)[0], eq7)


def _enumerated_variance(outcomes):
    """E||g - E g||^2 of a discrete estimate, by brute force from (probability, estimate) pairs."""
    mean = sum(p * g for p, g in outcomes)
    return sum(p * (g - mean).pow(2).sum() for p, g in outcomes).item()


def test_gradient_moments_variances_by_enumeration(problem):
    beta = 0.5
    P, K = problem.shape
    policy = (problem.ref_logps + 0.4 * torch.randn(problem.shape, generator=torch.Generator().manual_seed(3),
                                                    dtype=torch.float64)).log_softmax(-1)
    baseline = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    outcomes = []
    for x in range(P):
        for y in range(K):
            g = torch.zeros(P, K, dtype=torch.float64)
            advantage = problem.reward[x, y] - beta * (policy[x, y] - problem.ref_logps[x, y]) - baseline[x]
            g[x] = advantage * (F.one_hot(torch.tensor(y), K).to(torch.float64) - policy[x].exp())
            outcomes.append((policy[x, y].exp() / P, g))
    _, variance = bd.policy_gradient_moments(policy, problem.ref_logps, problem.reward, beta, baseline)
    assert variance.item() == pytest.approx(_enumerated_variance(outcomes), rel=1e-10)

    counts = bd.preference_counts(problem, 5_000, seed=7)
    x, yw, yl, freq = bd.pairs(counts)
    outcomes = []
    for i in range(len(x)):
        margin = beta * (policy[x[i], yw[i]] - problem.ref_logps[x[i], yw[i]]
                         - policy[x[i], yl[i]] + problem.ref_logps[x[i], yl[i]])
        logits = policy.clone().requires_grad_(True)  # the one-pair gradient by autograd
        logps = logits.log_softmax(-1)
        loss = -F.logsigmoid(beta * (logps[x[i], yw[i]] - problem.ref_logps[x[i], yw[i]]
                                                       - logps[x[i], yl[i]] + problem.ref_logps[x[i], yl[i]]))
        (g,) = torch.autograd.grad(loss, logits)
        assert margin.isfinite()
        outcomes.append((freq[i], g))
    _, variance = bd.dpo_gradient_moments(policy, problem.ref_logps, counts, beta)
    assert variance.item() == pytest.approx(_enumerated_variance(outcomes), rel=1e-10)


def test_normalising_baseline_removes_the_reward_offset_and_vanishes_at_the_optimum(problem):
    beta = 0.5
    star = bd.optimal_policy(problem.ref_logps, problem.reward, beta)
    for offset in (0.0, 7.0):
        reward = problem.reward + offset
        baseline = beta * bd.log_partition(problem.ref_logps, reward, beta)
        _, variance = bd.policy_gradient_moments(star, problem.ref_logps, reward, beta, baseline)
        assert variance < 1e-20
    _, plain = bd.policy_gradient_moments(star, problem.ref_logps, problem.reward, beta)
    _, shifted = bd.policy_gradient_moments(star, problem.ref_logps, problem.reward + 7.0, beta)
    assert shifted > 10 * plain
