"""Collator for beta-CLIP: images + caption + sampled sentences + phrases -> `BetaCLIPModel.forward` kwargs.

Examples should carry the caption hierarchy parsed once (`HierarchyMapper`). See docs/betaclip.md (Collate).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..models.processing_longclip import LongCLIPProcessor
from ..text.hierarchy import CAPTION_MODES, has_hierarchy, parse_hierarchies, sample_queries
from ..text.phrases import PhraseExtractor
from .collate import LongCLIPCollator


class BetaCLIPCollator(LongCLIPCollator):
    """Build beta-CLIP training batches.

    Args:
        processor (`LongCLIPProcessor`): the model's processor.
        num_sentences (`int`): sentences sampled per image (``K_s``, 5).
        max_phrases (`int`): phrases kept per image (30).
        max_phrase_length (`int`): phrase tokens kept (30, end-of-text included).
        caption_mode (`str`): ``"sampled"`` (the authors': the global caption is the shuffled sentence sample) or
            ``"full"`` (the whole cleaned caption); see `sample_queries`.
        extractor (`PhraseExtractor`, *optional*): used only for examples without a parsed hierarchy.
        seed (`int`, *optional*): seed of the collator's own sentence sampler (the global `random` when None).

    Returns (from `__call__`): a dict with
        ``pixel_values`` `(B, 3, H, W)`, ``input_ids`` / ``attention_mask`` `(B, Lc)` (global captions),
        ``caption_query_mask`` `(B,)` (False for an empty caption),
        ``sentence_input_ids`` / ``sentence_attention_mask`` `(B, Ks, Ls)`, ``sentence_mask`` `(B, Ks)`,
        ``phrase_input_ids`` / ``phrase_attention_mask`` `(B, Kp, Lp)`, ``phrase_mask`` `(B, Kp)`,
        where `Ks`, `Kp` are the batch's largest counts (possibly 0).

    Example:

    ```python
    >>> collator = BetaCLIPCollator(processor, seed=0)
    >>> batch = collator([{"pixel_values": torch.zeros(3, 224, 224), "caption": "A dog on the left. A red car."}])
    >>> batch["phrase_mask"]
    tensor([[True, True, True]])
    ```
    """

    def __init__(
        self,
        processor: LongCLIPProcessor,
        num_sentences: int = 5,
        max_phrases: int = 30,
        max_phrase_length: int = 30,
        caption_mode: str = "sampled",
        extractor: PhraseExtractor | None = None,
        seed: int | None = None,
    ):
        super().__init__(processor, with_short_caption=False)
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if num_sentences < 0 or max_phrases < 0 or max_phrase_length < 2:
            raise ValueError("num_sentences and max_phrases must be >= 0 and max_phrase_length >= 2")
        self.num_sentences = num_sentences
        self.max_phrases = max_phrases
        self.max_phrase_length = max_phrase_length
        self.caption_mode = caption_mode
        self._extractor = extractor
        self.rng = random.Random(seed) if seed is not None else random
        self._warned = False

    @property
    def extractor(self) -> PhraseExtractor:
        if self._extractor is None:
            self._extractor = PhraseExtractor()
        return self._extractor

    def hierarchies(self, examples: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The parsed hierarchy of each example, parsing (in one batch) those that lack one."""
        missing = [i for i, e in enumerate(examples) if not has_hierarchy(e)]
        out: list[Mapping[str, Any]] = list(examples)
        if missing:
            if not self._warned:
                warnings.warn(
                    "beta-CLIP examples without parsed sentences/phrases: running spaCy inside the data loader. "
                    "Parse the data set once with `dataset.map(hf_longclip.text.HierarchyMapper(), batched=True, "
                    "num_proc=N)`.",
                    stacklevel=3,
                )
                self._warned = True
            captions = []
            for i in missing:
                caption = examples[i].get("caption")
                if not isinstance(caption, str):
                    raise TypeError(f"example {i} has no parsed hierarchy and no string `caption`")
                captions.append(caption)
            for i, record in zip(missing, parse_hierarchies(captions, self.extractor)):
                out[i] = record
        return out

    def _stack_queries(self, groups: list[list[str]], max_length: int, prefix: str) -> dict[str, torch.Tensor]:
        """Tokenise all queries of the batch together and lay them out as `(B, K, L)` + a `(B, K)` mask."""
        batch = len(groups)
        slots = max((len(g) for g in groups), default=0)
        flat = [text for group in groups for text in group]
        if not flat:
            return {
                f"{prefix}_input_ids": torch.zeros(batch, slots, 1, dtype=torch.long),
                f"{prefix}_attention_mask": torch.zeros(batch, slots, 1, dtype=torch.long),
                f"{prefix}_mask": torch.zeros(batch, slots, dtype=torch.bool),
            }
        tok = self.processor.tokenizer
        encoded = tok(flat, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        length = encoded["input_ids"].shape[1]
        mask = torch.zeros(batch, slots, dtype=torch.bool)
        for b, group in enumerate(groups):
            mask[b, : len(group)] = True
        ids = torch.zeros(batch, slots, length, dtype=torch.long)
        att = torch.zeros(batch, slots, length, dtype=encoded["attention_mask"].dtype)
        ids[mask] = encoded["input_ids"]
        att[mask] = encoded["attention_mask"]
        return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": att, f"{prefix}_mask": mask}

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        captions, sentences, phrases = [], [], []
        for hierarchy in self.hierarchies(examples):
            caption, sampled, found = sample_queries(
                hierarchy, self.num_sentences, self.max_phrases, self.caption_mode, self.rng
            )
            captions.append(caption)
            sentences.append(sampled)
            phrases.append(found)
        text = self.tokenize(captions)
        batch = {
            "pixel_values": self.images(examples),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "caption_query_mask": torch.tensor([bool(c.strip()) for c in captions], dtype=torch.bool),
        }
        batch.update(self._stack_queries(sentences, self.processor.tokenizer.model_max_length, "sentence"))
        batch.update(self._stack_queries(phrases, self.max_phrase_length, "phrase"))
        return batch


__all__ = ["BetaCLIPCollator"]
