"""Why Preferred-FT answers HH prompts with nothing (issue #26): P(EOS as the first response token), and P(EOS) one
token into the response, on the 32 test prompts of the laptop preset, for the base model, after the preset's SFT
(every response closed by EOS, as the paper and the authors' code do), and after the same SFT with EOS left out of
the labels (a control, not a fix). Output: eos_first_token.txt beside this file. Run from the repository root:
    HF_HUB_OFFLINE=1 python docs/results/hh_laptop_beta0.1_judge-proxy_seed0/eos_first_token.py"""
import copy

import torch

from minidpo import sft as sft_module
from minidpo.experiments import tldr_hh
from minidpo.models import freeze_all_but_top
from minidpo.notebook import quiet
from minidpo.sft import sft_train

quiet()
scale = tldr_hh.scales("hh")["laptop"]
torch.manual_seed(0)
base, tok = tldr_hh.load_base(scale, torch.device("cpu"))
data = tldr_hh.load_data(scale, 0)
prompts = [r["prompt"] for r in data.test]


@torch.no_grad()
def eos_probabilities(model):
    """(P(EOS first), P(EOS after the first response word " The"), whether EOS is the argmax) per test prompt."""
    model.eval()
    rows = []
    for p in prompts:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        first = model(input_ids=torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        second = model(input_ids=torch.tensor([ids + tok(" The", add_special_tokens=False)["input_ids"]])).logits[0, -1]
        rows.append((first[tok.eos_token_id].item(), second.float().softmax(-1)[tok.eos_token_id].item(),
                     int(first.argmax()) == tok.eos_token_id))
    return rows


def trained(drop_eos):
    real = sft_module.tokenize_sft

    def without_eos(*args, **kwargs):  # the control: the closing EOS is no longer a label
        example = real(*args, **kwargs)
        if example["labels"] and example["labels"][-1] == tok.eos_token_id:
            example["labels"] = example["labels"][:-1] + [-100]
        return example

    sft_module.tokenize_sft = without_eos if drop_eos else real
    policy = freeze_all_but_top(copy.deepcopy(base), scale.train_layers)
    losses = sft_train(policy, tok, data.sft, steps=scale.sft_steps, batch_size=scale.batch_size, lr=scale.lr,
                       max_length=scale.max_length, seed=0, max_prompt_length=scale.max_prompt_length,
                       grad_accum=scale.grad_accum, dtype=scale.dtype)
    sft_module.tokenize_sft = real
    return policy, losses


print(f"{len(prompts)} test prompts; {len(data.sft)} SFT records, {sum(not r['response'].strip() for r in data.sft)} "
      f"of them empty")
for name, model in (("base model", base), ("after SFT (EOS labelled)", None), ("after SFT, EOS not labelled", None)):
    if model is None:
        model, losses = trained(drop_eos="not" in name)
        name += f" (loss {losses[0]:.2f} -> {losses[-1]:.2f})"
    rows = eos_probabilities(model)
    n = len(rows)
    print(f"{name:48s} mean P(EOS first) {sum(r[0] for r in rows) / n:.3f} (max {max(r[0] for r in rows):.3f}), "
          f"mean P(EOS after ' The') {sum(r[1] for r in rows) / n:.3f}, EOS the most likely first token on "
          f"{sum(r[2] for r in rows)} of {n} prompts")
