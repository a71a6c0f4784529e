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


def test_the_kl_is_computed_in_fp32_inside_a_bf16_autocast():
    # Oracle: the same KL without autocast. Logits offset by -100 (as a real model's can be) have a bf16 resolution
    # of 0.5, so a KL of a few hundredths of a nat computed in bf16 would be noise.
    from minidpo.sampling import generate, sequence_kl
    tokenizer = byte_tokenizer()
    policy, reference = tiny_gpt2(seed=1), tiny_gpt2(seed=2)
    for model in (policy, reference):
        model.lm_head.register_forward_hook(lambda module, inputs, output: output - 100.0)
    samples = generate(policy, tokenizer, ["The film was", "It was a"], max_new_tokens=6, seed=0)
    fp32 = sequence_kl(policy, reference, samples, tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sequence_kl(policy, reference, samples, tokenizer.pad_token_id)
        with torch.no_grad():  # and what the same forward gives in bf16: the error the fp32 path avoids
            logits = policy(torch.tensor([samples[0]["prompt_ids"]])).logits
    assert fp32.min() > 0.01 and logits.dtype == torch.bfloat16
    torch.testing.assert_close(inside, fp32, rtol=0, atol=1e-3)
