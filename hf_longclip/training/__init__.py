"""Training: settings (recipes and flags), the loop (`run`, `main`), optimiser groups and schedules, cached-feature
accumulation, checkpoints.

``from hf_longclip.training import run`` trains from Python; ``hf-longclip train``, ``accelerate launch -m
hf_longclip.train`` and ``training_scripts/train.py`` are the same loop from the command line. Importing this
package needs only the base install; training itself needs the ``train`` extra (``pip install 'hf-longclip[train]'``).
"""

from .arguments import (
    ALIASES,
    PRECISION_FLAGS,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    arguments_to_dict,
    build_argument_parser,
    load_recipe,
    parse_training_arguments,
)
from .trainer import main, run

__all__ = [
    "ALIASES",
    "PRECISION_FLAGS",
    "DataArguments",
    "ModelArguments",
    "TrainingArguments",
    "arguments_to_dict",
    "build_argument_parser",
    "load_recipe",
    "main",
    "parse_training_arguments",
    "run",
]
