"""bf16 autocast around training: the bf16 copies of the weights must follow the optimizer. Found on an H200:
inside the IMDb experiment's autocast the reward model's zero-initialised head never moved (accuracy 0.000),
because torch's autocast keeps each trainable weight's bf16 copy until the outermost region exits."""
import contextlib

import pytest
import torch

from conftest import config, losses, run, toy_records
from minidpo import dpo
from minidpo.models import byte_tokenizer, tiny_gpt2
from minidpo.reward_model import RewardModelConfig, train_reward_model


def linear_outputs(context, steps=3):
    """The output of a zero-initialised linear layer over a few SGD steps that push it up, inside context."""
    layer = torch.nn.Linear(4, 1)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.25)
    outputs = []
    with context:
        for _ in range(steps):
            y = layer(torch.ones(1, 4)).float().sum()
            outputs.append(y.item())
            optimizer.zero_grad()
            (-y).backward()
            optimizer.step()
    return outputs


def test_bf16_autocast_computes_with_the_current_weights():
    # Oracle: the same steps in fp32 (0, 1.25, 2.5: exact in bf16). torch's default autocast keeps the
    # first step's copy of the weights: the pitfall dpo.bf16_autocast avoids.
    assert linear_outputs(dpo.bf16_autocast("cpu")) == linear_outputs(contextlib.nullcontext()) == [0.0, 1.25, 2.5]
    assert linear_outputs(torch.autocast("cpu", dtype=torch.bfloat16)) == [0.0, 0.0, 0.0]


def train_losses(tmp_path, name, context):
    cfg = config(tmp_path, name, beta=0.1, optimizer="rmsprop", lr=3e-3, warmup_steps=0, max_steps=3, eval_every=3,
                 save_every=3, dtype="bf16", seed=0)
    with context:
        return losses(run(cfg, toy_records(16), []))


def test_dpo_training_inside_a_callers_autocast_is_training_without_it(tmp_path):
    alone = train_losses(tmp_path, "alone", contextlib.nullcontext())
    inside = train_losses(tmp_path, "inside", torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(alone) == 3 and alone[2] < alone[0]
    assert inside == alone


def test_the_reward_model_learns_inside_the_experiments_bf16_autocast():
    # The IMDb experiment runs inside dpo.bf16_autocast on a GPU; the same fit in fp32 is the oracle. (Inside
    # torch.autocast with its cache on, the validation loss stays at ln 2 and the accuracy at 0: measured.)
    config = RewardModelConfig(epochs=4, batch_size=8, lr=3e-3, eval_every=2, val_fraction=0.25, test_fraction=0.25)
    reports = []
    for context in (contextlib.nullcontext(), dpo.bf16_autocast("cpu")):
        with context:
            reports.append(train_reward_model(tiny_gpt2(vocab_size=257, seed=0), byte_tokenizer(), toy_records(48),
                                              config)[1])
    fp32, bf16 = reports
    assert fp32["test_accuracy"] == 1.0 and bf16["test_accuracy"] == pytest.approx(fp32["test_accuracy"])
    assert bf16["history"][-1]["val_loss"] < bf16["history"][0]["val_loss"] - 0.05
