"""The benchmark script: a quick correctness smoke (CI never runs the timing)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench  # noqa: E402


def test_every_minidpo_variant_computes_the_same_first_loss(gpt2_tok):
    gpt2_tok.pad_token = gpt2_tok.eos_token
    cfg = bench.SIZES["tiny"]
    records = bench.synthetic_pairs(gpt2_tok, cfg["pairs"] * 2, cfg["prompt"], cfg["response"])
    variants = [i for i in bench.DEFAULT_IMPLS if i.startswith("minidpo")]
    losses = {impl: bench.run_minidpo(impl, "tiny", 1, 0, records, gpt2_tok)["first_loss"] for impl in variants}
    assert losses["minidpo"] != pytest.approx(0.6931, abs=1e-3)  # policy and reference differ
    assert {"minidpo-prefix-sharing", "minidpo-precomputed-prefix-sharing", "minidpo-separate-forwards"} <= set(losses)
    for impl in variants:
        assert losses[impl] == pytest.approx(losses["minidpo"], abs=1e-5), impl


def test_padding_for_compile_leaves_the_log_probs_alone(gpt2_tok):
    import torch

    from minidpo import dpo, runs
    gpt2_tok.pad_token = gpt2_tok.eos_token
    cfg = bench.SIZES["tiny"]
    records = bench.synthetic_pairs(gpt2_tok, cfg["pairs"], cfg["prompt"], cfg["response"])
    batch = dpo.collate(bench.minidpo_examples("tiny", records, gpt2_tok), gpt2_tok.eos_token_id)
    padded = runs.pad_to_multiple(batch, 64, gpt2_tok.eos_token_id)
    assert padded["chosen_input_ids"].shape[1] % 64 == 0 and padded["chosen_input_ids"].shape[1] >= 64
    model = bench.build("tiny", 0).eval()
    with torch.no_grad():
        for want, got in zip(dpo.concatenated_forward(model, batch), dpo.concatenated_forward(model, padded)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_window_is_timed_once_after_the_warmup():
    import torch
    calls = []
    result = bench.timed(calls.append, steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == [0, 1, 2, 3, 4] and result["step_s"] > 0


def test_minidpo_rows_run_the_training_step_of_a_real_run(gpt2_tok, monkeypatch):
    """dpo.train_step with the hooks of runs.RunSafety: the gradients clipped at TRL's default norm, metrics read
    back every log_every steps, and the first logged loss that of the first batch."""
    from minidpo import dpo
    gpt2_tok.pad_token = gpt2_tok.eos_token
    cfg = bench.SIZES["tiny"]
    records = bench.synthetic_pairs(gpt2_tok, cfg["pairs"] * 2, cfg["prompt"], cfg["response"])
    clipped, reads = [], []
    clip = dpo.torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(dpo.torch.nn.utils, "clip_grad_norm_", lambda p, norm: clipped.append(norm) or clip(p, norm))
    read_back = dpo.read_back
    monkeypatch.setattr(dpo, "read_back", lambda run, every=1: reads.append((run.step, len(run.unwritten)))
                        or read_back(run, every))
    result = bench.run_minidpo("minidpo", "tiny", 3, 2, records, gpt2_tok, log_every=4)
    assert clipped == [1.0] * 5 and bench.minidpo_config("tiny").max_grad_norm == 1.0
    assert reads[:5] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1)]  # step 4 read its 4 rows back, step 5 after
    assert result["first_loss"] != pytest.approx(0.6931, abs=1e-3) and result["step_s"] > 0


def test_trl_rows_keep_the_first_loss_without_logging_every_step(gpt2_tok):
    pytest.importorskip("trl")
    gpt2_tok.pad_token = gpt2_tok.eos_token
    cfg = bench.SIZES["tiny"]
    records = bench.synthetic_pairs(gpt2_tok, cfg["pairs"], cfg["prompt"], cfg["response"])  # one batch: the same
    ours = bench.run_minidpo("minidpo", "tiny", 1, 0, records, gpt2_tok)["first_loss"]
    theirs = bench.run_trl("tiny", 2, 1, records, gpt2_tok, log_every=10)
    assert theirs["first_loss"] == pytest.approx(ours, abs=1e-4) and theirs["step_s"] > 0


def test_bench_runs_and_prints_the_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench.py"), "--size", "tiny", "--rounds", "1",
                             "--steps", "1", "--warmup", "1", "--impl", "minidpo", "minidpo-prefix-sharing",
                             "--profile"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs/s" in result.stdout and "minidpo-prefix-sharing" in result.stdout
    assert result.stdout.count("under torch.profiler") == 2 and "aten::" in result.stdout


def test_workload_flops_count_the_lm_head_only_where_the_loss_needs_it():
    model = bench.build("tiny", 0)
    cfg = model.config
    wte, wpe = model.transformer.wte.weight.numel(), model.transformer.wpe.weight.numel()
    body = sum(p.numel() for p in model.parameters()) - wte - wpe  # lm_head is tied to wte
    ignore = -100
    example = {"chosen_input_ids": list(range(10)), "chosen_labels": [ignore] * 6 + list(range(6, 10)),
               "rejected_input_ids": list(range(8)), "rejected_labels": [ignore] * 6 + [6, 7]}

    def forward(length, lm_head_positions):
        return length * (2 * body + 4 * cfg.n_layer * length * cfg.n_embd) + lm_head_positions * 2 * wte

    live = bench.workload_flops(model, [example], pairs_per_step=3)
    precomputed = bench.workload_flops(model, [example], pairs_per_step=3, reference_forward=False)
    assert live["tokens"] == precomputed["tokens"] == 3 * (10 + 8)
    # policy forward + backward: 3 forwards; the lm_head at every token, or only at the 4 + 2 predicted ones
    assert precomputed["flops"] == 3 * 3 * (forward(10, 10) + forward(8, 8))
    assert precomputed["needed_flops"] == 3 * 3 * (forward(10, 4) + forward(8, 2))
    assert live["flops"] == precomputed["flops"] * 4 / 3  # + the reference forward
    assert live["needed_flops"] == precomputed["needed_flops"] * 4 / 3


def test_reuse_memory_sets_glibc_to_keep_freed_memory_in_every_worker(monkeypatch, capsys):
    seen = []
    row = {"step_s": 1.0, "first_loss": 0.7, "flops": 1e9, "needed_flops": 1e9, "tokens": 100, "peak_rss_mb": 1,
           "ceiling": 1e10}

    def fake_run(command, env, **kwargs):
        seen.append(env.get("GLIBC_TUNABLES"))
        return subprocess.CompletedProcess(command, 0, stdout="RESULT " + bench.json.dumps(row), stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "matmul_ceiling", lambda *args, **kwargs: 1e10)
    bench.main(["--size", "tiny", "--rounds", "1", "--impl", "minidpo", "--reuse-memory"])
    bench.main(["--size", "tiny", "--rounds", "1", "--impl", "minidpo"])
    assert seen == [bench.REUSE_MEMORY, None]
    assert "memory reused (--reuse-memory)" in capsys.readouterr().out
