"""Runs that are interrupted, repeated or shared: what real use adds around minidpo.dpo's training loop.

dpo.train() is one run from its first step to <out>/final. runs.train() drives that same loop (through the hooks of
dpo.RunHooks, overridden by RunSafety below) and adds what a run needs when a scheduler preempts it, a disk fills up,
someone starts the same command twice, or several runs share one reference model. `python -m minidpo`,
`minidpo.train` and the experiments train through it.

What you can rely on
- One run per folder. A new run in an <out> that holds one is refused before anything loads: resume=True continues
  it, overwrite=True first deletes everything a run leaves there (RUN_FILES), so two runs are never spliced.
- Checkpoints. <out>/checkpoint holds the weights, tokenizer, optimizer, schedule, RNG state and the run's settings,
  every save_every steps (default: every 10 % of the run) and at the end. Each save is atomic: a crash or a full
  disk in the middle of one leaves the previous complete checkpoint (or checkpoint.old, between two renames) and an
  error saying so; never a half-written one.
- Exact resume. resume=True continues from the checkpoint on the same batches, and ends with the metrics rows and
  the final weights of a run that was never interrupted (bit for bit on the same machine and thread count). No step
  is logged twice: metrics.jsonl is cut back to the checkpoint's step; a torn last line (a crash while it was
  written) is dropped, a malformed line elsewhere is an error naming it. A finished run resumed does nothing; one
  resumed with a larger max_steps continues as if it had been started with it.
- The same run, or an error. A resumed run must follow the saved trajectory: a change to any setting except those in
  MAY_CHANGE_ON_RESUME, or to the training data, the evaluation data or the starting weights (their fingerprints,
  as the model sees them), is an error listing each change.
- Preemption. SIGTERM (what a scheduler sends) or Ctrl-C: the current step finishes, the checkpoint is saved and
  TrainingStopped is raised (the command line exits 0); under DDP all ranks stop at the same step, the next one that
  reads metrics back (every log_every steps) or saves. A second Ctrl-C stops at once. A non-finite loss or grad norm
  stops the run when it is read back (dpo.read_back: every --log_every steps, and before every checkpoint): after
  its update, the last checkpoint intact.
- A reference computed once. With precompute_ref, the reference log-probs are computed before the first step and
  saved in <out>/reference_logps.pt (or reference_logps_file, which runs from the same reference share); a restart
  reuses them, and a file computed for other data, another model or other settings is recomputed, never reused.
- Bad records. Every bad record is named (file:line) with its reason, all at once; skip_invalid drops and lists them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import threading
from array import array
from dataclasses import dataclass

import torch

from . import dpo
from .data import tokenize_records


@dataclass
class RunConfig(dpo.TrainConfig):
    """dpo.TrainConfig, and what runs through this module add: where the data and model come from, and the run's
    bookkeeping. The command line has a flag for every field of both."""
    gguf_file: str = ""  # a .gguf file inside `model` to load instead (dequantised to fp32)
    dataset: str = ""  # where the records come from: the CLI reads it with minidpo.data.load_preferences
    eval_size: int | None = None  # records held out for evaluation (None: min(64, 10% of them); 0: none)
    skip_invalid: bool = False  # drop bad records, reporting how many and which, instead of stopping
    precompute_ref: bool = False  # compute the reference log-probs once before training, then free the reference model
    reference_logps_file: str = ""  # where they are kept ("": <out>/reference_logps.pt); one reference, one file
    save_every: int = 0  # write the checkpoint every N steps and at the end (0: every 10% of the run)
    resume: bool = False  # continue from <out>/checkpoint
    overwrite: bool = False  # start afresh in an <out> that holds a run, deleting what it left
    prefix_sharing: bool = False  # one sequence per pair, the prompt run once (minidpo.prefix_sharing): same log-probs
    compile: str = ""  # torch.compile backend of policy and reference ("": none; "inductor": torch's compiler)


MAY_CHANGE_ON_RESUME = {"out", "eval_every", "log_every", "save_every", "max_steps", "epochs", "num_threads", "resume",
                        "overwrite", "progress", "skip_invalid", "precompute_ref", "reference_logps_file",
                        "prefix_sharing", "compile"}  # the last two: the same computation, another schedule
FINGERPRINTS = ("train_data", "eval_data", "initial_weights")  # saved with the settings, compared on resume
RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "final", "final.old", "final.tmp",
             "reference_logps.pt", "reference_logps.pt.tmp", "training.png")  # what a run leaves in <out>


class TrainingStopped(Exception):
    """Raised by train() after a signal stopped it and its checkpoint was saved: resume=True continues it."""


def train(config, train_records, eval_records=None, model=None, tokenizer=None, callback=None):
    """dpo.train with everything this module's docstring promises. config: a RunConfig (a dpo.TrainConfig is taken
    as a RunConfig with its defaults). Writes <out>/metrics.jsonl, <out>/checkpoint/, <out>/final/; returns the rows
    logged. SIGTERM or Ctrl-C: the step finishes, the checkpoint is saved, TrainingStopped is raised."""
    if not isinstance(config, RunConfig):
        config = RunConfig(**dataclasses.asdict(config))
    rank, world_size, _ = dpo.setup_distributed()
    dpo.validate_config(config, world_size)
    if (config.eval_size or 0) < 0 or config.save_every < 0:
        raise ValueError("eval_size and save_every must be >= 0")
    resume_from = prepare_folder(config, master=rank == 0)
    if world_size > 1:
        torch.distributed.barrier()  # no rank reads <out> while the master clears it
    if model is None:
        from .models import load_model_and_tokenizer
        model, tokenizer = load_model_and_tokenizer(config.model, config.gguf_file)
    return dpo.train(config, train_records, eval_records, model=model, tokenizer=tokenizer, callback=callback,
                     hooks=RunSafety(config, resume_from))


class RunSafety(dpo.RunHooks):
    """dpo.RunHooks for a run that can be interrupted, repeated or shared (the module docstring's guarantees)."""

    def __init__(self, config, resume_from):
        self.config, self.resume_from, self.signals, self.settings = config, resume_from, None, {}
        self.forward = padded_to(dpo.concatenated_forward, COMPILE_MULTIPLE) if config.compile \
            else dpo.concatenated_forward
        self.multiple = COMPILE_MULTIPLE if config.compile else 1
        if config.prefix_sharing:  # the log-probs of a batch from one sequence per pair (padded inside when compiled)
            from .prefix_sharing import shared_prefix_forward
            self.forward = functools.partial(shared_prefix_forward, multiple=self.multiple)

    def batch(self, run, examples):  # with prefix sharing, the pairs are packed here, on the host
        if not self.config.prefix_sharing:
            return super().batch(run, examples)
        from .prefix_sharing import collate_packed
        return dpo.to_device(collate_packed(examples, run.tokenizer.pad_token_id, self.config.padding_side,
                                            self.multiple), run.device)

    def tokenize(self, run, records):  # every bad record listed at once; skip_invalid drops them
        config = self.config
        return tokenize_records(run.tokenizer, records, config.max_length, config.max_prompt_length,
                                config.skip_invalid, verbose=run.master)[0]

    def start(self, run):  # the settings and fingerprints; with resume, the checkpoint's state and step
        self.save_every = self.config.save_every or max(1, math.ceil(run.total_steps / 10))
        self.settings = {**dataclasses.asdict(self.config), "train_data": fingerprint(run.train_examples),
                         "eval_data": fingerprint(run.eval_examples),
                         "initial_weights": weights_fingerprint(run.policy)}
        if self.config.compile:  # in place: the same parameters and state_dict, a compiled forward
            for model in filter(None, (run.policy, run.reference)):
                model.compile(backend=self.config.compile)
        if self.resume_from is None:
            return 0
        check_resumed_settings(self.resume_from, self.settings)
        step = load_checkpoint(self.resume_from, run.policy, run.optimizer, run.scheduler)
        if run.master:
            rewrite_metrics_upto(os.path.join(self.config.out, "metrics.jsonl"), step, self.config.eval_every)
            done = step >= run.total_steps
            print(f"{self.config.out}: the run already finished at step {step}; nothing to do" if done
                  else f"resumed from {self.resume_from} at step {step}")
        return step

    def reference_logps(self, run):  # computed once (and cached on disk), then the reference model is freed
        if not self.config.precompute_ref or run.reference is None:
            return None, None
        c = self.config
        logps = reference_logps_cached(run, self.settings, lambda examples: precompute_reference_logps(
            run.reference, examples, run.tokenizer.pad_token_id, run.device, run.micro_batch, run.rank, run.world_size,
            c.average_log_prob, c.padding_side, run.autocast))
        run.reference = None  # not needed again: free its memory
        return logps

    def around_loop(self, run):  # SIGTERM and Ctrl-C are noted, and acted on at the end of the step
        self.signals = StopSignals()
        return self.signals

    def after_step(self, run):  # a checkpoint when one is due; a stop, with a checkpoint, when a signal came
        due = run.step % self.save_every == 0 and run.step < run.total_steps
        stop = self.signals.received is not None
        if run.world_size > 1:  # all ranks stop together: they agree on it (a read back) at logging steps and saves
            agree = due or run.step % self.config.log_every == 0
            stop = agree and bool(dpo.all_reduce_sum(torch.tensor([float(stop)], device=run.device),
                                                     run.world_size).item())
        stop = stop and run.step < run.total_steps
        if due or stop:  # the metrics up to this step written, and a non-finite loss stops the run before the save
            dpo.read_back(run)
        if run.master and due:
            self.save(run)
        if stop:
            message = f"stopped at step {run.step}: checkpoint in {os.path.join(self.config.out, 'checkpoint')}"
            if run.master:
                self.save(run)
                print(f"{message}; continue with --resume")
            if run.world_size > 1:  # no rank leaves before the checkpoint is saved
                torch.distributed.barrier()
            raise TrainingStopped(message)

    def save_final(self, run):  # the last checkpoint, then final/, each atomic
        self.save(run)
        atomic_save_dir(os.path.join(self.config.out, "final"),
                        lambda tmp: (run.policy.save_pretrained(tmp), run.tokenizer.save_pretrained(tmp)))

    def save(self, run):
        save_checkpoint(self.config.out, run.policy, run.tokenizer, run.optimizer, run.scheduler, run.step,
                        self.settings)


COMPILE_MULTIPLE = 64  # a compiled run pads every batch to a multiple of this length: few shapes, few recompiles


def padded_to(forward, multiple):
    """forward on batches right-padded to a length that is a multiple of `multiple` (padding is masked and labelled
    IGNORE_INDEX: the same log-probs), so that a compiled model sees few shapes."""
    return lambda model, batch, **kwargs: forward(model, pad_to_multiple(batch, multiple), **kwargs)


def pad_to_multiple(batch, multiple, pad_token_id=0):
    """A collated batch (dpo.collate's keys) right-padded to a length that is a multiple of `multiple`."""
    import torch.nn.functional as F
    extra = -batch["chosen_input_ids"].shape[1] % multiple
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": dpo.IGNORE_INDEX}
    return {key: F.pad(value, (0, extra), value=fill[key.split("_", 1)[1]]) if key.startswith(("chosen_", "rejected_"))
            else value for key, value in batch.items()}  # kept_positions are unchanged: the padding is on the right


# ---- the output folder ---------------------------------------------------------------------------

def check_out_folder(config, master):
    """The checkpoint to resume from, or None for a fresh run; an error for a folder that holds another run."""
    out, left = config.out, [name for name in RUN_FILES if os.path.exists(os.path.join(config.out, name))]
    if config.resume:
        if not os.path.exists(out):
            if master:
                print(f"--resume: {out} does not exist; starting a new run there")
            return None
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {out} (is --out right?). A run saves one every --save_every "
                             f"steps and at the end; start afresh with --overwrite")
        return checkpoint
    if left and not config.overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start afresh, "
                         f"or choose another --out")
    return None


def prepare_folder(config, master):
    """check_out_folder, then (overwrite) delete everything --resume would read, so two runs are never spliced."""
    resume_from = check_out_folder(config, master)
    if master and config.overwrite and not config.resume:
        for name in RUN_FILES:
            path = os.path.join(config.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(config.out, exist_ok=True)
    return resume_from


def rewrite_metrics_upto(path, step, eval_every):
    """Keep the metric rows an uninterrupted run would have logged by `step`, so that a resumed run appends
    and never repeats a step; a torn last line (a crash mid-write) is dropped, a bad line elsewhere is an error."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines):
                raise ValueError(f"{path}:{lineno}: not a JSON metrics row; fix or delete that line") from None
            print(f"{path}: dropped a torn last line (a crash while it was written)")
    periodic_eval = lambda row: row["step"] == 0 or (eval_every and row["step"] % eval_every == 0)  # noqa: E731
    keep = [row for row in rows if row["step"] < step or (row["step"] == step and (
        row["split"] == "train" or periodic_eval(row)))]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in keep)
    os.replace(path + ".tmp", path)


# ---- checkpoints ---------------------------------------------------------------------------------

def atomic_save_dir(path, write):
    """write(tmp) fills a temporary folder, which then replaces `path`. If anything fails midway, `path`
    (or, between the two renames, `path`.old) still holds the previous complete save, and no .tmp is left."""
    tmp, old = f"{path}.tmp", f"{path}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not save {path} ({type(e).__name__}: {e}); the previous save there is intact") from e
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out):
    """<out>/checkpoint if complete, else the <out>/checkpoint.old left by a save cut between renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.exists(os.path.join(out, name, "trainer_state.pt")):
            return os.path.join(out, name)
    return None


def save_checkpoint(out, policy, tokenizer, optimizer, scheduler, step, run_settings=None):
    def write(tmp):
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "run_settings.json"), "w") as f:
            json.dump(run_settings or {}, f, indent=1)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()}
                                               if torch.cuda.is_available() else {})}
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng}, os.path.join(tmp, "trainer_state.pt"))  # last: it marks the save complete
    atomic_save_dir(os.path.join(out, "checkpoint"), write)


def load_checkpoint(path, policy, optimizer, scheduler):
    """Restore weights, optimizer, schedule and RNG from `path`; returns the step it was saved at."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)  # data, not code
    policy.load_state_dict(type(policy).from_pretrained(path, dtype=torch.float32).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


# ---- the same run, or an error: settings and fingerprints -----------------------------------------

def saved_run_settings(checkpoint):
    """The settings saved with a checkpoint (RunConfig's fields and the fingerprints), or {} if none."""
    path = os.path.join(checkpoint, "run_settings.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_resumed_settings(path, run_settings):
    """A resumed run must follow the saved one's trajectory: any change but MAY_CHANGE_ON_RESUME is an error."""
    saved = saved_run_settings(path)
    differs = [key for key, value in run_settings.items() if key in saved and saved[key] != value]
    changed = [f"{key if key in FINGERPRINTS else '--' + key} {saved[key]!r} -> {run_settings[key]!r}"
               for key in differs if key not in MAY_CHANGE_ON_RESUME]
    if changed:
        raise ValueError(f"--resume with settings that differ from the run in {path}:\n  " + "\n  ".join(changed)
                         + "\nresume with the old values, or start afresh with --overwrite (or another --out)")


def fingerprint(examples):
    """A hash of tokenised examples: the data a run trains on, as the model sees it."""
    digest = hashlib.sha256()
    for ex in examples:
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            digest.update(array("q", ex[key]).tobytes() + b"|")
    return digest.hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(model):
    """A hash of the model's starting weights (each tensor's sum, to 6 digits): a different model passed
    under the same name is a different run."""
    sums = ",".join(f"{name}:{p.double().sum().item():.6e}" for name, p in model.named_parameters())
    return hashlib.sha256(sums.encode()).hexdigest()[:16]


# ---- the reference log-probs, computed once ------------------------------------------------------

@torch.no_grad()
def precompute_reference_logps(reference, examples, pad_token_id, device, batch_size, rank=0, world_size=1,
                               average=False, padding_side="right", autocast=contextlib.nullcontext):
    """log pi_ref(y_w|x), log pi_ref(y_l|x) of every example, computed once: (N,), (N,). A sequence
    shared by several pairs (several pairs per prompt, as in the paper's IMDb data) is scored once;
    each rank scores every world_size-th distinct sequence and a sum over ranks fills in the rest."""
    distinct = {}  # (input_ids, labels) -> its index among the distinct sequences
    positions = [[distinct.setdefault((tuple(ex[f"{k}_input_ids"]), tuple(ex[f"{k}_labels"])), len(distinct))
                  for k in ("chosen", "rejected")] for ex in examples]
    sequences = list(distinct)
    logps = torch.zeros(len(sequences), dtype=torch.float32, device=device)
    mine = list(range(rank, len(sequences), world_size))
    for start in range(0, len(mine), 2 * batch_size):  # as many sequences as a training forward
        indices = mine[start:start + 2 * batch_size]
        padded = [t.to(device) for t in dpo.pad_sequences([sequences[i] for i in indices], pad_token_id,
                                                          padding_side)]
        with autocast():
            logps[indices] = dpo.batch_logps(reference, *padded, average=average, fast=True).float()  # as training
    dpo.all_reduce_sum(logps, world_size)
    positions = torch.tensor(positions, dtype=torch.long, device=device).reshape(-1, 2)  # (N, 2)
    return logps[positions[:, 0]], logps[positions[:, 1]]


def reference_logps_cached(run, settings, compute):
    """Precomputed reference log-probs, saved once; a restart reuses them when the data, model and tokenisation
    are the same (a full reference pass saved per restart), else recomputes, saying why."""
    config = run.config
    path = config.reference_logps_file or os.path.join(config.out, "reference_logps.pt")
    key = json.dumps({k: settings[k] for k in ("model", "gguf_file", "average_log_prob", "dtype", *FINGERPRINTS)},
                     sort_keys=True)
    if os.path.exists(path):
        saved = torch.load(path, map_location=run.device, weights_only=True)
        if saved["key"] == key:
            return saved["train"], saved["eval"]
        if run.master:
            print(f"{path} was computed for other data, model or settings: recomputing")
    train_ref, eval_ref = compute(run.train_examples), compute(run.eval_examples)
    if run.master:
        torch.save({"key": key, "train": train_ref, "eval": eval_ref}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return train_ref, eval_ref


# ---- signals: stop at a step boundary ------------------------------------------------------------

class StopSignals:
    """SIGTERM (a scheduler's preemption) or Ctrl-C: finish the step, save, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received}: finishing this step, then saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
