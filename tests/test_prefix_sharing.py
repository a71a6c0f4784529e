"""Prefix sharing (minidpo.prefix_sharing): one sequence per pair gives the log-probs of two separate sequences.
Oracle: dpo.concatenated_forward's plain path (fast=False), itself tested against unpadded per-example sums."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_same_training, config, losses, run
from minidpo import dpo
from minidpo.models import byte_tokenizer, tiny_gpt2, tiny_neox
from minidpo.prefix_sharing import pack_pairs, shared_prefix_forward

PAIRS = [("The film", " was great fun.", " was a bore."),
         ("A much longer opening of a review here", " ok", " not good at all, really not good"),
         ("Short", " fine, fine and fine again and again", " no")]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        bos_token_id=256, eos_token_id=256, pad_token_id=256))


MODELS = {"gpt2": tiny_gpt2, "neox": tiny_neox, "llama": tiny_llama}


def model_with(arch, attention):
    model = MODELS[arch](seed=0)
    model.config._attn_implementation = attention
    return model.eval()


def batch_of(tokenizer, pairs, padding_side, max_length=256, max_prompt_length=128):
    examples = [dpo.tokenize_pair(tokenizer, p, c, r, max_length, max_prompt_length) for p, c, r in pairs]
    return dpo.collate(examples, tokenizer.pad_token_id, padding_side)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_one_sequence_per_pair_gives_the_two_sequences_log_probs(arch, attention, padding_side):
    tokenizer, model = byte_tokenizer(), model_with(arch, attention)
    batch = batch_of(tokenizer, PAIRS, padding_side)
    for average in (False, True):
        expected = dpo.concatenated_forward(model, batch, average=average, fast=False)
        shared = shared_prefix_forward(model, batch, average=average)
        for want, got in zip(expected, shared):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_truncated_prompts_and_responses_agree_too(arch):
    # max_length 40 cuts the long prompt (kept from its end) and the long responses
    tokenizer, model = byte_tokenizer(), model_with(arch, "sdpa")
    batch = batch_of(tokenizer, PAIRS, "right", max_length=40, max_prompt_length=20)
    for want, got in zip(dpo.concatenated_forward(model, batch, fast=False), shared_prefix_forward(model, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_gradients_agree():
    tokenizer = byte_tokenizer()
    batch = batch_of(tokenizer, PAIRS, "right")
    grads = []
    for forward in (dpo.concatenated_forward, shared_prefix_forward):
        model = model_with("gpt2", "sdpa")
        chosen, rejected = forward(model, batch)
        (chosen - 2 * rejected).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


def test_each_pair_is_its_prompt_once_then_both_responses():
    tokenizer = byte_tokenizer()
    batch = batch_of(tokenizer, PAIRS, "left")
    packed = pack_pairs(batch)
    input_ids, position_ids, mask = (packed[f"packed_{k}"] for k in ("input_ids", "position_ids", "mask"))
    assert input_ids.shape[0] == len(PAIRS)
    eos = [tokenizer.eos_token_id]
    for b, (prompt, chosen, rejected) in enumerate(PAIRS):
        P, C, R = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt, chosen, rejected))
        C, R = C + eos, R + eos
        n = len(P + C + R)  # the two-sequence path runs len(P + C) + len(P + R): the prompt twice
        assert input_ids[b, :n].tolist() == P + C + R
        assert position_ids[b, :n].tolist() == list(range(len(P + C))) + list(range(len(P), len(P + R)))
        first_rejected = mask[b, 0, len(P + C)]  # the rejected response's first token sees the prompt, and itself
        assert first_rejected[:len(P)].all() and not first_rejected[len(P):len(P + C)].any()
        assert first_rejected[len(P + C)] and not first_rejected[len(P + C) + 1:].any()


def test_a_pair_whose_prompts_differ_is_an_error():
    tokenizer = byte_tokenizer()
    batch = batch_of(tokenizer, PAIRS[:1], "right")
    batch["rejected_input_ids"][0, 0] += 1
    with pytest.raises(ValueError, match="pair 0 has different prompt tokens"):
        shared_prefix_forward(tiny_gpt2(), batch)


def test_an_attention_that_takes_no_4d_mask_is_refused():
    tokenizer, model = byte_tokenizer(), model_with("gpt2", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        shared_prefix_forward(model, batch_of(tokenizer, PAIRS, "right"))
    model.config._attn_implementation, model.config.sliding_window = "sdpa", 16  # a window the mask would drop
    with pytest.raises(ValueError, match="sliding window"):
        shared_prefix_forward(model, batch_of(tokenizer, PAIRS, "right"))


def test_training_with_prefix_sharing_is_the_same_training(tmp_path):
    plain = run(config(tmp_path, "plain", eval_every=2))
    shared = run(config(tmp_path, "shared", eval_every=2, prefix_sharing=True))
    assert losses(shared) == pytest.approx(losses(plain), abs=1e-5)
    assert losses(shared, "eval") == pytest.approx(losses(plain, "eval"), abs=1e-5)
    assert_same_training(tiny_gpt2(seed=0), tmp_path / "plain" / "final", tmp_path / "shared" / "final", lr=1e-3,
                         steps=4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_for_compile_leaves_the_log_probs_alone(padding_side):
    from minidpo.runs import padded_to
    tokenizer, model = byte_tokenizer(), model_with("gpt2", "sdpa")
    batch = batch_of(tokenizer, PAIRS, padding_side)
    seen = []
    spy = lambda model, batch, **kwargs: seen.append(batch["chosen_input_ids"].shape[1]) or dpo.concatenated_forward(  # noqa: E731
        model, batch, **kwargs)
    want = dpo.concatenated_forward(model, batch, fast=False)
    for got in (padded_to(spy, 64)(model, batch), shared_prefix_forward(model, batch, multiple=64)):
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    length = batch["chosen_input_ids"].shape[1]
    assert seen == [length + (-length % 64)] and seen[0] % 64 == 0 and seen[0] > length
    packed = pack_pairs(batch, multiple=64)  # prefix sharing pads its packed pairs itself
    assert packed["packed_input_ids"].shape[1] % 64 == 0 and packed["packed_mask"].shape[-1] % 64 == 0
    assert all(packed[f"packed_{side}_{k}"].shape[1] % 64 == 0 for side in ("chosen", "rejected")
               for k in ("positions", "labels"))


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_a_compiled_run_is_the_same_training(tmp_path, prefix_sharing):
    # The "eager" backend: dynamo captures the graphs (what recompiles) without generating code (CI has seconds).
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()  # reset() keeps them: an earlier test's graphs must not count
    plain = run(config(tmp_path, "plain", eval_every=2))
    compiled = run(config(tmp_path, "compiled", eval_every=2, compile="eager", prefix_sharing=prefix_sharing))
    assert counters["stats"]["unique_graphs"] >= 1
    assert losses(compiled) == pytest.approx(losses(plain), abs=1e-5)
    assert_same_training(tiny_gpt2(seed=0), tmp_path / "plain" / "final", tmp_path / "compiled" / "final", lr=1e-3,
                         steps=4)
    torch._dynamo.reset()
