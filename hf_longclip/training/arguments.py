"""Training settings: three dataclasses read from a YAML recipe and/or command-line flags.

``parse_training_arguments(argv)`` reads ``--config RECIPE`` first (a shipped recipe's name, e.g.
``longclip-vit-b16``, or a YAML file) and lets any flag on the command line override it (``--learning_rate 2e-6``).
The names users of transformers' and diffusers' example scripts type are accepted as aliases (`ALIASES`,
``--bf16`` / ``--fp16``, a boolean ``--gradient_checkpointing``), on the command line and in recipes. Every value
is checked before any work starts: an unknown key, a wrong type, an impossible value or two spellings of one
setting with different values is a ``ValueError`` naming the setting(s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

import yaml

from ..resources import available_recipes, resolve_recipe
from ..variants import TRAIN_TRANSFORMS, VARIANTS, get_variant

logger = logging.getLogger(__name__)

#: `--base` value that builds a small random CLIP from config (quickstart, tests, offline demos).
TINY_BASE = "tiny-random"


def variants_reading(field_name: str) -> list[str]:
    """The registered variants whose model reads config field `field_name` (`config_fields_in_use`)."""
    return [name for name, v in VARIANTS.items() if field_name in v.model_class.config_fields_in_use()]


def check_model_config_for_variant(variant: str, overrides: dict[str, Any]) -> None:
    """Refuse `model_config` fields that `variant` has (inherited from Long-CLIP's config) but never reads, e.g.
    ``pca_components`` (only Long-CLIP's short-caption PCA term uses it): a `ValueError` naming each field and the
    variants that read it."""
    unused = sorted(set(overrides) & get_variant(variant).model_class.unused_config_fields)
    if unused:
        owners = "; ".join(f"{name}: {', '.join(variants_reading(name)) or 'no variant'}" for name in unused)
        raise ValueError(
            f"model_config {unused} {'is' if len(unused) == 1 else 'are'} not used by {variant} (inherited config "
            f"field(s) its loss never reads); the variants that read them: {owners}. Leave them out for {variant}"
        )


@dataclass
class ModelArguments:
    """Which model to train and how to build it."""

    _argument_group_name: ClassVar[str] = "model"

    variant: str = field(
        default="longclip",
        metadata={"help": "method to train: a registered variant (hf_longclip.VARIANTS: " + ", ".join(VARIANTS) + ")"},
    )
    base: str = field(
        default="openai/clip-vit-base-patch16",
        metadata={
            "help": "a stock CLIP (Hub id or folder) to stretch and fine-tune, an hf_longclip checkpoint to continue "
            f"from, or '{TINY_BASE}' for a small random CLIP built from config (see tiny_* settings)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of --base"})
    model_config: str | None = field(
        default=None,
        metadata={"help": "JSON object of variant config fields, e.g. '{\"beta_cal_mode\": \"bce\"}' (YAML: a mapping)"},
    )
    position_keep: int = field(default=20, metadata={"help": "leading text positions copied and frozen"})
    position_ratio: int = field(default=4, metadata={"help": "rows each remaining source position becomes"})
    reset_logit_scale: bool = field(
        default=False,
        metadata={"help": "set logit_scale to 4.6052 (ln 100) before training, as Long-CLIP's and FineLIP's code does "
                          "(their recipes set it); default: keep the source model's"},
    )
    gradient_checkpointing: str = field(
        default="none",
        metadata={"help": "activation checkpointing: none, all (both towers; a bare --gradient_checkpointing or "
                          "true), or text (the text tower only)", "nargs": "?", "const": "all"},
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": f"width of both towers of '{TINY_BASE}'"})
    tiny_num_layers: int = field(default=2, metadata={"help": f"layers per tower of '{TINY_BASE}'"})
    tiny_num_heads: int = field(default=4, metadata={"help": f"attention heads of '{TINY_BASE}'"})
    tiny_projection_dim: int = field(default=64, metadata={"help": f"joint embedding size of '{TINY_BASE}'"})
    tiny_image_size: int = field(default=64, metadata={"help": f"input resolution of '{TINY_BASE}'"})
    tiny_patch_size: int = field(default=8, metadata={"help": f"patch size of '{TINY_BASE}'"})

    def model_config_overrides(self) -> dict[str, Any]:
        return _json_object("model_config", self.model_config)

    def __post_init__(self):
        get_variant(self.variant)  # a ValueError listing the registered variants
        self.gradient_checkpointing = _checkpointing_towers(self.gradient_checkpointing)
        check_model_config_for_variant(self.variant, self.model_config_overrides())
        for name in ("tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_projection_dim", "tiny_image_size",
                     "tiny_patch_size"):
            _positive(name, getattr(self, name))
        if self.tiny_hidden_size % self.tiny_num_heads:
            raise ValueError("tiny_hidden_size must be divisible by tiny_num_heads")
        if self.tiny_image_size % self.tiny_patch_size:
            raise ValueError("tiny_image_size must be divisible by tiny_patch_size")


@dataclass
class DataArguments:
    """Where the training (and evaluation) data come from and how they are read."""

    _argument_group_name: ClassVar[str] = "data"

    train_data: str = field(
        default="synthetic",
        metadata={"help": "ShareGPT4V JSON, JSONL/CSV/TSV file, a `datasets` id or folder, webdataset shards "
                  "('shards/{00000..00099}.tar', pipe:..., URLs; needs max_steps), or 'synthetic'"},
    )
    data_format: Literal["auto", "sharegpt4v", "jsonl", "csv", "hf", "webdataset", "docci", "synthetic"] = field(
        default="auto",
        metadata={"help": "format of --train_data ('auto' guesses from the name and content; 'docci': the folder "
                  "holding docci/ in the evaluation layout, train split)"},
    )
    image_root: str | None = field(default=None, metadata={"help": "folder that relative image paths start from"})
    image_column: str = field(default="image", metadata={"help": "column (or JSON key) of the image path / bytes"})
    caption_column: str = field(default="caption", metadata={"help": "column (or JSON key) of the long caption"})
    short_caption_column: str | None = field(
        default="short_caption", metadata={"help": "column of short captions (first sentence of the long one if absent)"}
    )
    hf_split: str = field(default="train", metadata={"help": "split of a `datasets` source"})
    streaming: bool = field(default=False, metadata={"help": "stream a `datasets` source instead of downloading it"})
    shuffle_buffer: int = field(
        default=1000,
        metadata={"help": "webdataset shards: samples in each data worker's shuffle buffer (memory: about that many "
                  "encoded images per worker; 0: no shuffling within shards)"},
    )
    holdout: int = field(default=1000, metadata={"help": "ShareGPT4V: leading entries held out (the papers' 1k set)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training samples"})
    record_index: Literal["auto", "always", "never"] = field(
        default="auto",
        metadata={"help": "ShareGPT4V / JSON / JSONL / CSV / TSV files: read through a memory-mapped record index built "
                  "once and cached ('auto': files of 16 MiB or more; same records either way; docs/data.md)"},
    )
    index_dir: str | None = field(
        default=None,
        metadata={"help": "where record indexes are cached (default: $HF_LONGCLIP_INDEX_DIR or "
                  "~/.cache/hf_longclip/index)"},
    )
    eval_data: str | None = field(
        default=None, metadata={"help": "held-out pairs (JSONL/CSV/ShareGPT4V) for long-caption retrieval R@k"}
    )
    eval_format: Literal["auto", "sharegpt4v", "jsonl", "csv", "docci"] = field(
        default="auto", metadata={"help": "format of --eval_data ('docci': the DOCCI test split)"}
    )
    eval_split: Literal["all", "holdout"] = field(
        default="all", metadata={"help": "'holdout' evaluates on the held-out head of a ShareGPT4V file"}
    )
    max_eval_samples: int | None = field(default=1000, metadata={"help": "held-out pairs evaluated (the first N)"})
    synthetic_num_train: int = field(default=2000, metadata={"help": "scenes generated for --train_data synthetic"})
    synthetic_num_eval: int = field(default=200, metadata={"help": "held-out scenes for --train_data synthetic"})
    synthetic_image_size: int = field(default=64, metadata={"help": "side of the generated scenes, in pixels"})
    transform: str = field(
        default="auto",
        metadata={"help": "train-time image transform ('auto': the variant's recipe)", "choices": ["auto", *TRAIN_TRANSFORMS]},
    )
    num_workers: int = field(default=2, metadata={"help": "data-loading worker processes per training process"})
    max_image_pixels: int = field(default=8192 * 8192, metadata={"help": "larger images are skipped"})
    max_image_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "image files (or embedded image bytes) larger than this are skipped, checked before reading"},
    )
    strict: bool = field(default=False, metadata={"help": "stop at start-up / at the first bad sample instead of skipping"})
    text_cache_dir: str | None = field(
        default=None, metadata={"help": "beta-CLIP: where parsed caption hierarchies are cached (default: output_dir)"}
    )
    text_num_proc: int = field(default=1, metadata={"help": "beta-CLIP: processes for the one-off spaCy parse"})
    collator_config: str | None = field(
        default=None,
        metadata={"help": "JSON object of collator arguments, e.g. beta-CLIP '{\"num_sentences\": 5, \"max_phrases\": "
                  "30, \"caption_mode\": \"full\"}' or MulCLIP '{\"max_subcaptions\": 8}' (YAML: a mapping)"},
    )

    def collator_overrides(self) -> dict[str, Any]:
        return _json_object("collator_config", self.collator_config)

    def __post_init__(self):
        _positive("holdout", self.holdout, allow_zero=True)
        _positive("synthetic_num_train", self.synthetic_num_train)
        _positive("synthetic_num_eval", self.synthetic_num_eval, allow_zero=True)
        _positive("synthetic_image_size", self.synthetic_image_size)
        _positive("num_workers", self.num_workers, allow_zero=True)
        _positive("shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _positive("max_image_pixels", self.max_image_pixels)
        _positive("max_image_bytes", self.max_image_bytes)
        _positive("text_num_proc", self.text_num_proc)
        if self.transform not in ("auto", *TRAIN_TRANSFORMS):
            raise ValueError(f"transform must be 'auto' or one of {TRAIN_TRANSFORMS}, got {self.transform!r}")
        self.collator_overrides()
        if self.max_train_samples is not None:
            _positive("max_train_samples", self.max_train_samples)
        if self.max_eval_samples is not None:
            _positive("max_eval_samples", self.max_eval_samples)


@dataclass
class TrainingArguments:
    """Optimisation, precision, logging and checkpointing."""

    _argument_group_name: ClassVar[str] = "training"

    output_dir: str = field(default="outputs/run", metadata={"help": "checkpoints, logs and the final model"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the data (when max_steps <= 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimiser steps in total (overrides epochs when > 0)"})
    stop_after_steps: int | None = field(
        default=None,
        metadata={"help": "stop (after a checkpoint) once this many steps are done, keeping the full schedule; for "
                  "time-sliced jobs that continue with --resume_from_checkpoint latest"},
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "samples per process per micro-batch"})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per optimiser step (see accumulation_mode)"}
    )
    accumulation_mode: Literal["cached", "naive"] = field(
        default="cached",
        metadata={"help": "'cached': negatives from the whole accumulated batch (GradCache); 'naive': the authors'"},
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "peak lr of the CLIP backbone"})
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "peak lr of the variant's added modules (default: learning_rate)"}
    )
    min_learning_rate: float = field(default=0.0, metadata={"help": "backbone lr at the end of the cosine"})
    head_min_learning_rate: float | None = field(default=None, metadata={"help": "head lr at the end of the cosine"})
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "decay after the warm-up"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the backbone lr"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warm-up as a fraction of all steps (if warmup_steps=0)"})
    head_warmup_steps: int | None = field(default=None, metadata={"help": "warm-up of the head lr (default: same)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (see weight_decay_filter)"})
    weight_decay_filter: Literal["all", "matrices"] = field(
        default="all", metadata={"help": "'all': decay every parameter (Long-CLIP); 'matrices': not biases/norms/1-D"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping norm (0: off)"})
    mixed_precision: Literal["config", "no", "fp16", "bf16"] = field(
        default="config", metadata={"help": "'config': what `accelerate config` / `accelerate launch` set"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and every step's randomness"})
    logging_steps: int = field(default=10, metadata={"help": "log loss terms, lr and throughput every N steps"})
    report_to: str = field(
        default="none",
        metadata={"help": "trackers, comma-separated: any that accelerate supports (tensorboard, wandb, comet_ml, "
                          "mlflow, aim, clearml, dvclive, swanlab, trackio ...), all (every installed one), or none"},
    )
    tracker_project: str = field(default="hf_longclip", metadata={"help": "project name in the trackers"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate every N steps (0: only before and after training)"})
    eval_before_training: bool = field(default=True, metadata={"help": "evaluate the model before the first step"})
    eval_batch_size: int = field(default=64, metadata={"help": "images / texts per forward pass in evaluation"})
    save_steps: int = field(default=500, metadata={"help": "write a checkpoint every N steps (0: only at the end)"})
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints kept (oldest removed first)"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (in output_dir/checkpoints) or a checkpoint folder"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "start a new run in an output_dir that holds another run's checkpoints, deleting them "
                          "(otherwise refused: resume it or choose another output_dir)"},
    )
    save_final_model: bool = field(default=True, metadata={"help": "save_pretrained model + processor + card at the end"})
    push_to_hub: bool = field(default=False, metadata={"help": "push the final model, processor and card to the Hub"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository of --push_to_hub (user/name)"})
    hub_private: bool = field(default=False, metadata={"help": "create the Hub repository private"})
    hub_revision: str | None = field(default=None, metadata={"help": "branch to push to (created if missing)"})
    disable_progress_bar: bool = field(default=False, metadata={"help": "no tqdm bar (logs only)"})

    def __post_init__(self):
        _positive("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError("set num_train_epochs > 0 or max_steps > 0")
        if self.stop_after_steps is not None:
            _positive("stop_after_steps", self.stop_after_steps)
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("head_learning_rate", "head_min_learning_rate"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate ({self.min_learning_rate}) exceeds learning_rate ({self.learning_rate})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _positive("warmup_steps", self.warmup_steps, allow_zero=True)
        if self.head_warmup_steps is not None:
            _positive("head_warmup_steps", self.head_warmup_steps, allow_zero=True)
        _positive("logging_steps", self.logging_steps)
        _positive("eval_steps", self.eval_steps, allow_zero=True)
        _positive("eval_batch_size", self.eval_batch_size)
        _positive("save_steps", self.save_steps, allow_zero=True)
        _positive("save_total_limit", self.save_total_limit)
        _check_trackers(self.trackers)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id")

    @property
    def trackers(self) -> list[str]:
        """The trackers of `report_to`, without ``none`` (``all``: every installed one, as accelerate reads it)."""
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]


def _checkpointing_towers(value: str | bool) -> str:
    """``none`` / ``all`` / ``text`` from a tower name or a boolean (``--gradient_checkpointing`` alone: all)."""
    words = {"true": "all", "yes": "all", "1": "all", "false": "none", "no": "none", "0": "none"}
    towers = words.get(str(value).strip().lower(), str(value).strip().lower())
    if towers not in ("none", "all", "text"):
        raise ValueError(f"gradient_checkpointing must be a boolean, none, all or text, got {value!r}")
    return towers


def _check_trackers(trackers: list[str]) -> None:
    """Every named tracker is one accelerate supports and is installed (accelerate itself would drop a missing one
    with only a warning)."""
    if not trackers:
        return
    from ..extras import require

    require("accelerate", "train", "report_to")
    from accelerate import utils
    from accelerate.utils import LoggerType

    supported = [kind.value for kind in LoggerType]
    unknown = sorted(set(trackers) - set(supported))
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; accelerate supports {', '.join(supported)} or none")
    for name in trackers:
        available = getattr(utils, f"is_{name}_available", None)
        if name != "all" and available is not None and not available():
            raise ValueError(f"report_to: {name} is not installed (pip install {name.replace('_', '-')})")


def _json_object(name: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)

#: Names users of transformers' (Trainer, example scripts) and diffusers' training scripts type -> our setting.
#: Accepted on the command line and in recipes; `--help` lists each next to its setting.
ALIASES: dict[str, str] = {
    "model_name_or_path": "base",
    "pretrained_model_name_or_path": "base",
    "dataset_name": "train_data",
    "train_file": "train_data",
    "validation_file": "eval_data",
    "dataloader_num_workers": "num_workers",
    "train_batch_size": "per_device_train_batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "max_train_steps": "max_steps",
    "lr_scheduler": "lr_scheduler_type",
    "lr_warmup_steps": "warmup_steps",
    "adam_weight_decay": "weight_decay",
    "checkpointing_steps": "save_steps",
    "checkpoints_total_limit": "save_total_limit",
    "tracker_project_name": "tracker_project",
    "hub_private_repo": "hub_private",
    "disable_tqdm": "disable_progress_bar",
}
#: Boolean flags choosing a mixed precision (transformers' spelling) -> the `mixed_precision` value they set.
PRECISION_FLAGS: dict[str, str] = {"bf16": "bf16", "fp16": "fp16"}


def _field_names() -> dict[str, type]:
    return {f.name: cls for cls in ARGUMENT_CLASSES for f in fields(cls)}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe (a shipped recipe's name or a YAML file) into a flat ``{setting: value}`` mapping.

    A recipe may be flat or grouped under ``model:``, ``data:`` and ``training:``, and may use the `ALIASES` and
    `PRECISION_FLAGS` spellings; unknown keys are an error that lists the valid ones.
    """
    path = resolve_recipe(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"recipe {path} must be a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in ("model", "data", "training") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = _field_names()
    unknown = sorted(set(flat) - set(known) - set(ALIASES) - set(PRECISION_FLAGS))
    if unknown:
        raise ValueError(f"recipe {path}: unknown setting(s) {unknown}; valid settings: {sorted(known)}")
    for key in ("model_config", "collator_config"):
        if isinstance(flat.get(key), dict):
            flat[key] = json.dumps(flat[key])
    return flat


def build_argument_parser(show_defaults: bool = True):
    """The command-line parser of the training settings: one group per settings class, each alias next to its
    setting, defaults shown in ``--help``. With ``show_defaults=False`` every default is suppressed, so parsing
    returns only what the words set (how recipe and command line are merged)."""
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    recipes = ", ".join(available_recipes()) or "none found"
    parser = HfArgumentParser(
        ARGUMENT_CLASSES,
        prog="hf-longclip train",
        description="Fine-tune an hf_longclip variant. Settings come from --config (a recipe) and then from the "
        "command line, which wins. Aliases (transformers / diffusers spellings) set the same setting as the name "
        "they stand for. Recipe values are YAML; on the command line a boolean may be given alone (--bf16).",
        epilog=f"shipped recipes (--config NAME): {recipes}. Guide: docs/training.md.",
    )
    parser.add_argument(
        "--config", default=None,
        help="recipe: a shipped recipe's name (see below) or a YAML file; the command line overrides its values",
    )
    actions = {action.dest: action for action in parser._actions}
    groups = {action.dest: group for group in parser._action_groups for action in group._group_actions}
    for alias, target in ALIASES.items():
        action = actions[target]
        groups[target].add_argument(
            f"--{alias}", dest=alias, type=action.type, choices=action.choices, nargs=action.nargs,
            const=action.const, default=argparse.SUPPRESS, help=f"alias of --{target}",
        )
    for flag, mode in PRECISION_FLAGS.items():
        groups["mixed_precision"].add_argument(
            f"--{flag}", dest=flag, type=string_to_bool, nargs="?", const=True, default=argparse.SUPPRESS,
            help=f"use {mode} mixed precision (same as --mixed_precision {mode}; false: no mixed precision)",
        )
    if not show_defaults:
        for action in parser._actions:
            if action.dest != "help":
                action.default = argparse.SUPPRESS
    return parser


def _given(parser, tokens: list[str], where: str) -> dict[str, Any]:
    """The settings `tokens` set (aliases and precision flags resolved); conflicting spellings are an error."""
    try:
        given = vars(parser.parse_args(tokens))
    except SystemExit as error:
        if error.code:
            raise ValueError(f"invalid training settings in {where} (see the message above)") from None
        raise
    given.pop("config", None)
    settings = {key: value for key, value in given.items() if key not in ALIASES and key not in PRECISION_FLAGS}
    spelled = {key: key for key in settings}

    def put(target: str, value: Any, name: str) -> None:
        if target in settings and settings[target] != value:
            raise ValueError(
                f"{where}: --{name} ({value!r}) and --{spelled[target]} ({settings[target]!r}) both set {target}, to "
                "different values; give one of them"
            )
        settings[target], spelled[target] = value, name

    for alias, target in ALIASES.items():
        if alias in given:
            put(target, given[alias], alias)
    chosen = [flag for flag in PRECISION_FLAGS if given.get(flag) is True]
    if len(chosen) > 1:
        raise ValueError(f"{where}: --{chosen[0]} and --{chosen[1]} ask for two mixed precisions; give one")
    for flag, mode in PRECISION_FLAGS.items():
        if flag not in given:
            continue
        if given[flag]:
            put("mixed_precision", mode, flag)
        elif not chosen:  # --bf16 false: no mixed precision (as transformers reads it)
            if settings.get("mixed_precision") == mode:
                raise ValueError(f"{where}: --{flag} false and --{spelled['mixed_precision']} {mode} contradict")
            settings.setdefault("mixed_precision", "no")
            spelled.setdefault("mixed_precision", f"{flag} false")
    return settings


def parse_training_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``[--config RECIPE] [--setting value ...]`` (``sys.argv[1:]`` when None); command-line values override
    the recipe's, whichever spelling either uses. ``-h`` / ``--help`` prints the settings and exits."""
    argv = [str(token) for token in (sys.argv[1:] if argv is None else argv)]
    if "-h" in argv or "--help" in argv:
        build_argument_parser().parse_args(["--help"])  # prints and exits
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_argument_parser(show_defaults=False)
    settings: dict[str, Any] = {}
    command_line = _given(parser, argv, "the command line")
    if known.config:
        recipe = load_recipe(known.config)
        tokens = [token for key, value in recipe.items() for token in _as_flags(key, value)]
        settings.update(_given(parser, tokens, f"recipe {known.config}"))
        if "model_config" not in command_line:
            _fit_recipe_model_config(settings, command_line.get("variant"), known.config)
    settings.update(command_line)
    owner = _field_names()
    return tuple(  # type: ignore[return-value]
        cls(**{key: value for key, value in settings.items() if owner[key] is cls}) for cls in ARGUMENT_CLASSES
    )


def _fit_recipe_model_config(recipe: dict[str, Any], variant: str | None, where: str) -> None:
    """A recipe's ``model_config`` is written for the recipe's ``variant``: when the command line trains another
    variant, keep only the fields that variant reads (`config_fields_in_use`) and drop the rest with a warning (the
    quickstart recipe's Long-CLIP ``pca_components`` under ``--variant finelip``, say)."""
    written_for = recipe.get("variant")
    if variant is None or written_for is None or variant == written_for or not recipe.get("model_config"):
        return
    fields = _json_object("model_config", recipe["model_config"])
    in_use = get_variant(variant).model_class.config_fields_in_use()
    dropped = sorted(set(fields) - in_use)
    if dropped:
        logger.warning(
            "recipe %s: model_config %s %s for %s, which %s does not read; not applied (kept: %s)",
            where, dropped, "is" if len(dropped) == 1 else "are", written_for, variant,
            sorted(set(fields) & in_use) or "none",
        )
    recipe["model_config"] = json.dumps({k: v for k, v in fields.items() if k in in_use}) if set(fields) & in_use else None
    if recipe["model_config"] is None:
        del recipe["model_config"]


def _as_flags(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool):
        return [f"--{key}", "true" if value else "false"]
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *map(str, value)]
    return [f"--{key}", str(value)]


def arguments_to_dict(*groups) -> dict[str, Any]:
    """All settings as one flat, JSON-serialisable mapping (for trackers, checkpoints and the model card)."""
    out: dict[str, Any] = {}
    for group in groups:
        out.update(asdict(group))
    return out


__all__ = [
    "ALIASES",
    "check_model_config_for_variant",
    "variants_reading",
    "ARGUMENT_CLASSES",
    "PRECISION_FLAGS",
    "build_argument_parser",
    "DataArguments",
    "ModelArguments",
    "TINY_BASE",
    "TrainingArguments",
    "arguments_to_dict",
    "load_recipe",
    "parse_training_arguments",
]
