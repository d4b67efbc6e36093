"""beta-CLIP's text hierarchy: caption -> sentences -> phrases, parsed once (`parse_hierarchies`, `HierarchyMapper`)
and sampled per training step (`sample_queries`).

See docs/betaclip.md (Preprocess once: the text hierarchy; Collate).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from .cleaning import clean_caption
from .phrases import NOUN_PHRASE, SPATIAL, PhraseExtractor, dedupe
from .sentences import split_sentences

CAPTION_MODES = ("sampled", "full")
#: Fields a parsed example carries (all lists; phrase_* are parallel lists).
HIERARCHY_FIELDS = ("sentences", "phrases", "phrase_sentence", "phrase_kind")
SENTENCE_SEPARATOR = ". "


def parse_hierarchies(
    captions: Sequence[str],
    extractor: PhraseExtractor | None = None,
    n_process: int = 1,
    clean: bool = True,
    *,
    progress: bool = False,
) -> list[dict[str, list]]:
    """Clean, split and parse captions (one batched spaCy pass).

    Args:
        captions (`Sequence[str]`): raw captions.
        extractor (`PhraseExtractor`, *optional*): phrase settings and spaCy model (a default one when None).
        n_process (`int`): spaCy worker processes for `nlp.pipe`.
        clean (`bool`): apply `clean_caption` first (the authors do, except when loading precomputed phrases).
        progress (`bool`): show a tqdm bar ("parsing captions (spaCy)", on stderr) as spaCy parses; its total is the
            number of captions actually parsed (repeated and already cached captions are not parsed again). Off by
            default so that library calls stay quiet.

    Returns:
        One dict per caption with ``sentences`` (list of str), ``phrases`` (list of str), ``phrase_sentence``
        (index of the sentence each phrase starts in) and ``phrase_kind`` (0 noun phrase, 1 action, 2 spatial).
        Phrases are grouped by kind, each group in text order, not de-duplicated (that happens after sampling).
    """
    extractor = extractor or PhraseExtractor()
    split = []
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}")
        split.append(split_sentences(clean_caption(caption) if clean else caption))
    # Parse the sentences joined as the authors' global caption is built, so offsets map phrases to sentences.
    texts = [SENTENCE_SEPARATOR.join(sentences) for sentences in split]
    parsed = extractor.extract_spans(texts, n_process=n_process, progress=progress, progress_unit="caption")
    out = []
    for sentences, spans in zip(split, parsed):
        starts, position = [], 0
        for sentence in sentences:
            starts.append(position)
            position += len(sentence) + len(SENTENCE_SEPARATOR)
        record: dict[str, list] = {"sentences": list(sentences), "phrases": [], "phrase_sentence": [], "phrase_kind": []}
        for phrase in spans:
            index = max(0, _last_le(starts, phrase.start))
            record["phrases"].append(phrase.text)
            record["phrase_sentence"].append(index)
            record["phrase_kind"].append(int(phrase.kind))
        out.append(record)
    return out


def _last_le(starts: list[int], value: int) -> int:
    """Index of the last start <= value (starts ascending)."""
    index = -1
    for i, start in enumerate(starts):
        if start <= value:
            index = i
        else:
            break
    return index


class HierarchyMapper:
    """A picklable batched map function for `datasets.Dataset.map`: adds the parsed hierarchy fields.

    Each worker process loads spaCy once (lazily) and keeps its own cache, so
    ``dataset.map(HierarchyMapper(), batched=True, batch_size=1000, num_proc=8)`` parses a million captions once;
    the result is stored with the data set and the collator never runs spaCy.

    Args:
        caption_column (`str`): column holding the raw captions.
        clean (`bool`): clean captions first (see `parse_hierarchies`).
        extractor_kwargs: `PhraseExtractor` settings (blacklist, ...).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"caption": ["A dog on the left. A cat."]})
    >>> ds = ds.map(HierarchyMapper(), batched=True, num_proc=1)
    >>> ds[0]["phrases"]
    ['A dog on the left', 'A cat', 'on the left']
    ```
    """

    def __init__(self, caption_column: str = "caption", clean: bool = True, **extractor_kwargs: Any):
        self.caption_column = caption_column
        self.clean = clean
        self.extractor_kwargs = extractor_kwargs
        self._extractor: PhraseExtractor | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_extractor"] = None
        return state

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        if self._extractor is None:
            self._extractor = PhraseExtractor(**self.extractor_kwargs)
        records = parse_hierarchies(batch[self.caption_column], self._extractor, clean=self.clean)
        return {field: [record[field] for record in records] for field in HIERARCHY_FIELDS}


def has_hierarchy(example: Mapping[str, Any]) -> bool:
    """Whether an example already carries the parsed fields of `parse_hierarchies`."""
    return all(field in example and example[field] is not None for field in HIERARCHY_FIELDS)


def sample_queries(
    hierarchy: Mapping[str, Sequence],
    num_sentences: int = 5,
    max_phrases: int = 30,
    caption_mode: str = "sampled",
    rng: random.Random | None = None,
) -> tuple[str, list[str], list[str]]:
    """Draw one training sample of queries from a parsed hierarchy.

    Args:
        hierarchy: a record of `parse_hierarchies` (``sentences``, ``phrases``, ``phrase_sentence``, ``phrase_kind``).
        num_sentences (`int`): ``K_s``; with at least that many sentences, ``K_s`` are sampled without replacement in
            random order, otherwise all are used in their order.
        max_phrases (`int`): keep the first this many phrases.
        caption_mode (`str`): ``"sampled"`` (global caption = ``". "``-join of the sampled sentences; phrases from
            them; the authors' code) or ``"full"`` (global caption = all sentences; phrases from all of them).
        rng (`random.Random`, *optional*): source of randomness (the `random` module when None).

    Returns:
        `(caption, sentences, phrases)`.
    """
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    sentences = list(hierarchy["sentences"])
    count = len(sentences)
    if num_sentences > 0 and count >= num_sentences:
        chosen = (rng or random).sample(range(count), num_sentences)
    else:
        chosen = list(range(count))
    sampled = [sentences[i] for i in chosen]
    source = chosen if caption_mode == "sampled" else list(range(count))
    caption = SENTENCE_SEPARATOR.join(sampled if caption_mode == "sampled" else sentences)
    # Group the stored phrases by (kind, sentence), keeping their order, then list them kind by kind over the
    # source sentences in caption order: the order a parse of the caption itself yields.
    by_key: dict[tuple[int, int], list[str]] = {}
    for text, sentence, kind in zip(hierarchy["phrases"], hierarchy["phrase_sentence"], hierarchy["phrase_kind"]):
        by_key.setdefault((int(kind), int(sentence)), []).append(text)
    ordered = [
        text for kind in range(NOUN_PHRASE, SPATIAL + 1) for s in source for text in by_key.get((kind, s), ())
    ]
    phrases = dedupe(ordered)[: max(max_phrases, 0)]
    return caption, (sampled if num_sentences > 0 else []), phrases


__all__ = [
    "CAPTION_MODES",
    "HIERARCHY_FIELDS",
    "HierarchyMapper",
    "has_hierarchy",
    "parse_hierarchies",
    "sample_queries",
]
