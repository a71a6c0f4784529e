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
    losses = {impl: bench.run_minidpo(impl, "tiny", 1, 0, records, gpt2_tok)["first_loss"]
              for impl in ("minidpo", "minidpo-precomputed-ref", "minidpo-separate-forwards")}
    assert losses["minidpo"] != pytest.approx(0.6931, abs=1e-3)  # policy and reference differ
    assert losses["minidpo-precomputed-ref"] == pytest.approx(losses["minidpo"], abs=1e-5)
    assert losses["minidpo-separate-forwards"] == pytest.approx(losses["minidpo"], abs=1e-5)


def test_bench_runs_and_prints_the_table():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench.py"), "--size", "tiny", "--rounds", "1",
                             "--steps", "1", "--warmup", "0", "--impl", "minidpo", "minidpo-precomputed-ref"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pairs/s" in result.stdout and "minidpo-precomputed-ref" in result.stdout
