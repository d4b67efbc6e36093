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
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w and w.isalpha() and w.isascii()}):
        symbols = list(word)
        symbols[-1] += "</w>"
        # Segment with the merges so far (as BPE will), then append merges that join the pieces left to right:
        # appended merges rank last, so words already single tokens stay single.
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair merging of one word: repeatedly join the adjacent pair with the lowest merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        best = min(range(len(symbols) - 1), key=lambda i: ranks.get((symbols[i], symbols[i + 1]), len(ranks) + 1))
        if (symbols[best], symbols[best + 1]) not in ranks:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


__all__ = ["build_clip_tokenizer", "BOS_TOKEN", "EOS_TOKEN"]
