"""Caption text utilities: sentence splitting (and, for beta-CLIP, cleaning and phrase extraction)."""

from .sentences import first_sentence, split_sentences

__all__ = ["first_sentence", "split_sentences"]
