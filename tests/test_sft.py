"""SFT: tokenisation and truncation, the loss, gradient accumulation, checkpointing, DDP under torchrun,
and the TL;DR SFT data."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_training, flat_weights
from minidpo.dpo import IGNORE_INDEX
from minidpo.models import tiny_neox
from minidpo.sft import pad_sft, sft_loss, sft_train, tokenize_sft

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TLDR_SFT = os.path.join(HERE, "fixtures", "tldr_sft.jsonl")


def test_sft_masks_the_prompt_and_ends_with_eos(tokenizer):
    ex = tokenize_sft(tokenizer, "Q: hi", " A: hello")
    n = len(tokenizer("Q: hi")["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n
    assert ex["labels"][n:] == tokenizer(" A: hello")["input_ids"] + [tokenizer.eos_token_id]
    # An empty prompt (plain language modelling) starts from EOS, which is not predicted.
    plain = tokenize_sft(tokenizer, "", "review")
    assert plain["input_ids"][0] == tokenizer.eos_token_id and plain["labels"][0] == IGNORE_INDEX


def test_a_response_the_sampler_cut_gets_no_eos(tokenizer):
    whole, cut = (tokenize_sft(tokenizer, "Q: hi", " A: hello", truncated=t) for t in (False, True))
    assert whole["input_ids"][-1] == tokenizer.eos_token_id
    assert cut == {"input_ids": whole["input_ids"][:-1], "labels": whole["labels"][:-1]}


def test_a_long_prompt_is_trimmed_from_the_left_and_max_length_holds(tokenizer):
    """Before: a prompt longer than max_length passed whole and left one response token."""
    prompt, response = "".join(f"{i % 10}" for i in range(300)), " the answer."
    ex = tokenize_sft(tokenizer, prompt, response, max_length=64, max_prompt_length=40)
    response_ids = tokenizer(response)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ex["input_ids"]) == 40 + len(response_ids) <= 64
    assert ex["input_ids"][:40] == tokenizer(prompt)["input_ids"][-40:]  # the end of the prompt is kept
    assert ex["labels"] == [IGNORE_INDEX] * 40 + response_ids  # the whole response, EOS included
    # the default keeps half of max_length for the prompt; a long response is cut from the right
    long = tokenize_sft(tokenizer, prompt, " " + "x" * 100, max_length=64)
    assert len(long["input_ids"]) == 64 and long["labels"].count(IGNORE_INDEX) == 32
    # a short pair is untouched
    assert tokenize_sft(tokenizer, "Q:", " A", max_length=64)["input_ids"] == tokenizer("Q: A")["input_ids"] + [256]
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_sft(tokenizer, prompt, response, max_length=64, max_prompt_length=64)


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
    from minidpo.experiments import tldr_hh
    records = [{"prompt": r["prompt"], "response": r["chosen"]}
               for r in load_preferences(tldr_hh.scales("hh")["smoke"].dataset).select(range(32))]
    losses = sft_train(tiny_neox(seed=0), tokenizer, records, steps=12, batch_size=8, lr=3e-3)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5


def toy_sft(n=12):
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f" It is {2 * i}." + " ok" * (i % 4)}
            for i in range(n)]


def trained(tokenizer, **kwargs):
    model = tiny_neox(seed=0)
    losses = sft_train(model, tokenizer, toy_sft(), steps=3, batch_size=4, lr=1e-3, **kwargs)
    return losses, flat_weights(model)


def test_gradient_accumulation_equals_the_whole_batch(tokenizer):
    losses, weights = trained(tokenizer)
    for grad_accum in (2, 4):
        accumulated_losses, accumulated_weights = trained(tokenizer, grad_accum=grad_accum)
        assert accumulated_losses == pytest.approx(losses, abs=1e-5)
        assert_same_training(flat_weights(tiny_neox(seed=0)), weights, accumulated_weights, lr=1e-3, steps=3)
    with pytest.raises(ValueError, match="divisible"):
        trained(tokenizer, grad_accum=3)


def test_the_papers_rmsprop_and_warmup_when_asked(tokenizer, monkeypatch):
    # Oracle: the warmup rule of dpo.make_optimizer (lr (s + 1) / (warmup + 1) at step s), on RMSprop.
    seen = []

    class Recording(torch.optim.RMSprop):
        def step(self, *args, **kwargs):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "RMSprop", Recording)
    sft_train(tiny_neox(seed=0), tokenizer, toy_sft(), steps=5, batch_size=4, lr=1e-3, optimizer="rmsprop",
              warmup_steps=3)
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="optimizer"):
        sft_train(tiny_neox(seed=0), tokenizer, toy_sft(), steps=1, batch_size=4, optimizer="sgd")


def test_gradient_checkpointing_changes_memory_not_results(tokenizer):
    losses, weights = trained(tokenizer)
    checkpointed_losses, checkpointed_weights = trained(tokenizer, gradient_checkpointing=True)
    assert checkpointed_losses == pytest.approx(losses, abs=1e-5)
    assert_same_training(flat_weights(tiny_neox(seed=0)), weights, checkpointed_weights, lr=1e-3, steps=3)


def test_bf16_autocast_trains_close_to_fp32(tokenizer):
    losses, _ = trained(tokenizer)
    bf16_losses, _ = trained(tokenizer, dtype="bf16")
    assert bf16_losses != losses and bf16_losses == pytest.approx(losses, rel=0.02)
    with pytest.raises(ValueError, match="dtype"):
        trained(tokenizer, dtype="fp16")


def test_ddp_on_two_ranks_equals_one_process(tmp_path, tiny_model_dir):
    """python -m minidpo.sft under torchrun: 2 ranks (gloo) train as one process on the same global batch."""
    common = ["--model", tiny_model_dir, "--dataset", TLDR_SFT, "--steps", "3", "--batch_size", "4",
              "--grad_accum", "2", "--lr", "1e-3", "--max_length", "256", "--max_prompt_length", "192"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {"single": [sys.executable, "-m", "minidpo.sft"],
            "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "minidpo.sft"]}
    for name, command in runs.items():
        done = subprocess.run(command + common + ["--out", str(tmp_path / name)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    losses = {name: [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")] for name in runs}
    assert len(losses["ddp"]) == 3 and losses["ddp"] == pytest.approx(losses["single"], abs=1e-5)
    assert_same_training(tiny_model_dir, tmp_path / "single" / "final", tmp_path / "ddp" / "final", lr=1e-3, steps=3)


def test_tldr_sft_loader_reads_the_hub_schema(tmp_path):
    from minidpo.data import load_tldr_sft
    rows = [json.loads(line) for line in open(TLDR_SFT)]
    records = list(load_tldr_sft(TLDR_SFT))
    assert [r["prompt"] for r in records] == [row["prompt"] for row in rows]
    assert [r["response"] for r in records] == [" " + row["label"] for row in rows]  # one space after "TL;DR:"
    assert all(r["prompt"].startswith("SUBREDDIT: r/") and r["prompt"].endswith("\nTL;DR:") for r in records)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": rows[1]["prompt"], "label": "  "}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl\[1\]: 'label' is missing or empty"):
        load_tldr_sft(str(bad))
    assert len(load_tldr_sft(str(bad), skip_invalid=True)) == 1
