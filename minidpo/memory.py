"""How much memory a run needs: an estimate from the config, and a measurement on any device.

The estimate adds up, per stage (SFT, sampling, DPO, ...), what is alive at its peak:

    weights        every parameter, fp32 (bf16 autocast computes in bf16 but keeps fp32 master weights)
    weight copies  under bf16 autocast, the bf16 copy of each trained weight, saved for the backward
    gradients      fp32, one per trained parameter
    optimizer      AdamW: two fp32 moments per trained parameter; RMSprop: one
    activations    what the forward saves for the backward, per token and layer (below)
    logits         (sequences, tokens, vocabulary): the lm_head's output and its fp32 copy
    kv cache       sampling: keys and values of every layer for every token so far

Activations of a GPT-NeoX block (Pythia's architecture), in elements per token: the block's input
(h), the first layer norm's output (h), q, k, v (3h) and the rotated q, k (2h), the attention output
and its re-laid-out copy (2h), the second layer norm's output (h), the MLP's up-projection and its
GELU (2 x intermediate): 10h + 2i. With gradient checkpointing a block keeps only its input and
recomputes the rest in the backward, one block at a time. The residual stream stays fp32 under
autocast; the rest is bf16. Calibrated on GPT-NeoX (tested against a measured peak); other
architectures use the same count, an approximation.

PeakMemory measures the same quantity on any device, the CPU included: the bytes of live tensors,
followed through every operation (a CPU stand-in for torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GB = 1e9
FP32, BF16 = 4, 2

# EleutherAI/pythia-2.8b's config.json, for estimates without the hub (the paper's TL;DR and HH model).
PYTHIA_2_8B = dict(model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   intermediate_size=10240, vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25,
                   use_parallel_residual=True, tie_word_embeddings=False)
KNOWN_CONFIGS = {"EleutherAI/pythia-2.8b": PYTHIA_2_8B}


# ---- the model's shape ---------------------------------------------------------------------------

@dataclass
class Shape:
    params: int  # every parameter
    trained: int  # the parameters that train
    layers: int
    trained_layers: int  # the top blocks that train: only they save activations for the backward
    hidden: int
    intermediate: int
    vocab: int


def model_config(name):
    """A transformers config for a hub name or folder: from its config.json, or the table above offline."""
    from transformers import AutoConfig, GPTNeoXConfig
    if name in KNOWN_CONFIGS:
        fields = dict(KNOWN_CONFIGS[name])
        fields.pop("model_type")
        return GPTNeoXConfig(**fields)
    return AutoConfig.from_pretrained(name)


def shape_of(config, train_layers=0):
    """Shape from a transformers config; parameters counted on an empty (meta-device) model."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    trained = params
    layers = config.num_hidden_layers
    if train_layers:
        blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)][0]
        trained = sum(p.numel() for block in blocks[-train_layers:] for p in block.parameters())
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return Shape(params, trained, layers, min(train_layers or layers, layers), hidden, intermediate, config.vocab_size)


# ---- the estimate --------------------------------------------------------------------------------

def activation_bytes(shape, tokens, bf16, checkpointing):
    """Saved for the backward by the forward over `tokens` tokens (all sequences together)."""
    width = FP32 if not bf16 else BF16
    block = tokens * ((10 * shape.hidden + 2 * shape.intermediate) * width + (FP32 - width) * shape.hidden)
    stream = tokens * shape.hidden * FP32  # a block's input: the fp32 residual stream
    ends = 3 * stream  # embeddings and the final layer norm
    if checkpointing:
        return shape.trained_layers * stream + block + ends  # every block's input, and one block recomputed
    return shape.trained_layers * block + ends


def logits_bytes(shape, tokens, bf16):
    """The lm_head's output (bf16 under autocast) and the fp32 copy the log-softmax reads; its gradient
    is written into that copy."""
    return tokens * shape.vocab * (FP32 + (BF16 if bf16 else 0))


def training(shape, sequences, length, bf16=False, checkpointing=False, optimizer="adamw"):
    """Peak of a training step on micro-batches of `sequences` sequences of `length` tokens, during a
    later micro-batch of an accumulated step (the gradients of the earlier ones are alive)."""
    tokens = sequences * length
    return {"weights": shape.params * FP32,
            "weight copies": shape.trained * BF16 if bf16 else 0,
            "gradients": shape.trained * FP32,
            "optimizer": shape.trained * FP32 * (2 if optimizer == "adamw" else 1),
            "activations": activation_bytes(shape, tokens, bf16, checkpointing),
            "logits": logits_bytes(shape, tokens, bf16)}


def inference(shape, sequences, length, bf16=False, copies=1, hidden_states=False):
    """Peak of a no-grad forward (`copies` models held, e.g. policy and reference): one block's
    working set at a time, the logits, and every layer's output when hidden_states is asked for."""
    tokens = sequences * length
    width = BF16 if bf16 else FP32
    working = tokens * (4 * shape.hidden + 2 * shape.intermediate) * width
    kept = (shape.layers + 1) * tokens * shape.hidden * FP32 if hidden_states else 0
    return {"weights": copies * shape.params * FP32, "weight copies": shape.params * BF16 if bf16 else 0,
            "activations": working + kept, "logits": logits_bytes(shape, tokens, bf16)}


def generation(shape, sequences, prompt_length, new_tokens, bf16=False):
    """Peak of sampling `sequences` completions at once: the KV cache of every token, the prompt's
    forward (logits of its last position only)."""
    width = BF16 if bf16 else FP32
    total = prompt_length + new_tokens
    return {"weights": shape.params * FP32, "weight copies": shape.params * BF16 if bf16 else 0,
            "kv cache": 2 * shape.layers * sequences * total * shape.hidden * width,
            "activations": sequences * prompt_length * (4 * shape.hidden + 2 * shape.intermediate) * width,
            "logits": sequences * shape.vocab * FP32}


def total(parts):
    return sum(parts.values())


def format_estimate(stages, budget=80 * GB):
    """A table of each stage's components (GB, or MB when the peak is under 1 GB) and whether the
    largest total fits `budget` bytes (None: no verdict)."""
    names = list(dict.fromkeys(k for parts in stages.values() for k in parts))
    peak = max(total(parts) for parts in stages.values())
    unit, size = ("GB", GB) if peak >= GB else ("MB", 1e6)
    lines = [f"{'stage (' + unit + ')':24s}" + "".join(f"{n:>14s}" for n in names) + f"{'total':>10s}"]
    for stage, parts in stages.items():
        lines.append(f"{stage:24s}" + "".join(f"{parts.get(n, 0) / size:14.1f}" for n in names)
                     + f"{total(parts) / size:10.1f}")
    verdict = "" if budget is None else f": {'fits' if peak <= budget else 'does NOT fit'} in {budget / GB:.0f} GB"
    lines.append(f"peak {peak / size:.1f} {unit}{verdict} (an estimate; GB = 1e9 bytes)")
    return "\n".join(lines)


# ---- the measurement -----------------------------------------------------------------------------

class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the block and still alive, at their peak (`peak`) and
    at the end (`now`). Every operation's outputs are followed until they are freed; an output that
    shares a storage with an input (a view, an in-place update) is not new memory. Memory allocated
    before the block (weights, optimizer state) is not counted: add it.

        with PeakMemory() as measured:
            loss.backward()
        measured.peak
    """

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._follow(t.untyped_storage(), inputs)
        return out

    def _follow(self, storage, inputs):
        key = storage.data_ptr()
        if key in inputs or key in self.sizes or storage.nbytes() == 0:
            return
        self.sizes[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.sizes.pop(key, 0)


def tensor_bytes(tensors):
    """Bytes of the distinct storages behind these tensors (e.g. parameters and optimizer state)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())
