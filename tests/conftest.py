# The environment (offline, smoke scale) is set in the repository's root conftest.py.
import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from minidpo import runs
from minidpo.models import byte_tokenizer, gpt2_tokenizer, save_tiny, tiny_gpt2, tiny_neox

hf_logging.disable_progress_bar()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tok():
    return gpt2_tokenizer()


@pytest.fixture(params=["gpt2", "neox"])
def tiny_model(request):
    model = (tiny_gpt2 if request.param == "gpt2" else tiny_neox)(vocab_size=257, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny-gpt2")), arch="gpt2", seed=0)


def toy_records(n=32, seed=0):
    """A separable toy preference set: the chosen response always says 'good', the rejected 'bad'."""
    import random
    rng = random.Random(seed)
    subjects = ["The film", "This movie", "The plot", "The acting", "The ending", "The score", "It", "Overall it"]
    records = []
    for i in range(n):
        prompt = f"{rng.choice(subjects)} #{i} was"
        records.append({"prompt": prompt, "chosen": " good, really good.", "rejected": " bad, really bad."})
    return records


# ---- a DPO run on the toy set (the training tests' helpers) -----------------------------------------------

def config(tmp_path, name="run", **overrides):
    base = dict(out=str(tmp_path / name), batch_size=8, lr=1e-3, optimizer="adamw", warmup_steps=2,
                max_steps=4, eval_every=2, eval_size=0, max_length=64, max_prompt_length=32, progress=False)
    base.update(overrides)
    return runs.RunConfig(**base)


def run(cfg, records=None, eval_records=None, seed=0, callback=None):
    records = toy_records(32) if records is None else records
    eval_records = toy_records(8, seed=1) if eval_records is None else eval_records
    return runs.train(cfg, records, eval_records, model=tiny_gpt2(seed=seed), tokenizer=byte_tokenizer(),
                      callback=callback)


def read_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(rows, split="train"):
    return [r["loss"] for r in rows if r["split"] == split]


def dropout_gpt2(p=0.5):
    """A tiny GPT-2 with dropout p everywhere (what paper-scale models have), and the byte tokenizer."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=32, resid_pdrop=p, embd_pdrop=p,
                        attn_pdrop=p, bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(config), tokenizer


# ---- parity of two trainings that agree in exact arithmetic ------------------------------------------------------
# How the tolerances were chosen. Two runs that are equal in exact arithmetic (2 DDP ranks vs one process, two
# micro-batches vs one, a resumed run on another path) add their gradients in a different order, so they differ
# by float round-off, and by how much depends on the CPU (its SIMD width, the thread count) — CI runs on one machine,
# users on others. Adam and RMSprop divide each gradient by its running RMS: where the exact gradient is zero (a
# parameter the loss does not depend on, such as attention's key bias) the update is round-off / round-off, up to
# ~0.1 lr per step, different in the two runs. So parity is judged in units of the update and of the learning rate,
# never of float epsilon:
#   ||W_a - W_b|| <= 1e-4 ||W_a - W_0||    the update as a whole agrees
#   max |W_a - W_b| <= 0.5 lr x steps      no single weight is off by half a step per step
# Measured on a 2-core AMD EPYC (2026-12-04), every parity test: at most 8.5e-6 of the update and 0.004 lr x steps.
# The real bugs these tests exist for are far outside: test_parity_check_catches_real_bugs (test_train.py) injects
# two (a micro-batch trained on another's pairs; resume without the optimizer's state): 0.28 and 0.39 of the
# update, and up to 1.3 lr x steps on one weight.
# Exact equality (torch.equal, ==) is kept only where both runs execute the same operations in the same order on
# the same machine and thread count (a resumed run vs an uninterrupted one in one process): there any difference
# is a bug, not round-off.

def flat_weights(model_or_folder):
    """Every parameter of a model (or of a saved folder), flattened into one fp64 vector."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM
        model_or_folder = AutoModelForCausalLM.from_pretrained(model_or_folder)
    return torch.cat([p.detach().double().flatten() for p in model_or_folder.parameters()])


def parity(start, a, b):
    """(||a - b|| / ||a - start||, max |a - b|): how far two trainings from `start` ended apart."""
    start, a, b = (w if isinstance(w, torch.Tensor) else flat_weights(w) for w in (start, a, b))
    update = (a - start).norm().item()
    assert update > 0, "the weights did not move: a parity check needs a run that trains"
    return (b - a).norm().item() / update, (b - a).abs().max().item()


def assert_same_training(start, a, b, lr, steps):
    """Two trainings from `start` that are equal in exact arithmetic ended at the same weights, up to round-off
    (the tolerances are explained above). start, a, b: models, saved folders or flat weight vectors."""
    relative, worst = parity(start, a, b)
    assert relative <= 1e-4, f"||W_a - W_b|| is {relative:.2e} of the update (round-off is <= 1e-4)"
    assert worst <= 0.5 * lr * steps, f"a weight differs by {worst:.2e}, over half a step per step ({lr} x {steps})"
