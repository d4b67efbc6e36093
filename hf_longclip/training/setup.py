"""Building what a training run starts from: the variant model (stretched from a stock CLIP, continued from a
checkpoint, or the quickstart's tiny random CLIP) and its processor. Per-variant behaviour comes from the registry
(`hf_longclip.variants`) and from the model's own training hooks, never from this module."""

from __future__ import annotations

import logging

import torch

from ..models import LongCLIPProcessor
from ..variants import get_variant
from .arguments import TINY_BASE, ModelArguments

logger = logging.getLogger(__name__)


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

    * ``tiny-random``: a small random CLIP, stretched (quickstart and tests), with the registry's ``tiny_config``;
    * a stock CLIP (Hub id or folder, ``model_type: clip``): stretched with the variant's ``from_clip`` and freshly
      initialised heads; the processor is that CLIP's tokenizer (at the stretched length) and image processor;
    * an hf_longclip checkpoint of the same variant: loaded as it is, to continue training;
    * an hf_longclip checkpoint of another variant (e.g. a trained Long-CLIP for FineLIP): its backbone, with this
      variant's heads added fresh.

    ``args.model_config`` fields are set on the variant's config (for a checkpoint, they override its values).
    """
    variant = get_variant(args.variant)
    overrides = args.model_config_overrides()
    stretch = {"position_keep": args.position_keep, "position_ratio": args.position_ratio,
               "reset_logit_scale": args.reset_logit_scale}
    if args.base == TINY_BASE:
        clip, processor = tiny_base_model(args, seed)
        # the registry's tiny_config keeps small towers valid (Fix-CLIP's groups must divide 2 layers); recipe
        # fields win
        model = variant.model_class.from_clip(clip, **stretch, **{**variant.tiny_config, **overrides})
    else:
        from transformers import AutoConfig, AutoProcessor

        from ..variants import VARIANTS

        hub = {"revision": args.revision} if args.revision else {}
        try:
            source = AutoConfig.from_pretrained(args.base, **hub)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read a model config from --base {args.base!r}: {error}") from error
        model_type = getattr(source, "model_type", None)
        if model_type == variant.name:
            model = variant.model_class.from_pretrained(args.base, **overrides, **hub)
            processor = AutoProcessor.from_pretrained(args.base, **hub)
        elif model_type == "clip":
            model = variant.model_class.from_clip(args.base, **stretch, **overrides, **hub)
            processor = LongCLIPProcessor.from_clip(
                args.base, max_length=model.config.text_config.max_position_embeddings, **hub
            )
        elif model_type in VARIANTS:
            model = variant.model_class.from_clip(args.base, **stretch, **overrides, **hub)
            processor = AutoProcessor.from_pretrained(args.base, **hub)
        else:
            raise ValueError(
                f"--base {args.base!r} is a {model_type!r} model; training {args.variant} needs a stock CLIP "
                f"(model_type 'clip') or an hf_longclip checkpoint ({', '.join(VARIANTS)})"
            )
    if args.gradient_checkpointing != "none":
        model.enable_checkpointing(args.gradient_checkpointing)
    return model, processor


__all__ = ["build_model_and_processor", "tiny_base_model"]
