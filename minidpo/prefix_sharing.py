"""Prefix sharing: chosen and rejected answer the same prompt, so run the prompt through the model once.

dpo.concatenated_forward stacks chosen and rejected on the batch axis: 2B sequences, each prompt run twice. Here each
pair is ONE sequence, [prompt | chosen | rejected], with
- a 4-D attention mask: causal, and no rejected token attends to a chosen one (the rejected response sees the prompt
  and itself, exactly as in its own sequence);
- position ids that restart after the prompt for the rejected part (the rejected response sits where it would in its
  own sequence);
- the log-probs of each response read off its own positions: the rejected response's first token is predicted by the
  prompt's last position, as in its own sequence.
So the log-probs equal the two-sequence path's (tests/test_prefix_sharing.py: fp32, GPT-2, GPT-NeoX and Llama
configs, left and right padding, truncated prompts), with fewer tokens through the model: 2B (P + R) become
B (P + 2R) for prompts of P and responses of R tokens.

    chosen_logps, rejected_logps = shared_prefix_forward(model, batch)   # batch: dpo.collate's, either padding side

Training uses it with RunConfig(prefix_sharing=True) (minidpo.runs) or --prefix_sharing. The model's attention must
take a custom 4-D mask: "sdpa" and "eager" do (a boolean mask for sdpa, an additive one for eager); flash-attention
kernels take none, and are refused, as are models whose positions come from the 2-D mask (ALiBi: Bloom, MPT, Falcon;
OPT) and packed pairs longer than a sliding window (the custom mask would drop it).
"""

from __future__ import annotations

import torch

from .dpo import IGNORE_INDEX, sequence_logps


def response_parts(batch, side, b):
    """(prompt ids, response ids) of row b of one side of a collated batch, padding removed (either side)."""
    real = batch[f"{side}_attention_mask"][b].bool()
    ids, labels = batch[f"{side}_input_ids"][b][real], batch[f"{side}_labels"][b][real]
    prompt_length = int((labels == IGNORE_INDEX).sum())
    return ids[:prompt_length], ids[prompt_length:]


def round_up(length, multiple):
    return length + (-length % multiple)


def pack_pairs(batch, multiple=1):
    """One right-padded sequence per pair, [prompt | chosen | rejected]. Returns input_ids (B, L), position_ids
    (B, L), the boolean 4-D mask (B, 1, L, L) (True: may attend), and for each side the positions whose logits
    predict its response tokens and those tokens, shifted as dpo.sequence_logps reads them (the logits at
    positions[:, k] predict labels[:, k + 1]): positions (B, n + 1), labels (B, n + 1) starting with IGNORE_INDEX;
    and the shortest prompt's length in tokens (an int). L and n + 1 are rounded up to a multiple of `multiple` (a
    compiled model then sees few shapes). The packing is done on a CPU copy of the batch and moved to its device once:
    no per-token device reads."""
    device = batch["chosen_input_ids"].device
    batch = {key: value.cpu() for key, value in batch.items() if torch.is_tensor(value)}  # one copy, not one per token
    B = batch["chosen_input_ids"].shape[0]
    rows = []
    for b in range(B):
        prompt, chosen = response_parts(batch, "chosen", b)
        prompt_r, rejected = response_parts(batch, "rejected", b)
        if not torch.equal(prompt, prompt_r):
            raise ValueError(f"prefix sharing: pair {b} has different prompt tokens for chosen and rejected")
        rows.append((prompt, chosen, rejected))
    length = round_up(max(len(p) + len(c) + len(r) for p, c, r in rows), multiple)
    input_ids = torch.zeros(B, length, dtype=torch.long)
    position_ids = torch.zeros(B, length, dtype=torch.long)
    lengths = torch.tensor([[len(part) for part in row] for row in rows])  # (B, 3): prompt, chosen, rejected
    for b, (prompt, chosen, rejected) in enumerate(rows):
        P, C, R = len(prompt), len(chosen), len(rejected)
        input_ids[b, :P + C + R] = torch.cat([prompt, chosen, rejected])
        position_ids[b, :P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
    reads = {side: tuple(t.to(device) for t in read_positions(lengths, side, input_ids, multiple))
             for side in ("chosen", "rejected")}
    shortest_prompt = min(len(prompt) for prompt, _, _ in rows)
    return input_ids.to(device), position_ids.to(device), pair_mask(lengths, length).to(device), reads, shortest_prompt


def pair_mask(lengths, length):
    """(B, 1, L, L) booleans: causal; a rejected query never sees a chosen key; padding sees only itself (so that
    no softmax row is empty). lengths: (B, 3) prompt, chosen, rejected token counts."""
    P, C, R = (lengths[:, k].view(-1, 1, 1) for k in range(3))  # (B, 1, 1) each
    query = torch.arange(length).view(1, -1, 1)  # (1, L, 1)
    key = torch.arange(length).view(1, 1, -1)  # (1, 1, L)
    real_key = key < P + C + R
    chosen_key = (key >= P) & (key < P + C)
    rejected_query = (query >= P + C) & (query < P + C + R)
    allowed = (key <= query) & real_key & ~(rejected_query & chosen_key)  # (B, L, L)
    allowed |= (query == key) & (query >= P + C + R)  # padding rows: themselves only
    return allowed.unsqueeze(1)


def read_positions(lengths, side, input_ids, multiple=1):
    """For one side: (positions (B, n + 1), labels (B, n + 1)) as pack_pairs describes (the last position a
    placeholder); a token with no position before it (a response with an empty prompt: its first token) is not
    scored, as in the two-sequence path. lengths (B, 3) and input_ids (B, L) on the CPU."""
    per_row = []
    for b, (P, C, R) in enumerate(lengths.tolist()):
        if side == "chosen":
            token_at = list(range(P, P + C))
            predicted_by = [t - 1 for t in token_at]
        else:  # the rejected response's first token is predicted by the prompt's last position
            token_at = list(range(P + C, P + C + R))
            predicted_by = [P - 1] + [t - 1 for t in token_at[1:]]
        kept = [(p, t) for p, t in zip(predicted_by, token_at) if p >= 0]
        tokens = input_ids[b, [t for _, t in kept]].tolist()
        per_row.append(([p for p, _ in kept] + [0], [IGNORE_INDEX] + tokens))
    n = round_up(max(len(positions) for positions, _ in per_row), multiple)
    positions = torch.tensor([p + [0] * (n - len(p)) for p, _ in per_row])
    labels = torch.tensor([t + [IGNORE_INDEX] * (n - len(t)) for _, t in per_row])
    return positions, labels


POSITIONS_FROM_MASK = ("bloom", "mpt", "opt", "falcon")  # ALiBi or mask-derived positions: no position_ids to restart


def model_mask(model, allowed):
    """The 4-D mask in the form the model's attention takes: boolean for sdpa, additive (0 / -inf) for eager."""
    config = getattr(model, "module", model).config  # a DDP wrapper holds the model in .module
    if config.model_type in POSITIONS_FROM_MASK:
        raise ValueError(f"prefix sharing: {config.model_type} derives positions from a 2-D attention mask")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and allowed.shape[-1] > window:  # a custom 4-D mask replaces the model's own, window included
        raise ValueError(f"prefix sharing: packed pairs of {allowed.shape[-1]} tokens exceed the sliding window "
                         f"({window}) that a custom mask would drop")
    implementation = getattr(config, "_attn_implementation", "eager") or "eager"
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"prefix sharing needs an attention that takes a 4-D mask (sdpa or eager), not {implementation!r}")


def shared_prefix_forward(model, batch, average=False, fast=True, multiple=1):
    """log pi(y_w|x), log pi(y_l|x) of a collated batch from ONE sequence per pair (the module docstring).
    The same values as dpo.concatenated_forward; returns (chosen_logps, rejected_logps), each (B,). multiple: pad the
    packed lengths to a multiple of it (for a compiled model; logits are then kept from position 0)."""
    input_ids, position_ids, allowed, reads, shortest_prompt = pack_pairs(batch, multiple)
    # logits only from the earliest position that predicts a response token on (prompt logits are never read):
    # the shortest prompt's last position (pack_pairs read it on the CPU); a compiled model keeps them all
    first = 0 if multiple > 1 else max(shortest_prompt - 1, 0)
    logits = model(input_ids=input_ids, attention_mask=model_mask(model, allowed), position_ids=position_ids,
                   use_cache=False, logits_to_keep=input_ids.shape[1] - first).logits  # (B, L - first, V)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1)  # (B, 1)
    out = []
    for positions, labels in reads.values():
        picked = logits[rows, (positions - first).clamp(min=0)]  # (B, n + 1, V): a copy, ours alone
        out.append(sequence_logps(picked.float(), labels, average=average, fast=fast, overwrite=fast))  # (B,)
    return out[0], out[1]
