"""Caption cleaning for beta-CLIP: remove runs of repeated substrings and consecutive duplicate words.

Machine-written captions (ShareGPT4V and the like) sometimes degenerate into loops ("on the table on the table on
the table ..."); beta-CLIP cleans every caption before splitting it into sentences.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import groupby

#: Minimum lengths of the repeated substring, tried in this order (longest first, as the authors do).
REPEAT_MIN_LENGTHS = (10, 5, 3)


@lru_cache(maxsize=None)
def _repeat_pattern(min_len: int, max_len: int) -> re.Pattern:
    # A lazily matched substring of min_len..max_len characters followed by two or more copies of itself.
    return re.compile(rf"(.{{{min_len},{max_len}}}?)\1\1+", re.DOTALL)


def clean_caption(
    text: str, max_substring_len: int = 20, min_text_len: int = 100, max_replacements: int = 10
) -> str:
    """Clean a caption the way beta-CLIP's data loader does.

    1. Newlines become spaces.
    2. For texts longer than `min_text_len` characters: a substring of 10-20, then 5-20, then 3-20 characters
       repeated three or more times in a row is reduced to one copy (at most `max_replacements` runs per length,
       which bounds the time on pathological inputs).
    3. Consecutive duplicate words are collapsed ("the the cat" -> "the cat"); whitespace is normalised to single
       spaces and the result stripped.

    Args:
        text (`str`): the raw caption.
        max_substring_len (`int`): longest repeated unit removed.
        min_text_len (`int`): shorter texts skip step 2.
        max_replacements (`int`): runs removed per unit length.

    Returns:
        `str`: the cleaned caption ("" for an empty or whitespace-only caption).

    Example:

    ```python
    >>> clean_caption("A cat cat sits on the the mat.")
    'A cat sits on the mat.'
    ```
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string, got {type(text).__name__}")
    text = text.replace("\n", " ")
    if len(text) > min_text_len:
        for min_len in REPEAT_MIN_LENGTHS:
            if min_len > max_substring_len:
                continue
            text = _repeat_pattern(min_len, max_substring_len).sub(r"\1", text, count=max_replacements)
    words = text.split()
    return " ".join(word for word, _ in groupby(words))


__all__ = ["clean_caption"]
