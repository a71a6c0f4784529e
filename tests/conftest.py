# The environment (offline, smoke scale) is set in the repository's root conftest.py.
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

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


def dropout_gpt2(p=0.5):
    """A tiny GPT-2 with dropout p everywhere (what paper-scale models have), and the byte tokenizer."""
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_head=2, n_embd=32, resid_pdrop=p, embd_pdrop=p,
                        attn_pdrop=p, bos_token_id=256, eos_token_id=256)
    return GPT2LMHeadModel(config), tokenizer
