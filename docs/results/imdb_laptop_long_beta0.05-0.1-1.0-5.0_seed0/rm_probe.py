"""Run after the experiment: python rm_probe.py <run folder>.
Can a linear probe on frozen SmolLM2 features rank VADER pairs of held-out prefixes better than the fine-tuned
reward model? Trains on the run's pairs.jsonl, tests on pairs of the reference's evaluation samples (samples.jsonl)."""
import json
import sys
import time

from minidpo.models import load_model
from minidpo.reward_model import LinearRewardModel, completion_features

run = sys.argv[1]
t0 = time.time()
model, tok = load_model("smollm2", "cpu")
model.eval()
pairs = [json.loads(line) for line in open(f"{run}/pairs.jsonl")]
ref = [r for r in map(json.loads, open(f"{run}/samples.jsonl"))
       if r["method"] == "reference" and r["completion"].strip()]


def sample(prompt, completion):
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    return {"prompt_ids": p, "completion_ids": c}


pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
chosen = completion_features(model, [sample(r["prompt"], r["chosen"]) for r in pairs], pad)
rejected = completion_features(model, [sample(r["prompt"], r["rejected"]) for r in pairs], pad)
test = completion_features(model, [sample(r["prefix"], r["completion"]) for r in ref], pad)
test_pairs = [(i, j) for i in range(len(ref)) for j in range(i + 1, len(ref))
              if ref[i]["prefix_index"] == ref[j]["prefix_index"] and ref[i]["reward"] != ref[j]["reward"]]
for l2 in (0.01, 0.1, 1.0, 10.0):
    probe = LinearRewardModel(chosen.shape[1]).fit(chosen, rejected, l2=l2)
    scores = probe(test)
    right = sum((scores[i] - scores[j]).item() * (ref[i]["reward"] - ref[j]["reward"]) > 0 for i, j in test_pairs)
    print(f"l2 {l2}: train accuracy {probe.accuracy(chosen, rejected):.3f}, held-out {right / len(test_pairs):.3f} "
          f"on {len(test_pairs)} pairs of evaluation prefixes")
print(f"{time.time() - t0:.0f} s")
