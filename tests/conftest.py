# The environment (offline, smoke scale) is set in the repository's root conftest.py.
import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from minidpo import dpo
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
    return dpo.TrainConfig(**base)


def run(cfg, records=None, eval_records=None, seed=0):
    records = toy_records(32) if records is None else records
    eval_records = toy_records(8, seed=1) if eval_records is None else eval_records
    return dpo.train(cfg, records, eval_records, model=tiny_gpt2(seed=seed), tokenizer=byte_tokenizer())


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
