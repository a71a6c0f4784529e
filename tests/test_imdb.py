"""The sentiment experiment's pieces: pairs, the KL estimator, PPO, the reward model, the driver."""

import itertools
import json
import math
import os

import pytest
import torch

from minidpo.dpo import frozen_copy
from minidpo.experiments import imdb
from minidpo.models import byte_tokenizer, tiny_gpt2
from minidpo.ppo import PPOConfig, clipped_policy_loss, clipped_value_loss, gae, kl_penalised_rewards, ppo_train
from minidpo.reward_model import LinearRewardModel, completion_features
from minidpo.rewards import ClassifierReward, toy_reward
from minidpo.sampling import generate, sequence_kl

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


# ---- preference pairs ----------------------------------------------------------------------------

def test_four_samples_give_six_ranked_pairs_and_ties_are_dropped():
    records, ties = imdb.preference_pairs(["p"], [["a", "b", "c", "d"]], [[0.1, 0.9, 0.5, -0.3]])
    assert ties == 0 and len(records) == 6
    assert all(r["reward_chosen"] > r["reward_rejected"] for r in records)
    assert {(r["chosen"], r["rejected"]) for r in records} == {("b", "a"), ("a", "d"), ("c", "a"), ("b", "c"),
                                                                 ("b", "d"), ("c", "d")}
    records, ties = imdb.preference_pairs(["p"], [["a", "b", "c", "a"]], [[0.5, 0.5, 0.1, 0.5]])
    assert ties == 3 and len(records) == 3  # a=b (reward), a=a (text and reward), b=a: dropped and counted


# ---- the KL estimator ------------------------------------------------------------------------------

def test_sequence_kl_along_samples_has_the_exact_kl_as_expectation():
    V, L = 4, 2  # every completion of 2 tokens over a 4-token vocabulary can be enumerated
    policy, reference = tiny_gpt2(vocab_size=V, seed=1).eval(), tiny_gpt2(vocab_size=V, seed=2).eval()
    completions = [list(y) for y in itertools.product(range(V), repeat=L)]
    samples = [{"prompt_ids": [0], "completion_ids": y} for y in completions]
    estimates = sequence_kl(policy, reference, samples, pad_id=0)  # (V^L,)

    def seq_logp(model, y):
        logits = model(torch.tensor([[0] + y])).logits[0, :-1].log_softmax(-1)
        return sum(logits[t, tok] for t, tok in enumerate(y))

    with torch.no_grad():
        logp = torch.stack([seq_logp(policy, y) for y in completions])
        logq = torch.stack([seq_logp(reference, y) for y in completions])
    exact = (logp.exp() * (logp - logq)).sum()
    torch.testing.assert_close((logp.exp() * estimates).sum(), exact, rtol=1e-5, atol=1e-6)
    assert exact > 0.01
    assert sequence_kl(policy, policy, samples, pad_id=0).abs().max() < 1e-6


# ---- PPO pieces against hand-computed values ---------------------------------------------------------

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
    assert clipped_policy_loss(new, old, adv, mask, clip=0.2).item() == pytest.approx(expected)
    v, v_old, ret = torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]])
    # first token: unclipped (1-0)^2=1, clipped (0.2-0)^2=0.04 -> max 1; third: both 1
    assert clipped_value_loss(v, v_old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (1 + 0 + 1) / 3)


def test_ppo_gt_raises_the_reward_on_the_smoke_task():
    tokenizer, policy = byte_tokenizer(), tiny_gpt2(seed=0)
    reference = frozen_copy(policy)
    history = ppo_train(policy, reference, tokenizer, ["The film", "This movie was", "I watched"],
                        lambda s: toy_reward([x["completion"] for x in s]),
                        PPOConfig(iterations=12, rollouts=16, minibatch=8, ppo_epochs=2, lr=1e-2, max_new_tokens=12,
                                  init_kl_coef=0.01, target_kl=0))
    first, last = history[0]["score"], sum(h["score"] for h in history[-3:]) / 3
    assert last > first + 0.2


# ---- the reward model --------------------------------------------------------------------------------

def test_bradley_terry_reward_model_ranks_held_out_pairs_above_chance():
    # 128 wide: the byte embeddings must be rich enough for a linear head to read vowels off them.
    tokenizer, reference = byte_tokenizer(), tiny_gpt2(seed=0, n_embd=128).eval()
    samples = generate(reference, tokenizer, ["The film"] * 600, max_new_tokens=12, seed=0)
    rewards = toy_reward([s["completion"] for s in samples])
    pairs = [(a, b) if rewards[a] > rewards[b] else (b, a) for a, b in zip(range(0, 600, 2), range(1, 600, 2))
             if rewards[a] != rewards[b]]
    feats = completion_features(reference, samples, tokenizer.pad_token_id)
    chosen, rejected = feats[[w for w, _ in pairs]], feats[[l for _, l in pairs]]
    cut = len(pairs) * 3 // 4
    model = LinearRewardModel(feats.shape[1]).fit(chosen[:cut], rejected[:cut], l2=1.0)
    assert model.accuracy(chosen[cut:], rejected[cut:]) > 0.6  # measured 0.74 on 39 held-out pairs


# ---- the driver, at smoke scale and on the paper's code path ---------------------------------------------

def test_smoke_experiment_writes_every_method_and_a_figure(tmp_path):
    results = imdb.run("smoke", out=str(tmp_path))
    rows = [json.loads(line) for line in open(results)]
    assert {r["method"] for r in rows} == {"reference", "dpo", "dpo+nll", "preferred_ft", "unlikelihood", "ppo_gt",
                                          "ppo", "best_of_n"}
    assert all(math.isfinite(r["reward"]) and r["kl"] >= -1e-6 for r in rows)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["pairs"] > 0 and "reward_model_heldout_accuracy" in summary


@pytest.fixture
def tiny_classifier(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    tokenizer = byte_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    return str(tmp_path / "clf")


def test_classifier_reward_is_the_probability_of_positive(tiny_classifier):
    reward = ClassifierReward(tiny_classifier)
    scores = reward(["great film", "awful, awful film"])
    assert all(0 < s < 1 for s in scores) and scores[0] != scores[1]


def test_paper_scale_code_path_runs_on_local_stand_ins(tmp_path, tiny_model_dir, tiny_classifier):
    results = imdb.run("paper", out=str(tmp_path / "paper"), model=tiny_model_dir, reward=tiny_classifier,
                       imdb=os.path.join(FIXTURES, "imdb.jsonl"), train_prompts=3, eval_prompts=2, new_tokens=6,
                       steps=2, eval_every=1, ppo_eval_every=1, batch_size=2, sft_steps=2, dpo_betas=(0.1,),
                       ul_alphas=(1.0,), ppo_targets=(6.0,), best_of=(2,), rpo_alpha=0.0,
                       ppo=dict(iterations=1, rollouts=2, minibatch=2, ppo_epochs=1))
    methods = {json.loads(line)["method"] for line in open(results)}
    assert methods == {"reference", "dpo", "preferred_ft", "unlikelihood", "ppo_gt", "ppo", "best_of_n"}
