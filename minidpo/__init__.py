"""minidpo: Direct Preference Optimization (Rafailov et al., 2023), small enough to read.

The method and one run from start to finish are minidpo/dpo.py; what runs that are interrupted, repeated or shared
need (checkpoints, exact resume, signals, a reference cache) is minidpo/runs.py; the rest of the package is what the
experiments need around them (data loaders, models for each scale, plots, the command line).
"""

import os

from . import dpo, runs
from .data import tokenize_records
from .dpo import (
    IGNORE_INDEX,
    TrainConfig,
    check_record,
    collate,
    concatenated_forward,
    dpo_loss,
    gradient_weights,
    implicit_reward_scores,
    implicit_rewards,
    preference_metrics,
    sequence_logps,
    tokenize_pair,
)
from .models import load_model_and_tokenizer
from .plackett_luce import plackett_luce_loss
from .runs import RunConfig, TrainingStopped


def train(config, train_records, eval_records=None, model=None, tokenizer=None, callback=None):
    """minidpo.runs.train (dpo.train with checkpoints, exact resume and signals), then the plot <out>/training.png
    on the master rank: the one place a run's plot is drawn (dpo.py alone draws nothing)."""
    rows = runs.train(config, train_records, eval_records, model=model, tokenizer=tokenizer, callback=callback)
    rank, _, _ = dpo.setup_distributed()  # the one rank lookup (torchrun's environment)
    if rank == 0 and os.path.exists(os.path.join(config.out, "metrics.jsonl")):
        from .plots import plot_training
        plot_training(config.out)
    return rows


__all__ = [
    "dpo", "runs", "IGNORE_INDEX", "RunConfig", "TrainConfig", "TrainingStopped", "check_record", "collate",
    "concatenated_forward", "dpo_loss", "gradient_weights", "implicit_reward_scores", "implicit_rewards",
    "load_model_and_tokenizer", "plackett_luce_loss", "preference_metrics", "sequence_logps", "tokenize_pair",
    "tokenize_records", "train",
]
