"""Collator for MulCLIP: images + long caption + summary caption + up to ``M`` sentence subcaptions.

Each text granularity is tokenised at its own batch-longest length (long captions <= 248 tokens, summaries and
subcaptions likewise), and only existing subcaptions are tokenised: padded slots are pad-id rows with a False
``subcaption_mask`` and an all-zero attention mask, which the model never encodes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.processing_longclip import LongCLIPProcessor, check_captions
from ..text.sentences import normalise_caption, split_sentences
from .collate import LongCLIPCollator

SUBCAPTION_SELECTIONS = ("first", "random")


class MulCLIPCollator(LongCLIPCollator):
    """Build MulCLIP training batches.

    An example is a mapping with ``image`` (PIL) or ``pixel_values``, ``caption`` (the long caption), and optionally
    ``short_caption`` (the summary; default: the caption's first sentence) and ``subcaptions`` (a list of strings;
    default: the caption's sentences from `split_sentences`).

    Args:
        processor (`LongCLIPProcessor`): the model's processor.
        max_subcaptions (`int`, defaults to 8): ``M``, subcaptions kept per image. UNKNOWN in the paper; 8 covers most
            DOCCI / ShareGPT4V captions.
        subcaption_selection (`str`, defaults to `"first"`): which sentences to keep when a caption has more than
            ``M``: the ``"first"`` ``M`` or ``"random"`` ``M`` (kept in caption order).
        include_summary_in_subcaptions (`bool`, defaults to `True`): keep the first sentence among the subcaptions
            (the paper segments the whole long caption); False starts the subcaptions at the second sentence.
        seed (`int`, *optional*): seed of the collator's own sampler for ``"random"`` (the global `random` when None).

    Returns (from `__call__`): a dict with
        ``pixel_values`` `(B, 3, H, W)`, ``input_ids`` / ``attention_mask`` `(B, L)`,
        ``short_input_ids`` / ``short_attention_mask`` `(B, Ls)`,
        ``subcaption_input_ids`` / ``subcaption_attention_mask`` `(B, M_b, Lm)` and ``subcaption_mask`` `(B, M_b)`,
        where ``M_b`` is the batch's largest subcaption count (possibly 0) and every length is the longest of its own
        texts.

    Example:

    ```python
    >>> collator = MulCLIPCollator(processor, max_subcaptions=4)
    >>> batch = collator([{"pixel_values": torch.zeros(3, 224, 224), "caption": "A dog on a sofa. The sofa is red."}])
    >>> batch["subcaption_mask"]
    tensor([[True, True]])
    ```
    """

    def __init__(
        self,
        processor: LongCLIPProcessor,
        max_subcaptions: int = 8,
        subcaption_selection: str = "first",
        include_summary_in_subcaptions: bool = True,
        seed: int | None = None,
    ):
        super().__init__(processor, with_short_caption=True)
        if isinstance(max_subcaptions, bool) or not isinstance(max_subcaptions, int) or max_subcaptions < 0:
            raise ValueError(f"max_subcaptions must be an integer >= 0, got {max_subcaptions!r}")
        if subcaption_selection not in SUBCAPTION_SELECTIONS:
            raise ValueError(f"subcaption_selection must be one of {SUBCAPTION_SELECTIONS}, got {subcaption_selection!r}")
        self.max_subcaptions = max_subcaptions
        self.subcaption_selection = subcaption_selection
        self.include_summary_in_subcaptions = include_summary_in_subcaptions
        self.rng = random.Random(seed) if seed is not None else random

    def subcaptions(self, example: Mapping[str, Any], caption: str) -> list[str]:
        """The subcaptions of one example: given ones or the caption's sentences, at most ``max_subcaptions``."""
        given = example.get("subcaptions")
        if given is not None:
            check_captions(list(given))
            sentences = [normalise_caption(s) for s in given]
        else:
            sentences = split_sentences(caption)
            if not self.include_summary_in_subcaptions:
                sentences = sentences[1:]
        sentences = [s for s in sentences if s]
        if len(sentences) <= self.max_subcaptions:
            return sentences
        if self.subcaption_selection == "first":
            return sentences[: self.max_subcaptions]
        keep = sorted(self.rng.sample(range(len(sentences)), self.max_subcaptions))
        return [sentences[i] for i in keep]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)  # images, long captions, summaries (first sentence unless given)
        captions = [normalise_caption(e["caption"]) for e in examples]
        per_example = [self.subcaptions(e, c) for e, c in zip(examples, captions)]
        counts = [len(s) for s in per_example]
        slots = max(counts)
        flat = [s for subs in per_example for s in subs]
        mask = torch.zeros(len(examples), slots, dtype=torch.bool)
        for row, count in enumerate(counts):
            mask[row, :count] = True
        if flat:
            text = self.tokenize(flat)  # only real subcaptions, padded to their own longest length
            length = text["input_ids"].shape[1]
        else:
            text, length = None, 1
        pad_id = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(examples), slots, length), 0 if pad_id is None else pad_id, dtype=torch.long)
        attention = torch.zeros(len(examples), slots, length, dtype=torch.long)
        if text is not None:
            ids[mask] = text["input_ids"]
            attention[mask] = text["attention_mask"].to(torch.long)
        batch["subcaption_input_ids"] = ids
        batch["subcaption_attention_mask"] = attention
        batch["subcaption_mask"] = mask
        return batch


__all__ = ["MulCLIPCollator"]
