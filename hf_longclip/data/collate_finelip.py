"""Collator for FineLIP: images, long captions (padded to the batch's longest) and image ids."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..text.sentences import normalise_caption
from .collate import LongCLIPCollator


def stable_image_id(value: Any) -> int:
    """An integer id for an example's ``id``: integers as they are, anything else by a stable 63-bit hash of its
    string form, so every process maps the same image (e.g. a file name) to the same id."""
    if isinstance(value, bool):
        raise TypeError("a bool is not an image id")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FineLIPCollator(LongCLIPCollator):
    """Collator for [`FineLIPModel`]: only the long caption is tokenised (FineLIP ignores short captions).

    Output: ``pixel_values``, ``input_ids`` / ``attention_mask`` padded to the batch's longest caption (at most the
    tokenizer's ``model_max_length``, captions longer than that are truncated with the end-of-text token kept), and
    ``image_ids`` `(B,)` long when every example has an ``id`` (the authors use the dataset index; pairs with equal
    ids are not treated as negatives of each other). Without ids the model treats every pair as a distinct image.

    Args:
        processor: the model's `LongCLIPProcessor`.
        with_image_ids: emit ``image_ids`` when the examples carry an ``id``.
        seed: accepted like every collator's; this one draws nothing.
    """

    def __init__(self, processor, with_image_ids: bool = True, seed: int | None = None):
        super().__init__(processor, with_short_caption=False, seed=seed)
        self.with_image_ids = with_image_ids

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        captions = [normalise_caption(e["caption"]) if isinstance(e["caption"], str) else e["caption"] for e in examples]
        text = self.tokenize(captions)
        batch = {
            "pixel_values": self.images(examples),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }
        if self.with_image_ids and all(e.get("id") is not None for e in examples):
            batch["image_ids"] = torch.tensor([stable_image_id(e["id"]) for e in examples], dtype=torch.long)
        return batch


__all__ = ["FineLIPCollator", "stable_image_id"]
