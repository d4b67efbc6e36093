"""Data: tokenizers built locally, synthetic demo data, per-variant collators."""

from .collate import LongCLIPCollator
from .collate_fixclip import FixCLIPCollator
from .collate_betaclip import BetaCLIPCollator
from .collate_mulclip import MulCLIPCollator
from .collate_finelip import FineLIPCollator
from .tokenizer import build_clip_tokenizer

__all__ = ["FixCLIPCollator", "FineLIPCollator", "MulCLIPCollator", "BetaCLIPCollator", "LongCLIPCollator", "build_clip_tokenizer"]
