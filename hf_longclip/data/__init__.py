"""Data: tokenizers built locally, synthetic demo data, per-variant collators."""

from .collate import LongCLIPCollator
from .tokenizer import build_clip_tokenizer

__all__ = ["LongCLIPCollator", "build_clip_tokenizer"]
