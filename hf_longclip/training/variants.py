"""What the trainer needs to know about each variant, in one table.

The training loop talks to models only through their public surface (``loss_features`` / ``loss_from_features`` /
``forward(..., return_loss=True)``); everything variant-specific that the loop needs beyond that is here: the model
class, the collator, the default train transform, extra loss arguments per step (FineLIP's hinge warm-up), what
runs after each optimiser step (beta-CLIP's temperature clamp), and which record fields the collator reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import BetaCLIPModel, FineLIPModel, FixCLIPModel, LongCLIPModel, LongCLIPProcessor, MulCLIPModel
from ..data import BetaCLIPCollator, FineLIPCollator, FixCLIPCollator, LongCLIPCollator, MulCLIPCollator
from ..text.hierarchy import HIERARCHY_FIELDS
from .arguments import TINY_BASE, ModelArguments

logger = logging.getLogger(__name__)


def _no_step_kwargs(model, step: int, steps_per_epoch: int) -> dict[str, Any]:
    return {}


def _finelip_step_kwargs(model, step: int, steps_per_epoch: int) -> dict[str, Any]:
    # The authors ramp the hinge loss linearly over the first epoch (model.hinge_warmup_alpha; off by config).
    return {"warmup_alpha": model.hinge_warmup_alpha(step, steps_per_epoch)}


def _no_after_step(model) -> None:
    return None


def _clamp_logit_scales(model) -> None:
    model.clamp_logit_scales()


@dataclass(frozen=True)
class VariantSpec:
    """Per-variant hooks of the training loop."""

    name: str
    model_class: type
    make_collator: Callable[..., Callable]  # (processor, model, seed, **collator_config) -> collator
    default_transform: str = "eval"
    step_kwargs: Callable[[Any, int, int], dict[str, Any]] = _no_step_kwargs
    after_step: Callable[[Any], None] = _no_after_step
    record_fields: tuple[str, ...] = field(default_factory=tuple)


VARIANT_SPECS: dict[str, VariantSpec] = {
    "longclip": VariantSpec(
        "longclip", LongCLIPModel, lambda processor, model, seed, **kw: LongCLIPCollator(processor, **kw)
    ),
    "finelip": VariantSpec(
        "finelip", FineLIPModel, lambda processor, model, seed, **kw: FineLIPCollator(processor, **kw),
        step_kwargs=_finelip_step_kwargs,
    ),
    # Patch masks are drawn inside the model from torch's RNG, which the trainer seeds per step.
    "fixclip": VariantSpec(
        "fixclip", FixCLIPModel, lambda processor, model, seed, **kw: FixCLIPCollator(processor, **kw)
    ),
    "mulclip": VariantSpec(
        "mulclip", MulCLIPModel, lambda processor, model, seed, **kw: MulCLIPCollator(processor, seed=seed, **kw)
    ),
    "betaclip": VariantSpec(
        "betaclip", BetaCLIPModel,
        lambda processor, model, seed, **kw: BetaCLIPCollator(processor, seed=seed, **kw),
        default_transform="random_resized_crop",
        after_step=_clamp_logit_scales,
        record_fields=HIERARCHY_FIELDS,
    ),
}


def make_collator(spec: VariantSpec, processor, model, seed: int, collator_config: dict[str, Any]):
    """The variant's collator with the recipe's `collator_config` arguments (a clear error for unknown ones)."""
    try:
        return spec.make_collator(processor, model, seed, **collator_config)
    except TypeError as error:
        raise ValueError(f"collator_config {collator_config} does not fit the {spec.name} collator: {error}") from None


def variant_spec(name: str) -> VariantSpec:
    try:
        return VARIANT_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(VARIANT_SPECS)}") from None


def tiny_base_model(args: ModelArguments, seed: int):
    """The random CLIP of ``--base tiny-random`` (stock `CLIPModel`, 77 positions) and its processor.

    The tokenizer knows the synthetic scenes' words as whole tokens (any other text still tokenises byte by byte).
    """
    from ..data.synthetic import SYNTHETIC_WORDS
    from ..testing_utils import DEFAULT_WORDS, tiny_clip_config, tiny_processor

    processor = tiny_processor(words=sorted(set(SYNTHETIC_WORDS) | set(DEFAULT_WORDS)), image_size=args.tiny_image_size)
    from transformers import CLIPModel

    torch.manual_seed(seed)
    config = tiny_clip_config(
        vocab_size=len(processor.tokenizer),
        hidden_size=args.tiny_hidden_size,
        num_layers=args.tiny_num_layers,
        num_heads=args.tiny_num_heads,
        projection_dim=args.tiny_projection_dim,
        image_size=args.tiny_image_size,
        patch_size=args.tiny_patch_size,
    )
    return CLIPModel(config), processor


def build_model_and_processor(args: ModelArguments, seed: int = 0):
    """The model to train and its processor, from ``args.base``.

    * ``tiny-random``: a small random CLIP, stretched (quickstart and tests);
    * a stock CLIP (Hub id or folder, ``model_type: clip``): stretched with the variant's ``from_clip`` and freshly
      initialised heads; the processor is that CLIP's tokenizer (at the stretched length) and image processor;
    * an hf_longclip checkpoint of the same variant: loaded as it is, to continue training.

    ``args.model_config`` fields are set on the variant's config (for a checkpoint, they override its values).
    """
    spec = variant_spec(args.variant)
    overrides = args.model_config_overrides()
    stretch = {"position_keep": args.position_keep, "position_ratio": args.position_ratio,
               "reset_logit_scale": args.reset_logit_scale}
    if args.base == TINY_BASE:
        clip, processor = tiny_base_model(args, seed)
        model = spec.model_class.from_clip(clip, **stretch, **overrides)
    else:
        from transformers import AutoConfig, AutoProcessor

        hub = {"revision": args.revision} if args.revision else {}
        try:
            source = AutoConfig.from_pretrained(args.base, **hub)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read a model config from --base {args.base!r}: {error}") from error
        model_type = getattr(source, "model_type", None)
        own_type = spec.model_class.config_class.model_type
        if model_type == "clip":
            model = spec.model_class.from_clip(args.base, **stretch, **overrides, **hub)
            processor = LongCLIPProcessor.from_clip(
                args.base, max_length=model.config.text_config.max_position_embeddings, **hub
            )
        elif model_type == own_type:
            model = spec.model_class.from_pretrained(args.base, **overrides, **hub)
            processor = AutoProcessor.from_pretrained(args.base, **hub)
        else:
            raise ValueError(
                f"--base {args.base!r} is a {model_type!r} model; training {args.variant} needs a stock CLIP "
                f"(model_type 'clip') or a saved {own_type!r} checkpoint"
            )
    if args.gradient_checkpointing == "all":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.gradient_checkpointing == "text":
        enable_text_checkpointing(model)
    return model, processor


def enable_text_checkpointing(model) -> None:
    """Recompute the text tower's activations in the backward pass (and only the text tower's)."""
    if hasattr(model, "enable_text_gradient_checkpointing"):
        model.enable_text_gradient_checkpointing()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.vision_model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False


__all__ = [
    "VARIANT_SPECS",
    "VariantSpec",
    "build_model_and_processor",
    "enable_text_checkpointing",
    "make_collator",
    "variant_spec",
]
