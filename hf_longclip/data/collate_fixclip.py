"""Collator for Fix-CLIP: images + long caption + short caption (+ optionally the short branch's patch masks).

Fix-CLIP's dual branch needs both captions of every image: the long caption for ``L_long`` and a short one for
``L_short``. The short caption is the example's ``short_caption`` when given (e.g. the original alt-text of a web
image) and otherwise the long caption's first sentence (the Long-CLIP / ShareGPT4V convention). Each text field is
tokenised at its own batch-longest length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.modeling_fixclip import random_patch_mask
from ..models.processing_longclip import LongCLIPProcessor
from .collate import LongCLIPCollator


class FixCLIPCollator(LongCLIPCollator):
    """Build Fix-CLIP training batches.

    An example is a mapping with ``image`` (PIL) or ``pixel_values``, ``caption`` (the long caption) and optionally
    ``short_caption`` (default: the caption's first sentence).

    By default the model draws the short branch's random patch mask itself (``FixCLIPModel.forward`` takes a
    ``mask_generator``). Giving ``mask_ratio`` makes the collator draw it instead, from its own seeded generator, and
    add ``patch_mask`` to the batch: reproducible per data-loader worker and independent of the model's RNG use.

    Args:
        processor (`LongCLIPProcessor`): the model's processor.
        mask_ratio (`float`, *optional*): fraction of patches to mask per image (the model's ``mask_ratio``); None
            leaves masking to the model.
        num_patches (`int`, *optional*): patches per image; needed with ``mask_ratio`` (``config.num_patches``).
        seed (`int`, *optional*): seed of the collator's mask generator (torch's global RNG when None).

    Returns (from `__call__`): a dict with ``pixel_values`` `(B, 3, H, W)`, ``input_ids`` / ``attention_mask``
    `(B, L)`, ``short_input_ids`` / ``short_attention_mask`` `(B, Ls)` and, with ``mask_ratio``, ``patch_mask``
    `(B, num_patches)` (bool).

    Example:

    ```python
    >>> collator = FixCLIPCollator(processor, mask_ratio=0.75, num_patches=model.config.num_patches, seed=0)
    >>> batch = collator([{"pixel_values": torch.zeros(3, 224, 224), "caption": "A dog on a sofa. The sofa is red."}])
    >>> model(**batch, return_loss=True).loss
    ```
    """

    def __init__(
        self,
        processor: LongCLIPProcessor,
        mask_ratio: float | None = None,
        num_patches: int | None = None,
        seed: int | None = None,
    ):
        super().__init__(processor, with_short_caption=True)
        if mask_ratio is not None:
            if not 0.0 <= mask_ratio < 1.0:
                raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
            if num_patches is None or num_patches < 1:
                raise ValueError("mask_ratio needs num_patches (the model's config.num_patches)")
        self.mask_ratio = mask_ratio
        self.num_patches = num_patches
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        if self.mask_ratio is not None:
            batch["patch_mask"] = random_patch_mask(len(examples), self.num_patches, self.mask_ratio, self.generator)
        return batch


__all__ = ["FixCLIPCollator"]
