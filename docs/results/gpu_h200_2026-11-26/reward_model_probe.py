"""Why the reward model's accuracy is 0.000 in bf16 on the GPU: NaN or ties?"""
import sys
import time

import torch

sys.path.insert(0, "tests")
from conftest import toy_records  # noqa: E402
from minidpo.models import load_model  # noqa: E402
from minidpo.reward_model import RewardModel, RewardModelConfig, bradley_terry_loss, train_reward_model  # noqa: E402

lm, tok = load_model("smollm2", device="cuda")
lm.eval()
records = toy_records(160)
for name in ("fp32", "bf16"):
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if name == "bf16" else torch.autocast("cuda", enabled=False)
    with ctx:
        torch.manual_seed(0)
        rm = RewardModel(lm, tok)
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-5)
        pairs = [rm.encode_pair(r) for r in records[:16]]
        for step in range(4):
            rewards = rm([c for c, _ in pairs] + [r for _, r in pairs])
            loss = bradley_terry_loss(rewards[:16], rewards[16:]).mean()
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.requires_grad], 1.0)
            opt.step()
            print(name, step, "loss", loss.item(), "grad norm", gn.item(), "rewards", rewards[:3].tolist(),
                  rewards[16:19].tolist(), "nan params", any(p.isnan().any().item() for p in rm.parameters()),
                  flush=True)
        t = time.time()
        _, report = train_reward_model(lm, tok, records, RewardModelConfig(epochs=1, batch_size=16, lr=1e-5,
                                                                           eval_every=2, train_layers=0))
        print(name, "train_reward_model", {k: report[k] for k in ("step", "steps", "val_accuracy", "test_accuracy")},
              [h["val_loss"] for h in report["history"]], f"{time.time() - t:.1f}s", flush=True)
