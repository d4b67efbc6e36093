"""Processor for hf_longclip models: a 248-token CLIP tokenizer and CLIP's PIL image processor.

This file is copied next to saved models for ``trust_remote_code`` loading, so it imports only torch and transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
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
        """CLIP's processor call; refuses what the model could not use with a `ValueError` naming it: an empty list
        of captions or images, and images (input arrays / tensors, or the produced ``pixel_values``) holding NaN or
        infinite values. Captions are truncated to the tokenizer's length with the end-of-text token kept last."""
        if text is not None:
            check_captions(text)
            kwargs.setdefault("truncation", True)
            kwargs.setdefault("max_length", self.tokenizer.model_max_length)
            kwargs.setdefault("padding", True)
        if images is not None:
            check_images(images)
        output = super().__call__(images=images, text=text, **kwargs)
        if images is not None and "pixel_values" in output:
            bad = nonfinite_images(output["pixel_values"])
            if bad:
                raise ValueError(f"pixel_values hold NaN or infinite values (image {', '.join(map(str, bad[:5]))})")
        return output


def check_captions(text) -> None:
    """Raise `TypeError` naming the first caption that is not a string, `ValueError` for an empty list."""
    if isinstance(text, str):
        return
    if not isinstance(text, Sequence):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if len(text) == 0:
        raise ValueError("text is an empty list (0 captions); pass at least one caption")
    for index, caption in enumerate(text):
        if not isinstance(caption, str):
            raise TypeError(f"caption at index {index} is {type(caption).__name__}, not str")


def _as_float_tensor(value):
    """A float tensor view of an array-like image (numpy array, tensor), or None for anything else (PIL images,
    integer pixels, which cannot hold NaN)."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif hasattr(value, "__array_interface__") and hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "fc":
        tensor = torch.as_tensor(value)
    else:
        return None
    return tensor if tensor.is_floating_point() or tensor.is_complex() else None


def nonfinite_images(images) -> list[int]:
    """Indices of the images (items of a list, or rows of a batched array / tensor) holding NaN or infinite values."""
    batched = _as_float_tensor(images)
    if batched is not None:
        if batched.dim() < 4:  # one image
            return [] if bool(torch.isfinite(batched).all()) else [0]
        return (~torch.isfinite(batched)).flatten(1).any(-1).nonzero().flatten().tolist()
    if isinstance(images, (list, tuple)):
        bad = []
        for index, image in enumerate(images):
            tensor = _as_float_tensor(image)
            if tensor is not None and not bool(torch.isfinite(tensor).all()):
                bad.append(index)
        return bad
    return []


def check_images(images) -> None:
    """Raise `ValueError` for an empty list / batch of images, or images holding NaN or infinite values."""
    if isinstance(images, (list, tuple)) and len(images) == 0:
        raise ValueError("images is an empty list (0 images); pass at least one image")
    batched = _as_float_tensor(images)
    if batched is None and hasattr(images, "shape") and len(images.shape) == 4 and images.shape[0] == 0:
        raise ValueError("images is an empty batch (0 images); pass at least one image")
    if batched is not None and batched.dim() == 4 and batched.shape[0] == 0:
        raise ValueError("images is an empty batch (0 images); pass at least one image")
    bad = nonfinite_images(images)
    if bad:
        raise ValueError(f"images hold NaN or infinite values (image {', '.join(map(str, bad[:5]))})")


__all__ = ["LongCLIPProcessor", "check_captions", "check_images", "nonfinite_images"]
