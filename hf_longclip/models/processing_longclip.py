"""Processor for hf_longclip models: a 248-token CLIP tokenizer and CLIP's PIL image processor.

This file is copied next to saved models for ``trust_remote_code`` loading, so it imports only transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

from .configuration_longclip import LONGCLIP_CONTEXT_LENGTH


class LongCLIPProcessor(CLIPProcessor):
    r"""
    CLIP processor for long captions: the tokenizer's `model_max_length` is the model's text length (248 by
    default) and captions are truncated to it by default, with the end-of-text token kept last. Images go through
    CLIP's PIL image processor (no torchvision).

    Example:

    ```python
    >>> from hf_longclip import LongCLIPProcessor
    >>> processor = LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> batch = processor(text=["a long caption " * 100], return_tensors="pt")
    >>> batch["input_ids"].shape[-1]
    248
    ```
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_clip(
        cls, clip: str | os.PathLike, max_length: int = LONGCLIP_CONTEXT_LENGTH, **kwargs
    ) -> LongCLIPProcessor:
        """Build from a stock CLIP's tokenizer and image processor (Hub id or folder), at `max_length` tokens."""
        tokenizer = CLIPTokenizer.from_pretrained(clip, **kwargs)
        if len(tokenizer) <= 2:  # transformers builds a 2-token tokenizer, without an error, from a folder with none
            raise OSError(f"{clip!r} holds no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
        image_processor = CLIPImageProcessorPil.from_pretrained(clip, **kwargs)
        return cls.from_parts(image_processor, tokenizer, max_length)

    @classmethod
    def from_parts(cls, image_processor, tokenizer, max_length: int = LONGCLIP_CONTEXT_LENGTH) -> LongCLIPProcessor:
        """Combine an image processor and a CLIP tokenizer, setting the tokenizer's length to `max_length`."""
        tokenizer.model_max_length = max_length
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def __call__(self, images=None, text=None, **kwargs):
        if text is not None:
            check_captions(text)
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("max_length", self.tokenizer.model_max_length)
            kwargs.setdefault("padding", True)
        return super().__call__(images=images, text=text, **kwargs)


def check_captions(text) -> None:
    """Raise `TypeError` naming the first caption that is not a string."""
    if isinstance(text, str):
        return
    if not isinstance(text, Sequence):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    for index, caption in enumerate(text):
        if not isinstance(caption, str):
            raise TypeError(f"caption at index {index} is {type(caption).__name__}, not str")


__all__ = ["LongCLIPProcessor", "check_captions"]
