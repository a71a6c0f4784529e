"""PPO (minidpo.ppo): its pieces by hand, and the run measured like every other method: dropout off,
seeded, scores whitened per batch, and a KL controller that reaches its target."""

import copy
import dataclasses

import pytest
import torch

from conftest import dropout_gpt2
from minidpo import ppo
from minidpo.dpo import frozen_copy
from minidpo.models import byte_tokenizer, tiny_gpt2
from minidpo.ppo import AdaptiveKL, PPOConfig, gae, kl_penalised_rewards, ppo_train
from minidpo.rewards import toy_reward

PROMPTS = ["The film", "This movie was", "I watched"]


def vowel_score(samples):
    return toy_reward([s["completion"] for s in samples])


# ---- the pieces against hand-computed values ---------------------------------------------------------

def test_kl_penalty_puts_the_score_on_the_last_completion_token():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards = kl_penalised_rewards(torch.tensor([2.0]), torch.tensor([[9.0, -1.0, -2.0, 9.0]]),
                                   torch.tensor([[0.0, -1.5, -1.0, 0.0]]), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.1 + 2.0, 0.0]]))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.0  # the last token: no next value
    d1 = 1.0 + gamma * 1.0 - 0.5
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[0.0, d1 + gamma * lam * d2, d2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, d1 + gamma * lam * d2 + 0.5, d2 + 1.0, 0.0]]))


def test_clipped_objectives_by_hand():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    # ratio 1.5 with A>0 clips to 1.2; 0.5 with A>0 keeps 0.5 (the min); 1.1 with A<0 keeps 1.1
    expected = -(1.2 * 1.0 + 0.5 * 1.0 + 1.1 * -2.0) / 3
    assert ppo.clipped_policy_loss(new, old, adv, mask, clip=0.2).item() == pytest.approx(expected)
    v, v_old, ret = torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]])
    # first token: unclipped (1-0)^2=1, clipped (0.2-0)^2=0.04 -> max 1; third: both 1
    assert ppo.clipped_value_loss(v, v_old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (1 + 0 + 1) / 3)


# ---- the KL controller ---------------------------------------------------------------------------------

def gaussian_bandit_kl(kl_coef):
    """KL of the optimum of Eq. 3 when the reward is a standard normal over a continuum of responses:
    pi_ref exp(r / c) / Z tilts N(0, 1) into N(1/c, 1), whose KL to N(0, 1) is 1 / (2 c^2)."""
    return 1 / (2 * kl_coef ** 2)


def run_controller(target, rollouts, iterations, horizon):
    controller = AdaptiveKL(0.1, target, horizon)
    for _ in range(iterations):
        controller.update(gaussian_bandit_kl(controller.coef), rollouts)
    return gaussian_bandit_kl(controller.coef)


def test_the_controller_reaches_every_paper_target_with_a_horizon_matched_to_the_rollouts():
    # The paper-scale PPO: 200 iterations of 64 rollouts, targets 3, 6, 9, 12 nats, kl_coef from 0.1.
    matched = [run_controller(t, 64, 200, ppo.ZIEGLER_HORIZON_BATCHES * 64) for t in (3, 6, 9, 12)]
    assert matched == pytest.approx([3, 6, 9, 12], rel=0.02)
    # A horizon of 10,000 episodes (Ziegler et al.'s, made for batches of 512) moves kl_coef by at most
    # x1.3 in 200 iterations of 64: every target ends at the same KL, far from all of them.
    unmatched = [run_controller(t, 64, 200, 10_000) for t in (3, 6, 9, 12)]
    assert max(unmatched) - min(unmatched) < 0.1 and min(unmatched) > 20


def test_ppo_defaults_to_the_horizon_matched_to_its_rollouts():
    history = ppo_train(tiny_gpt2(seed=0), frozen_copy(tiny_gpt2(seed=0)), byte_tokenizer(), PROMPTS, vowel_score,
                        PPOConfig(iterations=1, rollouts=4, minibatch=4, ppo_epochs=1, max_new_tokens=4,
                                  init_kl_coef=0.1, target_kl=1e6))
    # KL far below the target: the largest step down, -0.2 n / horizon with n = 4 rollouts, horizon 20 x 4
    assert history[0]["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 / ppo.ZIEGLER_HORIZON_BATCHES))


def test_different_target_kls_end_at_different_kls():
    final = {}
    for target in (0.5, 4.0):
        history = ppo_train(tiny_gpt2(seed=0), frozen_copy(tiny_gpt2(seed=0)), byte_tokenizer(), PROMPTS, vowel_score,
                            PPOConfig(iterations=60, rollouts=16, minibatch=8, ppo_epochs=2, lr=3e-3, max_new_tokens=4,
                                      init_kl_coef=1.0, target_kl=target, horizon=4 * 16))
        final[target] = sum(h["kl"] for h in history[-10:]) / 10
    assert 0.25 < final[0.5] < 1.0 and final[4.0] > 2.0, final  # measured 0.45 and 3.6


# ---- measured like every other method -----------------------------------------------------------------

def test_ppo_sees_the_policy_not_dropout_noise():
    # lr 0: the policy never moves, so the sampled KL to the reference must stay exactly 0.
    policy, tokenizer = dropout_gpt2()
    reference = frozen_copy(policy)
    history = ppo_train(policy.train(), reference, tokenizer, PROMPTS, vowel_score,
                        PPOConfig(iterations=2, rollouts=8, minibatch=4, ppo_epochs=1, lr=0.0, max_new_tokens=6))
    assert [h["kl"] for h in history] == [0.0, 0.0]


def test_a_run_is_seeded_whatever_ran_before_it():
    config = PPOConfig(iterations=2, rollouts=8, minibatch=4, ppo_epochs=1, lr=1e-2, max_new_tokens=6, seed=3)
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(ppo_train(tiny_gpt2(seed=0), frozen_copy(tiny_gpt2(seed=0)), byte_tokenizer(), PROMPTS,
                              vowel_score, config))
    assert runs[0] == runs[1]


def test_whitened_scores_make_ppo_blind_to_the_rewards_scale_and_offset():
    config = PPOConfig(iterations=3, rollouts=8, minibatch=4, ppo_epochs=1, lr=1e-2, max_new_tokens=6)
    start = tiny_gpt2(seed=0)
    reference = frozen_copy(start)

    def trained(score_fn, **overrides):
        policy = copy.deepcopy(start)
        ppo_train(policy, reference, byte_tokenizer(), PROMPTS, score_fn, dataclasses.replace(config, **overrides))
        return torch.cat([p.detach().flatten() for p in policy.parameters()])

    def affine(samples):
        return [10 * r - 3 for r in vowel_score(samples)]

    base = trained(vowel_score)
    moved = (base - torch.cat([p.detach().flatten() for p in start.parameters()])).norm()
    # The same run up to rounding (which Adam amplifies a little on near-zero gradients) ...
    assert (trained(affine) - base).norm() < 0.01 * moved
    # ... and without whitening, a different run.
    assert (trained(affine, whiten_scores=False) - base).norm() > 0.1 * moved


def test_ppo_gt_raises_the_reward_on_the_smoke_task():
    tokenizer, policy = byte_tokenizer(), tiny_gpt2(seed=0)
    reference = frozen_copy(policy)
    history = ppo_train(policy, reference, tokenizer, PROMPTS, vowel_score,
                        PPOConfig(iterations=12, rollouts=16, minibatch=8, ppo_epochs=2, lr=1e-2, max_new_tokens=12,
                                  init_kl_coef=0.01, target_kl=0))
    first, last = history[0]["score"], sum(h["score"] for h in history[-3:]) / 3
    assert last > first + 0.2
