"""SFT, and the TL;DR and HH win-rate experiments at smoke scale."""

import json
import math

import pytest
import torch

from minidpo.dpo import IGNORE_INDEX
from minidpo.experiments import winrate
from minidpo.models import byte_tokenizer, tiny_neox
from minidpo.sft import pad_sft, sft_loss, sft_train, tokenize_sft


def test_sft_masks_the_prompt_and_ends_with_eos(tokenizer):
    ex = tokenize_sft(tokenizer, "Q: hi", " A: hello")
    n = len(tokenizer("Q: hi")["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == tokenizer(" A: hello")["input_ids"] + [tokenizer.eos_token_id]
    # An empty prompt (plain language modelling) starts from EOS, which is not predicted.
    plain = tokenize_sft(tokenizer, "", "review")
    assert plain["input_ids"][0] == tokenizer.eos_token_id and plain["labels"][0] == IGNORE_INDEX


def test_sft_loss_is_the_response_nll_per_token(tokenizer):
    model = tiny_neox(seed=0)
    ids, mask, labels = pad_sft([tokenize_sft(tokenizer, "Q: hi", " A: hello")], tokenizer.pad_token_id)
    logits = model(ids).logits[0, :-1].log_softmax(-1)
    targets = labels[0, 1:]
    keep = targets != IGNORE_INDEX
    expected = -logits[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(sft_loss(model, ids, mask, labels), expected)


def test_sft_loss_decreases_on_the_smoke_data(tokenizer):
    from minidpo.data import load_preferences
    records = [{"prompt": r["prompt"], "response": r["chosen"]}
               for r in load_preferences(winrate.scales("hh")["smoke"].dataset).select(range(32))]
    losses = sft_train(tiny_neox(seed=0), tokenizer, records, steps=12, batch_size=8, lr=3e-3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_smoke_experiment_writes_every_method_and_temperature(tmp_path, task):
    results = winrate.run(task, "smoke", out=str(tmp_path))
    rows = [json.loads(line) for line in open(results)]
    temperatures = set(winrate.scales(task)["smoke"].temperatures)
    for method in ("preferred_ft", "dpo"):
        assert {r["temperature"] for r in rows if r["method"] == method} == temperatures
    assert any(r["method"] == "dpo" and 0 < r["step"] < 6 for r in rows)  # the win rate along training
    assert all(0 <= r["low"] <= r["win_rate"] <= r["high"] <= 1 and r["invalid"] == 0 for r in rows)
    assert (tmp_path / "win_rates.png").stat().st_size > 10_000
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["beta"] == (0.5 if task == "tldr" else 0.1) and summary["sft_loss"][1] < summary["sft_loss"][0]
