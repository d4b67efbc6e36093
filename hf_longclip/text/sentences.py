"""Sentence-level caption handling shared by every variant."""

from __future__ import annotations


def normalise_caption(caption: str) -> str:
    """Collapse newlines and runs of whitespace into single spaces (captions in the wild carry both)."""
    return " ".join(caption.split())


def split_sentences(caption: str) -> list[str]:
    """Split a caption into sentences on ``". "``, the rule of the Long-CLIP and beta-CLIP code.

    Each piece is stripped and empty pieces are dropped; a caption with no boundary gives one sentence and an
    empty caption gives none. A trailing period stays on the last sentence, as in the authors' split.
    """
    return [piece.strip() for piece in normalise_caption(caption).split(". ") if piece.strip()]


def first_sentence(caption: str) -> str:
    """The short caption Long-CLIP derives from a long one: ``caption.split(". ")[0]`` (no final period).

    ShareGPT4V-style captions open with a summary sentence, which is what this returns. An empty caption gives "".
    """
    sentences = split_sentences(caption)
    return sentences[0] if sentences else ""


__all__ = ["first_sentence", "normalise_caption", "split_sentences"]
