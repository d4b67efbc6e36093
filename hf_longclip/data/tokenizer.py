"""Build small CLIP BPE tokenizers locally (for the synthetic quickstart, tests and offline demos).

Real models use the tokenizer of their CLIP checkpoint; this builder makes a tokenizer with CLIP's exact
pre-tokenisation and special tokens whose vocabulary is the 512 byte-level symbols plus whole-word tokens for a
given word list, so any text still tokenises and the listed words cost one token each.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 248) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose vocabulary holds the byte-level alphabet plus one token per word of `words`.

    The end-of-text token has the largest id (as in CLIP, where pooling may take ``argmax(input_ids)``) and the
    start-of-text token the one before it.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted({w.lower() for w in words if w and w.isalpha() and w.isascii()}):
        symbols = list(word)
        symbols[-1] += "</w>"
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            if (current, nxt) not in seen:
                seen.add((current, nxt))
                merges.append((current, nxt))
            vocab.setdefault(merged, len(vocab))
            current = merged
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


__all__ = ["build_clip_tokenizer", "BOS_TOKEN", "EOS_TOKEN"]
