"""The core of minidpo/dpo.py, each claim against an oracle (pitfalls 1-9 and 12 of PAPER.md)."""

import ast
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minidpo
from minidpo.dpo import IGNORE_INDEX, frozen_copy, position_ids_from_mask


def random_batch(vocab=257, B=3, T=12, prompt_lens=(3, 5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (B, T), generator=g)
    labels = ids.clone()
    for b, p in enumerate(prompt_lens):
        labels[b, :p] = IGNORE_INDEX
    return ids, labels


# ---- pitfall 3: the shift, and the sum ----------------------------------------------------------

def test_summed_logps_equal_minus_n_times_hf_loss(tiny_model):
    ids, labels = random_batch()
    with torch.no_grad():
        logits = tiny_model(ids).logits
        ours = minidpo.sequence_logps(logits, labels)
        for b in range(ids.shape[0]):
            hf_mean_loss = tiny_model(ids[b:b + 1], labels=labels[b:b + 1]).loss  # HF shifts internally
            n = (labels[b, 1:] != IGNORE_INDEX).sum()
            torch.testing.assert_close(ours[b], -n * hf_mean_loss, rtol=1e-5, atol=1e-5)


def test_average_is_sum_over_response_tokens(tiny_model):
    ids, labels = random_batch()
    with torch.no_grad():
        logits = tiny_model(ids).logits
    n = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    torch.testing.assert_close(minidpo.sequence_logps(logits, labels, average=True),
                               minidpo.sequence_logps(logits, labels) / n)


def test_repeating_a_response_doubles_the_sum_not_the_average():
    # A context-free (unigram) model: every position has the same logits, so log pi(y y | x) = 2 log pi(y | x).
    torch.manual_seed(0)
    V = 11
    unigram = torch.randn(V)
    prompt, response = [1, 2, 3], [4, 7, 9, 4]

    def logps(resp, average):
        ids = torch.tensor([prompt + resp])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + resp])
        logits = unigram.expand(1, ids.shape[1], V)
        return minidpo.sequence_logps(logits, labels, average=average)

    torch.testing.assert_close(logps(response * 2, False), 2 * logps(response, False))
    torch.testing.assert_close(logps(response * 2, True), logps(response, True))
    assert not torch.allclose(logps(response * 2, False), logps(response, False))


def test_prompt_and_padding_positions_do_not_count():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX]])
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts position 1, a prompt token
    changed[0, 4:] = float("nan")  # predict padding; NaN must not leak into the sum
    expected = logits.log_softmax(-1)[0, 1, 3] + logits.log_softmax(-1)[0, 2, 1]
    torch.testing.assert_close(minidpo.sequence_logps(logits, labels)[0], expected)
    torch.testing.assert_close(minidpo.sequence_logps(changed, labels)[0], expected)


def test_plain_token_logps_is_log_softmax_then_gather():
    torch.manual_seed(0)
    _, labels = random_batch(vocab=13, B=3, T=7, prompt_lens=(2, 3, 4))
    logits = torch.randn(3, 7, 13, dtype=torch.float64)
    ours, mask = minidpo.dpo.token_logps(logits, labels)
    for b, t in zip(*torch.nonzero(mask, as_tuple=True)):
        expected = logits[b, t].log_softmax(-1)[labels[b, t + 1]]
        torch.testing.assert_close(ours[b, t], expected)
    assert (ours[~mask] == 0).all() and (mask == (labels[:, 1:] != IGNORE_INDEX)).all()


def test_fast_token_logps_equals_the_plain_path_in_values_and_gradients():
    # The appendix's log_softmax_at has a hand-written backward (the vocabulary-sized tensors are a
    # small model's largest): its values and gradient must be the plain path's (log_softmax + gather,
    # autograd), and a NaN padding row must get zero gradient, not NaN.
    torch.manual_seed(0)
    ids, labels = random_batch(vocab=13, B=3, T=7, prompt_lens=(2, 3, 4))
    labels[2, 5:] = IGNORE_INDEX  # padding at the end of row 2
    logits = torch.randn(3, 7, 13, dtype=torch.float64)
    weights = torch.randn(3, 6, dtype=torch.float64)  # an arbitrary upstream gradient per position

    ours_in, oracle_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, mask = minidpo.dpo.token_logps(ours_in, labels, fast=True)
    plain, plain_mask = minidpo.dpo.token_logps(oracle_in, labels)
    torch.testing.assert_close(ours, plain)
    assert torch.equal(mask, plain_mask)
    (ours * weights).sum().backward()
    (plain * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, oracle_in.grad)

    nan_in = logits.clone()
    nan_in[2, 5:] = float("nan")  # padding rows whose logits are NaN
    nan_in.requires_grad_()
    ours, _ = minidpo.dpo.token_logps(nan_in, labels, fast=True)
    (ours * weights).sum().backward()
    assert torch.isfinite(nan_in.grad).all()
    torch.testing.assert_close(nan_in.grad[:2], oracle_in.grad[:2])
    assert nan_in.grad[2, 5:].abs().sum() == 0

    # overwrite=True (logits nobody else reads, as in concatenated_forward): the same gradient,
    # written into the logits' own memory; autograd refuses a second backward through it.
    owned = logits.clone().requires_grad_()
    scratch = owned * 1.0  # a non-leaf tensor standing for the model's output logits
    ours, _ = minidpo.dpo.token_logps(scratch, labels, fast=True, overwrite=True)
    (ours * weights).sum().backward(retain_graph=True)
    torch.testing.assert_close(owned.grad, oracle_in.grad)
    with pytest.raises(RuntimeError, match="inplace"):
        (ours * weights).sum().backward()


# ---- pitfall 4: one forward, padded, equals the per-example computation -------------------------

@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_concatenated_forward_equals_unpadded_per_example(tiny_model, tokenizer, padding_side):
    pairs = [("The film", " was wonderful.", " was a dull mess from start to end."),
             ("A much longer prompt about a movie that", " works.", " does not work at all, sadly."),
             ("Hi", " there, friend", " go away")]
    examples = [minidpo.tokenize_pair(tokenizer, *p) for p in pairs]
    batch = minidpo.collate(examples, tokenizer.pad_token_id, padding_side=padding_side)
    with torch.no_grad():
        chosen, rejected = minidpo.concatenated_forward(tiny_model, batch)
        for b, ex in enumerate(examples):
            for kind, got in (("chosen", chosen[b]), ("rejected", rejected[b])):
                ids = torch.tensor([ex[f"{kind}_input_ids"]])
                labels = torch.tensor([ex[f"{kind}_labels"]])
                expected = minidpo.sequence_logps(tiny_model(ids).logits, labels)[0]
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


# ---- pitfalls 7 and 9: the loss at initialisation, rewards include beta ---------------------------

def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tiny_model, tokenizer):
    reference = frozen_copy(tiny_model)
    examples = [minidpo.tokenize_pair(tokenizer, f"prompt {i}", f" yes {i}", f" no {'!' * i}") for i in range(4)]
    batch = minidpo.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        pc, pr = minidpo.concatenated_forward(tiny_model, batch)
        rc, rr = minidpo.concatenated_forward(reference, batch)
    losses, cr, rr_ = minidpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)))
    assert cr.abs().max() == 0 and rr_.abs().max() == 0
    metrics = minidpo.preference_metrics(losses, cr, rr_, pc, pr)
    assert metrics["rewards/accuracy"].item() == 0.5  # ties count one half
    assert metrics["rewards/margin"].item() == 0.0


# ---- the loss variants on hand-computed numbers ---------------------------------------------------

PC, PR, RC, RR, BETA = -1.0, -3.0, -2.0, -2.5, 0.5  # log-ratios: chosen +1, rejected -0.5, margin 1.5


def loss_of(**kwargs):
    t = lambda x: torch.tensor([x])  # noqa: E731
    kwargs.setdefault("beta", BETA)
    losses, cr, rr = minidpo.dpo_loss(t(PC), t(PR), t(RC), t(RR), **kwargs)
    return losses.item(), cr.item(), rr.item()


def test_sigmoid_loss_and_rewards_by_hand():
    loss, cr, rr = loss_of()
    h = 0.5 * 1.5
    assert loss == pytest.approx(math.log(1 + math.exp(-h)))
    assert (cr, rr) == (pytest.approx(0.5 * 1.0), pytest.approx(0.5 * -0.5))  # beta is in the reward


def test_cdpo_by_hand():
    eps, h = 0.2, 0.75
    loss, _, _ = loss_of(label_smoothing=eps)
    assert loss == pytest.approx((1 - eps) * math.log(1 + math.exp(-h)) + eps * math.log(1 + math.exp(h)))


def test_ipo_by_hand():
    loss, _, _ = loss_of(loss_type="ipo")
    assert loss == pytest.approx((1.5 - 1 / (2 * BETA)) ** 2)  # = 0.25


def test_hinge_by_hand():
    loss, _, _ = loss_of(loss_type="hinge")
    assert loss == pytest.approx(max(0.0, 1 - 0.75))


def test_reference_free_by_hand():
    loss, cr, rr = loss_of(reference_free=True)
    h = 0.5 * (PC - PR)
    assert loss == pytest.approx(math.log(1 + math.exp(-h)))
    assert (cr, rr) == (pytest.approx(0.5 * PC), pytest.approx(0.5 * PR))


@pytest.mark.parametrize("kwargs", [dict(loss_type="dpo"), dict(beta=0.0), dict(beta=-1.0),
                                    dict(label_smoothing=0.5), dict(label_smoothing=-0.1)])
def test_bad_loss_arguments(kwargs):
    with pytest.raises(ValueError):
        loss_of(**kwargs)


def test_preference_metrics_by_hand():
    cr, rr = torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([0.0, 0.0, 0.5, 2.0])
    m = minidpo.preference_metrics(torch.ones(4), cr, rr, torch.tensor([-1.0] * 4), torch.tensor([-3.0] * 4))
    assert m["rewards/accuracy"].item() == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert m["rewards/margin"].item() == pytest.approx((1 - 1 + 0 - 2) / 4)
    assert m["logps/rejected"].item() == -3.0


# ---- Section 4: the gradient ---------------------------------------------------------------------

def test_autograd_gradient_equals_the_papers_formula(tokenizer):
    policy = minidpo.models.tiny_gpt2(seed=1)
    reference = frozen_copy(minidpo.models.tiny_gpt2(seed=2))  # differs, so the weights are not all 1/2
    beta = 0.7
    examples = [minidpo.tokenize_pair(tokenizer, f"prompt {i}:", f" chosen {i} " * (i + 1), f" rejected {i}")
                for i in range(4)]
    batch = minidpo.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        rc, rr = minidpo.concatenated_forward(reference, batch)
    params = [p for p in policy.parameters()]

    pc, pr = minidpo.concatenated_forward(policy, batch)
    losses, cr, rrw = minidpo.dpo_loss(pc, pr, rc, rr, beta=beta)
    autograd = torch.autograd.grad(losses.mean(), params)

    # -beta E[ sigma(r_l - r_w) (grad log pi(y_w) - grad log pi(y_l)) ], the weights held constant
    weights = minidpo.gradient_weights(cr, rrw)
    assert weights.std() > 0.01
    pc, pr = minidpo.concatenated_forward(policy, batch)
    formula = torch.autograd.grad(-beta * (weights * (pc - pr)).mean(), params)
    for a, f in zip(autograd, formula):
        torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-7)


def test_gradient_weights_are_sigmoid_of_the_reward_gap():
    w = minidpo.gradient_weights(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(w, torch.tensor([1 / (1 + math.exp(2)), 0.5]))


# ---- pitfalls 1, 5, 12: tokenisation --------------------------------------------------------------

def test_boundary_prompt_and_response_tokenised_separately(gpt2_tok):
    prompt, chosen, rejected = "The movie was ", "great", "awful"
    ex = minidpo.tokenize_pair(gpt2_tok, prompt, chosen, rejected)
    prompt_ids = gpt2_tok(prompt)["input_ids"]
    n = len(prompt_ids)
    assert ex["chosen_input_ids"][:n] == prompt_ids == ex["rejected_input_ids"][:n]
    assert ex["chosen_labels"][:n] == [IGNORE_INDEX] * n
    response = ex["chosen_labels"][n:]
    assert gpt2_tok.decode(response) == chosen + gpt2_tok.eos_token  # exactly the response, then EOS
    # Tokenising prompt + response together merges " great" into one token: the boundary moves.
    joint = gpt2_tok(prompt + chosen)["input_ids"]
    assert joint[:n] != prompt_ids


def test_eos_ends_every_response(tokenizer):
    ex = minidpo.tokenize_pair(tokenizer, "Q:", " yes", " no")
    for kind in ("chosen", "rejected"):
        assert ex[f"{kind}_input_ids"][-1] == tokenizer.eos_token_id
        assert ex[f"{kind}_labels"][-1] == tokenizer.eos_token_id


def test_truncation_trims_the_prompt_from_the_left_then_the_response(tokenizer):
    prompt = "".join(chr(ord("a") + i % 26) for i in range(40))
    ex = minidpo.tokenize_pair(tokenizer, prompt, " " + "x" * 30, " y", max_length=32, max_prompt_length=10)
    kept_prompt = tokenizer(prompt[-10:])["input_ids"]
    assert ex["chosen_input_ids"][:10] == kept_prompt == ex["rejected_input_ids"][:10]  # the end is kept
    assert len(ex["chosen_input_ids"]) == 32  # response cut from the right to fit...
    assert ex["chosen_labels"][10:-1] == tokenizer(" " + "x" * 20)["input_ids"]
    assert ex["chosen_labels"][-1] == tokenizer.eos_token_id  # ...keeping its EOS
    assert ex["rejected_labels"][10:] == tokenizer(" y")["input_ids"] + [tokenizer.eos_token_id]


def test_short_pairs_are_not_truncated(tokenizer):
    prompt = "p" * 20
    ex = minidpo.tokenize_pair(tokenizer, prompt, " a", " b", max_length=64, max_prompt_length=4)
    assert ex["chosen_input_ids"][:20] == tokenizer(prompt)["input_ids"]


def test_collate_masks_padding_by_length_even_when_pad_is_eos(tokenizer):
    examples = [minidpo.tokenize_pair(tokenizer, "ab", " c", " dd"), minidpo.tokenize_pair(tokenizer, "a", " c", " d")]
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    batch = minidpo.collate(examples, eos)
    T = 6  # "ab" + " dd" + EOS, the longest of chosen and rejected: one T for both
    assert batch["chosen_input_ids"].shape == batch["rejected_labels"].shape == (2, T)
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert batch["chosen_input_ids"][0, 4] == batch["chosen_input_ids"][0, 5] == eos
    assert batch["chosen_labels"][0, 4] == eos  # a real EOS is attended to and predicted...
    # ...padding is not
    assert batch["chosen_labels"].tolist()[1] == [IGNORE_INDEX, 32, 99, eos, IGNORE_INDEX, IGNORE_INDEX]
    left = minidpo.collate(examples, eos, padding_side="left")
    assert left["rejected_attention_mask"].tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    assert left["rejected_labels"][1, 0] == IGNORE_INDEX


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,chosen,rejected,match", [
    ("", " a", " b", "'prompt' is empty"),
    ("x", "   ", " b", "'chosen' is empty"),
    ("x", " a", "", "'rejected' is empty"),
    ("x", " same", " same", "identical"),
    ("x", 3, " b", "'chosen' must be a string"),
    (None, " a", " b", "missing field 'prompt'"),
])
def test_bad_pairs_raise_value_error_naming_the_field(tokenizer, prompt, chosen, rejected, match):
    with pytest.raises(ValueError, match=match):
        minidpo.tokenize_pair(tokenizer, prompt, chosen, rejected)


def test_max_prompt_length_must_be_below_max_length(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length"):
        minidpo.tokenize_pair(tokenizer, "x", " a", " b", max_length=8, max_prompt_length=8)


def test_prompt_that_leaves_no_room_for_a_response(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        minidpo.tokenize_pair(tokenizer, "p" * 50, " a", " b", max_length=11, max_prompt_length=10)


def test_tokenize_records_names_every_bad_record(tokenizer):
    records = [{"prompt": "a", "chosen": " b", "rejected": " c"},
               {"prompt": "a", "chosen": " b"},
               {"prompt": "a", "chosen": " b", "rejected": " b"},
               {"prompt": "a", "chosen": " x", "rejected": " y"}]
    with pytest.raises(ValueError) as err:
        minidpo.tokenize_records(tokenizer, records)
    text = str(err.value)
    assert "2 of 4 records" in text and "record 1: missing field 'rejected'" in text and "record 2:" in text
    examples, kept = minidpo.tokenize_records(tokenizer, records, skip_invalid=True)
    assert kept == [0, 3] and len(examples) == 2


# ---- the core file stands alone -------------------------------------------------------------------

def core_path():
    return os.path.join(os.path.dirname(minidpo.__file__), "dpo.py")


def test_core_imports_only_torch_transformers_and_the_standard_library():
    tree = ast.parse(open(core_path()).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "transformers", "tqdm"}


def test_core_copied_alone_computes_a_loss_and_a_step(tmp_path):
    shutil.copy(core_path(), tmp_path / "dpo.py")
    script = """
import os, sys, torch
sys.modules["minidpo"] = None  # any import of the package from dpo.py now fails: it must stand alone
import dpo
assert os.path.dirname(os.path.abspath(dpo.__file__)) == os.getcwd()  # the copy, not the package's file
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
policy = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_head=1, n_embd=16, n_positions=32))
dpo.disable_dropout(policy)
reference = dpo.frozen_copy(policy)
ex = {"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4],
      "rejected_input_ids": [1, 2, 5, 6, 7], "rejected_labels": [-100, -100, 5, 6, 7]}
batch = dpo.collate([ex, ex], pad_token_id=0)
pc, pr = dpo.concatenated_forward(policy, batch)
with torch.no_grad():
    rc, rr = dpo.concatenated_forward(reference, batch)
losses, _, _ = dpo.dpo_loss(pc, pr, rc, rr)
assert abs(losses.mean().item() - 0.6931) < 1e-3
before = policy.lm_head.weight.detach().clone()
losses.mean().backward()
torch.optim.SGD(policy.parameters(), lr=1.0).step()
assert not torch.equal(before, policy.lm_head.weight)
print("ok", losses.mean().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


ALONE_RUN = """
import json, os, sys
sys.modules["minidpo"] = None  # the package is out of reach: dpo.py must train on its own
import dpo
records = [{"prompt": f"Review {i}:", "chosen": " good, really good.", "rejected": " bad, really bad."}
           for i in range(16)]
config = dpo.TrainConfig(model=sys.argv[1], out=sys.argv[2], batch_size=4, grad_accum=2, max_steps=4, lr=1e-3,
                         optimizer="adamw", warmup_steps=0, eval_every=2, max_length=64, max_prompt_length=32,
                         progress=False)
dpo.train(config, records, records[:4])
"""


# A known, unfixed race: now and then rank 1 aborts at interpreter exit with this message after a run under torchrun
# has finished and saved (seen in 3 of ~10 fresh-clone CI runs of 2026-12-03/04, here and in test_cli's SIGTERM test;
# leaving the process group at exit did not stop it). The run's results are complete; the exit status is not.
TEARDOWN_ABORT = "terminate called without an active exception"


def test_core_copied_alone_trains_on_one_process_and_under_torchrun(tmp_path, tiny_model_dir):
    """dpo.py in an empty folder, with only torch and transformers: train() loads the model from config.model,
    trains, logs and saves <out>/final; under torchrun with 2 ranks it logs what one process logs."""
    shutil.copy(core_path(), tmp_path / "dpo.py")
    (tmp_path / "run.py").write_text(ALONE_RUN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    launchers = {"single": [sys.executable], "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc_per_node=2"]}
    rows = {}
    for name, launcher in launchers.items():
        for attempt in range(2):
            result = subprocess.run([*launcher, "run.py", tiny_model_dir, name], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
            if TEARDOWN_ABORT not in result.stderr:
                break  # else a rank aborted at exit, after the run (TEARDOWN_ABORT): once more
        assert result.returncode == 0, result.stderr[-4000:]
        assert (tmp_path / name / "final" / "config.json").exists()
        rows[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    assert [(r["step"], r["split"]) for r in rows["single"]] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
    assert rows["single"][-1]["loss"] < math.log(2) - 0.05  # it learned: the eval loss fell from ln 2
    for a, b in zip(rows["single"], rows["ddp"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["split"])

@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_freeze_all_but_top_trains_the_top_blocks_and_the_final_norm_only(arch):
    # NeoX and Llama name their blocks' norms *_layernorm: only the norm outside the blocks is the final one.
    from minidpo.models import freeze_all_but_top, tiny_gpt2, tiny_neox
    model = freeze_all_but_top(tiny_gpt2(n_layer=3) if arch == "gpt2" else tiny_neox(num_hidden_layers=3), 1)
    trained = {name.split(".weight")[0].split(".bias")[0] for name, p in model.named_parameters() if p.requires_grad}
    top = "transformer.h.2" if arch == "gpt2" else "gpt_neox.layers.2"
    final = "transformer.ln_f" if arch == "gpt2" else "gpt_neox.final_layer_norm"
    assert final in trained and all(name.startswith(top) or name == final for name in trained), trained


def test_implicit_reward_scores_are_the_losss_own_rewards(tokenizer):
    from minidpo.models import tiny_gpt2
    torch.manual_seed(0)
    reference = minidpo.dpo.frozen_copy(tiny_gpt2())
    policy = tiny_gpt2()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a trained policy: rewards are not 0
    pairs = [("The film was", " good.", " bad, really."), ("Q: 2+2?\nA:", " 4", " five, I think")]
    batch = minidpo.collate([minidpo.tokenize_pair(tokenizer, *pair) for pair in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        policy_logps = minidpo.concatenated_forward(policy, batch)
        reference_logps = minidpo.concatenated_forward(reference, batch)
        _, chosen_rewards, rejected_rewards = minidpo.dpo_loss(*policy_logps, *reference_logps, beta=0.3)
    prompts = [prompt for prompt, _, _ in pairs]
    for side, rewards in ((1, chosen_rewards), (2, rejected_rewards)):
        scores = minidpo.implicit_reward_scores(policy, reference, tokenizer, prompts, [p[side] for p in pairs],
                                                beta=0.3, batch_size=1)
        torch.testing.assert_close(scores, rewards, rtol=1e-4, atol=1e-5)
    one_prompt = minidpo.implicit_reward_scores(policy, reference, tokenizer, "The film was",
                                                [" good.", " bad, really."], beta=0.3)
    torch.testing.assert_close(one_prompt, torch.stack([chosen_rewards[0], rejected_rewards[0]]), rtol=1e-4, atol=1e-5)
    assert chosen_rewards.abs().min() > 1e-3
