"""The memory estimate against a measured peak, and the paper scale on one 80 GB GPU."""

import pytest
import torch

from minidpo import memory
from minidpo.models import byte_tokenizer, tiny_neox
from minidpo.sft import sft_train


def test_peak_memory_follows_allocations_and_frees():
    with memory.PeakMemory() as measured:
        a = torch.zeros(1000)  # 4000 bytes
        b = torch.zeros(500)  # 2000 bytes
        del a
        c = b.view(50, 10)  # a view: no new memory
        b.add_(1)  # in place: no new memory
        d = torch.ones(250)  # 1000 bytes
    assert measured.peak == 6000 and measured.now == 3000
    del b, c, d


def measured_and_estimated_sft_step(bf16, checkpointing, sequences=8, length=128, train_layers=0):
    """A real sft_train run of two optimizer steps (the second has optimizer state, as every later one),
    each of two accumulated micro-batches of `sequences` sequences of exactly `length` tokens."""
    tokenizer = byte_tokenizer()
    model = tiny_neox(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4)
    if train_layers:  # only the top blocks and the final layer norm train
        model.requires_grad_(False)
        model.gpt_neox.layers[-train_layers:].requires_grad_(True)
        model.gpt_neox.final_layer_norm.requires_grad_(True)
    prompt_tokens = length // 4
    records = [{"prompt": chr(65 + i % 26) * prompt_tokens, "response": "z" * (length - prompt_tokens - 1)}
               for i in range(4 * sequences)]  # the response's EOS makes `length`
    weights = memory.tensor_bytes(list(model.parameters()))
    with memory.PeakMemory() as measured:
        sft_train(model, tokenizer, records, steps=2, batch_size=2 * sequences, lr=1e-3, max_length=length,
                  grad_accum=2, dtype="bf16" if bf16 else "fp32", gradient_checkpointing=checkpointing)
    shape = memory.shape_of(model.config, train_layers)
    estimate = memory.training(shape, sequences, length, bf16, checkpointing, "adamw")
    return weights + measured.peak, memory.total(estimate), estimate


@pytest.mark.parametrize("bf16, checkpointing", [(False, False), (False, True), (True, False), (True, True)])
def test_the_training_estimate_matches_a_measured_peak(bf16, checkpointing):
    measured, estimated, parts = measured_and_estimated_sft_step(bf16, checkpointing)
    assert parts["activations"] > parts["weights"]  # a config where the activation count matters
    assert 0.8 * estimated <= measured <= 1.2 * estimated, (measured, estimated, parts)


def test_frozen_lower_blocks_save_no_activations():
    measured, estimated, parts = measured_and_estimated_sft_step(False, False, train_layers=1)
    _, _, all_trained = measured_and_estimated_sft_step(False, False)
    assert parts["activations"] < all_trained["activations"] / 2 and parts["gradients"] < all_trained["gradients"]
    assert 0.8 * estimated <= measured <= 1.2 * estimated, (measured, estimated, parts)


def test_the_activation_count_scales_with_the_batch():
    small, small_estimate, _ = measured_and_estimated_sft_step(False, False, sequences=4)
    large, large_estimate, _ = measured_and_estimated_sft_step(False, False, sequences=12)
    assert large - small == pytest.approx(large_estimate - small_estimate, rel=0.15)


def test_the_generation_estimate_matches_a_measured_peak():
    from minidpo.sampling import generate
    tokenizer = byte_tokenizer()
    model = tiny_neox(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4).eval()
    prompts = [chr(65 + i) * 96 for i in range(16)]
    with memory.PeakMemory() as measured:
        generate(model, tokenizer, prompts, max_new_tokens=64, temperature=1.0, batch_size=16)
    weights = memory.tensor_bytes(list(model.parameters()))
    estimate = memory.generation(memory.shape_of(model.config), 16, 96, 64)
    assert estimate["kv cache"] > estimate["weights"] / 4  # the KV cache is a real part of it
    assert 0.7 * memory.total(estimate) <= weights + measured.peak <= 1.3 * memory.total(estimate)


@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_the_paper_scale_fits_one_80gb_gpu(task):
    from minidpo.experiments import tldr_hh
    config = memory.model_config("EleutherAI/pythia-2.8b")
    shape = memory.shape_of(config)
    assert 2.7e9 < shape.params < 2.8e9  # Pythia-2.8B: 2.78B parameters
    paper = tldr_hh.scales(task)["paper"]
    stages = tldr_hh.memory_estimate(paper, "proxy", config, device_type="cuda")
    assert max(memory.total(parts) for parts in stages.values()) < 80 * memory.GB
    assert "fits in 80 GB" in memory.format_estimate(stages)
    # What the issue found: fp32, the whole batch of 64 pairs in one forward, no checkpointing: far over.
    naive = tldr_hh.memory_estimate(tldr_hh.dataclasses.replace(paper, dtype="fp32", grad_accum=1,
                                                                gradient_checkpointing=False), "proxy", config)
    assert memory.total(naive["DPO"]) > 80 * memory.GB
    assert "does NOT fit" in memory.format_estimate(naive)
    # the judge's copy only when that judge is used
    api = tldr_hh.memory_estimate(paper, "api", config, device_type="cuda")
    assert all("judge copy" not in parts for parts in api.values())
    assert all(parts["judge copy"] == shape.params * memory.BF16 for parts in stages.values())


def test_the_memory_flag_prints_the_estimate_and_exits(capsys):
    from minidpo.experiments import tldr_hh
    tldr_hh.main("hh", ["--scale", "paper", "--memory"])
    out = capsys.readouterr().out
    assert "DPO" in out and "SFT" in out and "fits in 80 GB" in out
