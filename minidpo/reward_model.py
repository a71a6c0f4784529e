"""A Bradley-Terry reward model (Eq. 2) learned from preference pairs, for PPO and Best-of-N.

r_phi(x, y) = w . h(x, y) + b, where h holds the input embeddings and the final hidden states of a
frozen language model (the reference policy) reading prompt + completion, each averaged over the
completion's tokens. Only the linear head is fitted, by
maximum likelihood on the pairs: -E log sigma(r_phi(x, y_w) - r_phi(x, y_l)), with a small L2 penalty.
Cheap enough for a laptop, and the same loss the paper's reward models are trained with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dpo import IGNORE_INDEX, position_ids_from_mask
from .sampling import completion_batch


@torch.no_grad()
def completion_features(model, samples, pad_id, batch_size=16):
    """h(x, y): the token embeddings and the final-layer hidden states over the completion's tokens,
    each averaged: a bag of words beside the model's contextual reading. (N, 2d)."""
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(samples), batch_size):
        ids, mask, labels = (t.to(device) for t in completion_batch(samples[start:start + batch_size], pad_id))
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    output_hidden_states=True)
        completion = (labels != IGNORE_INDEX).unsqueeze(-1).float()  # (B, T, 1)
        hidden = torch.cat([out.hidden_states[0], out.hidden_states[-1]], -1).float()  # (B, T, 2d)
        feats.append(((hidden * completion).sum(1) / completion.sum(1).clamp(min=1)).cpu())
    return torch.cat(feats)


class LinearRewardModel:
    """w . h + b over frozen features, fitted on pairs with Eq. 2."""

    def __init__(self, dim):
        self.w = torch.zeros(dim)
        self.b = torch.zeros(())
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)

    def __call__(self, features):  # (N, d) -> (N,)
        return ((features - self.mean) / self.std) @ self.w + self.b

    def fit(self, chosen_features, rejected_features, l2=0.1, steps=200):
        """Maximum likelihood of the preferences (Eq. 2) + l2 |w|^2, by L-BFGS. Features (N, d) each."""
        both = torch.cat([chosen_features, rejected_features])
        self.mean, self.std = both.mean(0), both.std(0).clamp(min=1e-6)
        w = torch.zeros_like(self.w, requires_grad=True)
        optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
        zc, zr = (chosen_features - self.mean) / self.std, (rejected_features - self.mean) / self.std

        def closure():
            optimizer.zero_grad()
            loss = -F.logsigmoid((zc - zr) @ w).mean() + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        self.w = w.detach()
        return self

    def accuracy(self, chosen_features, rejected_features):
        return (self(chosen_features) > self(rejected_features)).float().mean().item()
