"""Collators: turn a list of examples into the keyword arguments of a variant's ``forward``.

An example is a mapping with ``image`` (a PIL image, or an already processed ``pixel_values`` tensor),
``caption`` (the long caption), and optionally ``short_caption`` and ``id``. Every collator encodes each text field
at the batch's own longest length (never padded to 248), which is where most of the speed over the authors'
code comes from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.processing_longclip import LongCLIPProcessor, check_captions
from ..text.sentences import first_sentence, normalise_caption


class LongCLIPCollator:
    """Collator for Long-CLIP: images, long captions and short captions (first sentence unless given).

    Args:
        processor: the model's `LongCLIPProcessor`.
        with_short_caption: also tokenise the short caption (needed for Long-CLIP's short-caption loss).
        seed: seed of the collator's own random choices; every collator takes it (the registry builds them all the same
            way), and this one makes none.
    """

    def __init__(self, processor: LongCLIPProcessor, with_short_caption: bool = True, seed: int | None = None):
        self.processor = processor
        self.with_short_caption = with_short_caption
        self.seed = seed

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise `texts` padded to their own longest length (at most the model's text length)."""
        check_captions(list(texts))
        tok = self.processor.tokenizer
        return dict(
            tok(list(texts), padding=True, truncation=True, max_length=tok.model_max_length, return_tensors="pt")
        )

    def images(self, examples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Stack pre-processed ``pixel_values`` or run the image processor on PIL images."""
        first = examples[0]
        if "pixel_values" in first:
            return torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
        return self.processor.image_processor([e["image"] for e in examples], return_tensors="pt")["pixel_values"]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        captions = [normalise_caption(e["caption"]) if isinstance(e["caption"], str) else e["caption"] for e in examples]
        text = self.tokenize(captions)
        batch = {"pixel_values": self.images(examples), "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        if self.with_short_caption:
            shorts = [e.get("short_caption") or first_sentence(c) for e, c in zip(examples, captions)]
            short = self.tokenize(shorts)
            batch["short_input_ids"] = short["input_ids"]
            batch["short_attention_mask"] = short["attention_mask"]
        return batch


__all__ = ["LongCLIPCollator"]
