"""The baselines trained on the preference pairs (minidpo.baselines): their objectives on a language
model against Hugging Face's own loss, dropout off, and Unlikelihood as the paper states it."""

import pytest
import torch

from conftest import dropout_gpt2
from minidpo.baselines import sequence_unlikelihood_loss, train_baseline
from minidpo.dpo import IGNORE_INDEX
from minidpo.models import byte_tokenizer, tiny_gpt2

RECORD = {"prompt": "The film was", "chosen": " good, really good.", "rejected": " bad."}


@torch.no_grad()
def response_token_logps(model, tokenizer, prompt, response):
    """log pi(y_t | x, y_<t) of each response token (EOS included), in eval mode, from HF's own loss:
    the mean over the labelled tokens is -loss, and one token at a time gives each of them."""
    model.eval()
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + response_ids])
    logps = []
    for t in range(len(response_ids)):
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(prompt_ids) + t] = ids[0, len(prompt_ids) + t]
        logps.append(-model(input_ids=ids, labels=labels).loss)
    return torch.stack(logps)


def test_sequence_unlikelihood_by_hand():
    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -7.0])
    torch.testing.assert_close(sequence_unlikelihood_loss(chosen, rejected, alpha=0.5),
                               torch.tensor([3.0 - 0.5 * 2.0, 1.0 - 0.5 * 7.0]))


@pytest.mark.parametrize("method", ["preferred_ft", "unlikelihood", "unlikelihood_token"])
def test_each_baseline_optimises_its_stated_objective_with_dropout_off(method):
    # A model with dropout 0.5 in train mode: the first step's loss must be the objective of the model
    # itself (read in eval mode), which dropout noise would change.
    model, tokenizer = dropout_gpt2()
    chosen = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["chosen"])
    rejected = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["rejected"])
    alpha = 0.3
    expected = {
        "preferred_ft": -chosen.mean(),  # per-token mean NLL of the chosen response
        "unlikelihood": -chosen.sum() + alpha * rejected.sum(),  # the paper's, summed log-probs
        "unlikelihood_token": -chosen.mean() - alpha * torch.log1p(-rejected.exp()).mean(),  # Welleck et al.
    }[method]
    losses = train_baseline(method, model.train(), tokenizer, [RECORD] * 4, steps=1, batch_size=2, lr=1e-3,
                            alpha=alpha)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method", ["preferred_ft", "unlikelihood", "unlikelihood_token"])
def test_a_response_the_sampler_cut_is_trained_without_eos(method):
    # Oracle: the same objectives from HF's own loss, over the response tokens without the closing EOS, when the
    # record says both responses were cut at the sampling budget (imdb's pairs): the review did not end there.
    model, tokenizer = dropout_gpt2()
    chosen = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["chosen"])[:-1]
    rejected = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["rejected"])[:-1]
    alpha = 0.3
    expected = {
        "preferred_ft": -chosen.mean(),
        "unlikelihood": -chosen.sum() + alpha * rejected.sum(),
        "unlikelihood_token": -chosen.mean() - alpha * torch.log1p(-rejected.exp()).mean(),
    }[method]
    cut = {**RECORD, "chosen_truncated": True, "rejected_truncated": True}
    losses = train_baseline(method, model.train(), tokenizer, [cut] * 4, steps=1, batch_size=2, lr=1e-3, alpha=alpha)
    assert losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_the_papers_unlikelihood_is_unbounded_and_degenerates():
    # Nothing bounds -log pi(y_w) + alpha log pi(y_l) from below: training drives log pi(y_l|x) to
    # -inf and the loss below 0, where the token-level form (a sum of -log terms) can never go.
    tokenizer = byte_tokenizer()
    records = [RECORD] * 8
    model = tiny_gpt2(seed=0)
    start = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["rejected"]).sum()
    losses = train_baseline("unlikelihood", model, tokenizer, records, steps=30, batch_size=4, lr=1e-2, alpha=1.0)
    end = response_token_logps(model, tokenizer, RECORD["prompt"], RECORD["rejected"]).sum()
    assert min(losses) < 0 and end < start - 20, (min(losses), start, end)
    token = train_baseline("unlikelihood_token", tiny_gpt2(seed=0), tokenizer, records, steps=30, batch_size=4,
                           lr=1e-2, alpha=1.0)
    assert min(token) > 0


def test_an_unknown_baseline_is_an_error():
    with pytest.raises(ValueError, match="unknown baseline"):
        train_baseline("ipo", tiny_gpt2(seed=0), byte_tokenizer(), [RECORD], steps=1)
