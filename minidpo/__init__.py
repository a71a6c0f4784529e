"""minidpo: Direct Preference Optimization (Rafailov et al., 2023), small enough to read.

The whole method is in minidpo/dpo.py; the rest of the package is what the experiments need
around it (data loaders, models for each scale, plots, the command line).
"""

import os

from . import dpo
from .dpo import (
    IGNORE_INDEX,
    TrainConfig,
    TrainingStopped,
    check_record,
    collate,
    concatenated_forward,
    dpo_loss,
    gradient_weights,
    implicit_reward_scores,
    implicit_rewards,
    load_model_and_tokenizer,
    preference_metrics,
    sequence_logps,
    tokenize_pair,
    tokenize_records,
)
from .plackett_luce import plackett_luce_loss


def train(config, train_records, eval_records=None, model=None, tokenizer=None, callback=None):
    """minidpo.dpo.train, then the plot <out>/training.png on the master rank (dpo.py alone draws nothing)."""
    rows = dpo.train(config, train_records, eval_records, model=model, tokenizer=tokenizer, callback=callback)
    if int(os.environ.get("RANK", "0")) == 0 and os.path.exists(os.path.join(config.out, "metrics.jsonl")):
        from .plots import plot_training
        plot_training(config.out)
    return rows


__all__ = [
    "IGNORE_INDEX", "TrainConfig", "TrainingStopped", "check_record", "collate", "concatenated_forward", "dpo_loss",
    "gradient_weights", "implicit_reward_scores", "implicit_rewards", "load_model_and_tokenizer",
    "plackett_luce_loss", "preference_metrics", "sequence_logps", "tokenize_pair", "tokenize_records", "train",
]
