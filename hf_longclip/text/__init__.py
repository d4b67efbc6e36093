"""Caption text utilities: sentence splitting and, for beta-CLIP, cleaning, spaCy phrase extraction and the
caption -> sentences -> phrases hierarchy.

The spaCy-based modules are imported lazily by their own functions, so importing this package does not load spaCy.
"""

from .cleaning import clean_caption
from .hierarchy import HIERARCHY_FIELDS, HierarchyMapper, has_hierarchy, parse_hierarchies, sample_queries
from .phrases import PhraseExtractor, load_spacy_model
from .sentences import first_sentence, split_sentences

__all__ = [
    "HIERARCHY_FIELDS",
    "HierarchyMapper",
    "PhraseExtractor",
    "clean_caption",
    "first_sentence",
    "has_hierarchy",
    "load_spacy_model",
    "parse_hierarchies",
    "sample_queries",
    "split_sentences",
]
