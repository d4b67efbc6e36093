"""Data: tokenizers built locally, synthetic demo data, per-variant collators."""

from .collate import LongCLIPCollator
from .collate_betaclip import BetaCLIPCollator
from .collate_mulclip import MulCLIPCollator
from .tokenizer import build_clip_tokenizer

__all__ = ["MulCLIPCollator", "BetaCLIPCollator", "LongCLIPCollator", "build_clip_tokenizer"]
