"""Reusable training pieces: settings, optimiser groups and schedules, cached-feature accumulation, checkpoints.

The loop itself lives in ``training_scripts/train.py`` and uses only this package's public functions.
"""

from .arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    arguments_to_dict,
    load_recipe,
    parse_training_arguments,
)

__all__ = [
    "DataArguments",
    "ModelArguments",
    "TrainingArguments",
    "arguments_to_dict",
    "load_recipe",
    "parse_training_arguments",
]
