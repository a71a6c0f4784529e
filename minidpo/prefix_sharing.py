"""Prefix sharing: chosen and rejected answer the same prompt, so run the prompt through the model once.

dpo.concatenated_forward stacks chosen and rejected on the batch axis: 2B sequences, each prompt run twice. Here each
pair is ONE sequence, [prompt | chosen | rejected], with
- a 4-D attention mask: causal, and no rejected token attends to a chosen one (the rejected response sees the prompt
  and itself, exactly as in its own sequence);
- position ids that restart after the prompt for the rejected part (the rejected response sits where it would in its
  own sequence);
- the log-probs of each response read off its own positions: the rejected response's first token is predicted by the
  prompt's last position, as in its own sequence. The lm_head runs only at those positions, each row's own (a 2-D
  logits_to_keep; the prompt's last position twice), so no logits are computed that are not read.
So the log-probs equal the two-sequence path's (tests/test_prefix_sharing.py: fp32, GPT-2, GPT-NeoX and Llama
configs, left and right padding, truncated prompts), with fewer tokens through the model: 2B (P + R) become
B (P + 2R) for prompts of P and responses of R tokens.

    chosen_logps, rejected_logps = shared_prefix_forward(model, batch)   # batch: dpo.collate's, either padding side

Training uses it with RunConfig(prefix_sharing=True) (minidpo.runs) or --prefix_sharing; the pairs are then packed
on the host as each batch is collated (collate_packed), so the forward reads nothing back. The model's attention must
take a custom 4-D mask: "sdpa" and "eager" do (a boolean mask for sdpa, an additive one for eager); flash-attention
kernels take none, and are refused, as are models whose positions come from the 2-D mask (ALiBi: Bloom, MPT, Falcon;
OPT) and packed pairs longer than a sliding window (the custom mask would drop it).
"""

from __future__ import annotations

import torch

from . import dpo
from .dpo import IGNORE_INDEX


def response_parts(batch, side, b):
    """(prompt ids, response ids) of row b of one side of a collated batch, padding removed (either side)."""
    real = batch[f"{side}_attention_mask"][b].bool()
    ids, labels = batch[f"{side}_input_ids"][b][real], batch[f"{side}_labels"][b][real]
    prompt_length = int((labels == IGNORE_INDEX).sum())
    return ids[:prompt_length], ids[prompt_length:]


def round_up(length, multiple):
    return length + (-length % multiple)


def collate_packed(examples, pad_token_id, padding_side="right", multiple=1):
    """dpo.collate's batch with its pairs packed (pack_pairs' keys) on the host, as training builds it
    (runs.RunSafety.batch): the forward then reads nothing back from the device."""
    batch = dpo.collate(examples, pad_token_id, padding_side)
    return {**batch, **pack_pairs(batch, multiple)}


def pack_pairs(batch, multiple=1):
    """One right-padded sequence per pair, [prompt | chosen | rejected], from a collated batch on the CPU. Returns a
    dict: packed_input_ids and packed_position_ids (B, L); packed_mask, the boolean 4-D mask (B, 1, L, L) (True: may
    attend); for each side, packed_{side}_positions, the positions whose logits predict its response tokens, and
    packed_{side}_labels, those tokens, shifted as dpo.sequence_logps reads them (the logits at positions[:, k]
    predict labels[:, k + 1]), each (B, n + 1) with labels starting with IGNORE_INDEX. L and n + 1 are rounded up
    to a multiple of `multiple` (a compiled model then sees few shapes)."""
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
    packed = {"packed_input_ids": input_ids, "packed_position_ids": position_ids,
              "packed_mask": pair_mask(lengths, length)}
    for side in ("chosen", "rejected"):
        packed[f"packed_{side}_positions"], packed[f"packed_{side}_labels"] = read_positions(lengths, side, input_ids,
                                                                                             multiple)
    return packed


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
    The same values as dpo.concatenated_forward; returns (chosen_logps, rejected_logps), each (B,). A batch from
    collate_packed is used as packed (training: no device read); any other is packed here on a CPU copy (one read),
    its lengths padded to a multiple of `multiple` (for a compiled model)."""
    if "packed_input_ids" not in batch:
        device = batch["chosen_input_ids"].device
        packed = pack_pairs({key: value.cpu() for key, value in batch.items() if torch.is_tensor(value)}, multiple)
        batch = dpo.to_device(packed, device)
    # The lm_head runs only at the positions that predict a response token, chosen's then rejected's, each row's own
    # (a 2-D logits_to_keep: the prompt's last position appears twice, it predicts both first tokens)
    positions = torch.cat([batch["packed_chosen_positions"], batch["packed_rejected_positions"]], 1)  # (B, K)
    labels = torch.cat([batch["packed_chosen_labels"], batch["packed_rejected_labels"]], 1)  # (B, K)
    logits = model(input_ids=batch["packed_input_ids"], attention_mask=model_mask(model, batch["packed_mask"]),
                   position_ids=batch["packed_position_ids"], use_cache=False, logits_to_keep=positions).logits
    # (B, K, V), ours alone. The logits at k predict labels[k + 1], as dpo.token_logps reads them: the chosen block's
    # last (placeholder) position predicts the rejected block's leading IGNORE_INDEX, so nothing crosses between them
    logps, mask = dpo.token_logps(logits.float(), labels, fast=fast, overwrite=fast)  # (B, K - 1) each
    n = batch["packed_chosen_positions"].shape[1]  # chosen's block: logps[:, :n]
    sums = torch.stack([logps[:, :n].sum(-1), logps[:, n:].sum(-1)])  # (2, B)
    if average:
        sums = sums / torch.stack([mask[:, :n].sum(-1), mask[:, n:].sum(-1)]).clamp(min=1)
    return sums[0], sums[1]
