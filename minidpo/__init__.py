"""minidpo: Direct Preference Optimization (Rafailov et al., 2023), small enough to read.

The whole method is in minidpo/dpo.py; the rest of the package is what the experiments need
around it (data loaders, models for each scale, plots, the command line).
"""

from .dpo import (
    IGNORE_INDEX,
    TrainConfig,
    check_record,
    collate,
    concatenated_forward,
    dpo_loss,
    gradient_weights,
    implicit_rewards,
    load_model_and_tokenizer,
    preference_metrics,
    sequence_logps,
    tokenize_pair,
    tokenize_records,
    train,
)

__all__ = [
    "IGNORE_INDEX", "TrainConfig", "check_record", "collate", "concatenated_forward", "dpo_loss",
    "gradient_weights", "implicit_rewards", "load_model_and_tokenizer", "preference_metrics",
    "sequence_logps", "tokenize_pair", "tokenize_records", "train",
]
