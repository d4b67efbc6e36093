"""What the models refuse instead of computing something quietly wrong: damaged or mislabelled saved checkpoints
(a config without `eos_token_id` or a tower section, a `model_type` that does not match the weights), inputs the
towers cannot use (empty batches, integer or NaN pixels, captions without their end-of-text token) in the models,
the processor and the evaluation helpers; and the internal batching of `encode_text` / `encode_image`."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModel

from hf_longclip import VARIANTS, LongCLIPModel
from hf_longclip.evaluation import EvalSettings, encode_texts
from hf_longclip.models.configuration_longclip import check_saved_config
from hf_longclip.models.modeling_longclip import check_input_ids, check_pixel_values, end_token_id
from hf_longclip.testing_utils import SCENE_CAPTIONS, tiny_processor, tiny_variant

NAMES = list(VARIANTS)
WITH_HEADS = [name for name in NAMES if VARIANTS[name].model_class.head_modules]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def longclip(processor):
    return tiny_variant("longclip", processor=processor).eval()


def _save(model, folder, edit=None):
    model.save_pretrained(folder)
    if edit is not None:
        path = folder / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return folder


def _inputs(processor, captions=SCENE_CAPTIONS[:3]):
    text = processor(text=list(captions), return_tensors="pt")
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return text["input_ids"], text["attention_mask"], pixels


# ----------------------------------------------------------------------------------------------- damaged configs
def test_config_without_eos_token_id_is_refused(longclip, processor, tmp_path):
    """Without `text_config.eos_token_id` the default 49407 is no id of the 680-token vocabulary: every caption
    would be pooled at position 0 (two different captions had cosine 1.0)."""
    folder = _save(longclip, tmp_path, lambda c: c["text_config"].pop("eos_token_id"))
    for load in (AutoModel.from_pretrained, LongCLIPModel.from_pretrained):
        with pytest.raises(ValueError, match=r"text_config\.eos_token_id"):
            load(folder)
    # the caller's own config with the field set is used as given
    config = longclip.config.__class__.from_pretrained(folder)
    config.text_config.eos_token_id = longclip.config.text_config.eos_token_id
    loaded = LongCLIPModel.from_pretrained(folder, config=config).eval()
    ids, mask, _ = _inputs(processor, SCENE_CAPTIONS[:2])
    with torch.no_grad():
        embeds = loaded.encode_text(ids, mask)
    assert (embeds[0] @ embeds[1]).item() < 0.999


def test_missing_eos_with_openai_vocabulary_only_warns():
    base = {"text_config": {"vocab_size": 49408}, "vision_config": {}}
    notes = check_saved_config(base, "x/config.json")
    assert len(notes) == 1 and "text_config.eos_token_id" in notes[0] and "49407" in notes[0]
    assert check_saved_config({"text_config": {"vocab_size": 49408, "eos_token_id": 49407}, "vision_config": {}}) == []
    with pytest.raises(ValueError, match="eos_token_id"):
        check_saved_config({"text_config": {"vocab_size": 1000}, "vision_config": {}})


def test_missing_eos_warning_reaches_the_caller(tmp_path, processor):
    # a tiny model with OpenAI's vocabulary size: the default end-of-text id is its last id, so loading warns
    model = tiny_variant("longclip", processor=processor, clip_kwargs={"vocab_size": 49408})
    folder = _save(model, tmp_path, lambda c: c["text_config"].pop("eos_token_id"))
    with pytest.warns(UserWarning, match=r"text_config\.eos_token_id"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize("section", ["text_config", "vision_config"])
def test_config_without_a_tower_section_is_refused_naming_it(longclip, tmp_path, section):
    folder = _save(longclip, tmp_path, lambda c: c.pop(section))
    for load in (AutoModel.from_pretrained, LongCLIPModel.from_pretrained):
        with pytest.raises(ValueError, match=f"no `{section}` section") as error:
            load(folder)
        assert "248 rows, but this configuration expects 248" not in str(error.value)


@pytest.mark.parametrize("name", WITH_HEADS)
def test_a_variant_checkpoint_labelled_longclip_is_refused_naming_the_variant(name, processor, tmp_path):
    model = tiny_variant(name, processor=processor)
    model_class = VARIANTS[name].model_class
    folder = _save(model, tmp_path, lambda c: c.update(model_type="longclip", architectures=["LongCLIPModel"]))
    with pytest.raises(ValueError, match=f"model_type {name!r}") as error:
        AutoModel.from_pretrained(folder)
    assert model_class.__name__ in str(error.value) and "'longclip'" in str(error.value)


@pytest.mark.parametrize("name", WITH_HEADS)
def test_a_longclip_checkpoint_labelled_as_a_variant_is_refused(name, longclip, tmp_path):
    model_class = VARIANTS[name].model_class
    relabel = dict(model_type=name, architectures=[model_class.__name__], **VARIANTS[name].tiny_config)
    folder = _save(longclip, tmp_path, lambda c: c.update(relabel))
    with pytest.raises(ValueError, match="randomly initialised") as error:
        AutoModel.from_pretrained(folder)
    message = str(error.value)
    assert model_class.__name__ in message and all(head in message for head in _present_heads(model_class, name))


def test_unknown_extra_keys_and_fully_missing_weights_load_like_stock_clip(processor, tmp_path):
    """What stock CLIPModel does (transformers' `test_model_weights_reload_no_missing_tied_weights`): an unexpected
    key of no known variant is transformers' load report, not a mislabel; a file holding none of the weights loads
    with every weight reported missing, and the missing heads are warned about rather than refused."""
    from safetensors.torch import load_file, save_file

    model = tiny_variant("finelip", processor=processor)
    model_class = type(model)
    folder = _save(model, tmp_path / "extra")
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "tensor": torch.tensor([1, 2])}, folder / "model.safetensors", metadata={"format": "pt"})
    loaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert info["unexpected_keys"] == ["tensor"] or set(info["unexpected_keys"]) == {"tensor"}
    assert torch.equal(loaded.state_dict()["logit_scale"], model.state_dict()["logit_scale"])

    save_file({"tensor": torch.tensor([1, 2])}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="randomly initialised"):
        _, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert {k for k in info["missing_keys"] if model_class.is_head_parameter(k)}


def _present_heads(model_class, name):
    model = tiny_variant(name)
    return {key.split(".", 1)[0] for key in model.state_dict() if model_class.is_head_parameter(key)}


def test_correct_checkpoints_and_stock_clip_still_load(longclip, processor, tmp_path):
    _save(longclip, tmp_path / "lc")
    assert type(AutoModel.from_pretrained(tmp_path / "lc")) is LongCLIPModel
    finelip = tiny_variant("finelip", processor=processor)
    _save(finelip, tmp_path / "fl")
    assert type(AutoModel.from_pretrained(tmp_path / "fl")) is VARIANTS["finelip"].model_class
    # another variant's saved model continues as this one through from_clip (fresh heads on purpose)
    assert type(VARIANTS["finelip"].model_class.from_clip(str(tmp_path / "lc"))) is VARIANTS["finelip"].model_class


# ----------------------------------------------------------------------------------------------- model inputs
@pytest.mark.parametrize("name", NAMES)
def test_forward_refuses_inputs_the_towers_cannot_use(name, processor):
    model = tiny_variant(name, processor=processor).eval()
    ids, mask, pixels = _inputs(processor)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)  # the good inputs run
        cases = {
            "empty batch \\(0 captions\\)": dict(input_ids=ids[:0], attention_mask=mask[:0], pixel_values=pixels),
            "empty batch \\(0 images\\)": dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[:0]),
            "dtype torch.uint8": dict(input_ids=ids, attention_mask=mask, pixel_values=(pixels * 50).clamp(0, 255).to(torch.uint8)),
            "NaN or infinite": dict(input_ids=ids, attention_mask=mask, pixel_values=pixels.index_fill(0, torch.tensor([1]), float("nan"))),
            "integer token ids": dict(input_ids=ids.float(), attention_mask=mask, pixel_values=pixels),
            "no end-of-text token": dict(input_ids=_without_end(ids, mask, processor), attention_mask=mask, pixel_values=pixels),
        }
        for message, inputs in cases.items():
            with pytest.raises(ValueError, match=message):
                model(**inputs)


def _without_end(ids, mask, processor):
    """Row 1 with its end-of-text token replaced by a word id (as a tokenizer without special tokens gives)."""
    ids = ids.clone()
    eos = processor.tokenizer.eos_token_id
    row = 1
    end = int(mask[row].sum()) - 1
    assert ids[row, end] == eos
    ids[row, end] = ids[row, 1]
    return ids


def test_end_token_only_inside_the_attention_mask_counts(longclip, processor):
    ids, mask, _ = _inputs(processor)
    ids = _without_end(ids, mask, processor)
    pad = processor.tokenizer.pad_token_id
    assert pad == processor.tokenizer.eos_token_id  # the tiny tokenizer pads with the end token, as OpenAI's does
    short = int(mask[1].sum())
    assert short < ids.shape[1] and ids[1, short] == pad  # row 1 is padded: an end-like id sits in its padding
    with torch.no_grad(), pytest.raises(ValueError, match=r"no end-of-text token .*row 1"):
        longclip.encode_text(ids, mask)


def test_helpers_refuse_bad_inputs_too(longclip, processor):
    ids, mask, pixels = _inputs(processor)
    with torch.no_grad():
        for call in (
            lambda: longclip.encode_image(pixels.to(torch.uint8)),
            lambda: longclip.get_image_token_features(pixels.index_fill(0, torch.tensor([0]), float("inf"))),
            lambda: longclip.retrieval_image_features(pixels[:0]),
            lambda: longclip.encode_text(ids[:0], mask[:0]),
            lambda: longclip.retrieval_text_features(_without_end(ids, mask, processor), mask),
            lambda: longclip.get_text_token_features(ids + 10_000, mask),
        ):
            with pytest.raises(ValueError):
                call()


def test_value_checks_need_no_device_synchronisation():
    """Values are read only for CPU tensors unless asked; the metadata checks always run."""
    missing_end = torch.tensor([[5, 6, 7]])
    check_input_ids(missing_end, eos_token_id=9, vocab_size=10, values=False)  # not read: no error
    with pytest.raises(ValueError, match="end-of-text"):
        check_input_ids(missing_end, eos_token_id=9, vocab_size=10)  # a CPU tensor: read by default
    meta = torch.empty(2, 3, 8, 8, device="meta")
    check_pixel_values(meta, 3)  # a non-CPU tensor: values never touched
    with pytest.raises(ValueError, match="dtype"):
        check_pixel_values(torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta"), 3)
    # transformers' CLIP test configs (eos 49407, 99 tokens) name no id of their vocabulary: nothing to check
    assert end_token_id(49407, 99) is None and end_token_id(49407, 49408) == 49407
    assert end_token_id(2, 49408) == 49407  # legacy configs pool at the largest id
    check_input_ids(torch.randint(0, 99, (4, 7)), eos_token_id=49407, vocab_size=99)


# ----------------------------------------------------------------------------------------------- processor
def test_processor_refuses_empty_batches_and_nan_images(processor):
    with pytest.raises(ValueError, match="0 captions"):
        processor(text=[], return_tensors="pt")
    with pytest.raises(ValueError, match="0 images"):
        processor(images=[], return_tensors="pt")
    with pytest.raises(ValueError, match="0 images"):
        processor(images=torch.zeros(0, 3, 40, 40), return_tensors="pt")
    good = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    bad = good.copy()
    bad[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values \\(image 1\\)"):
        processor(images=[good, bad], return_tensors="pt")
    out = processor(images=[good], text=["a dog"], return_tensors="pt")
    assert torch.isfinite(out["pixel_values"]).all() and out["input_ids"].shape[0] == 1


# ----------------------------------------------------------------------------------------------- evaluation helpers
def test_evaluation_text_helper_checks_the_end_token_on_the_cpu(processor):
    model = tiny_variant("longclip", processor=processor).eval()
    model.config.text_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("dog</w>")  # not appended
    with pytest.raises(ValueError, match="no end-of-text token .*text 1"):
        encode_texts(model, processor.tokenizer, ["a dog", "a cat", "the dog"], settings=EvalSettings(batch_size=4, progress=False))


# ----------------------------------------------------------------------------------------------- internal batching
def _count_calls(model, method):
    calls = []
    original = getattr(model, method)

    def counted(*args, **kwargs):
        calls.append(kwargs.get("input_ids", kwargs.get("pixel_values")).shape[0])
        return original(*args, **kwargs)

    setattr(model, method, counted)
    return calls


def test_encode_text_and_image_batch_internally_with_identical_results(longclip, processor):
    captions = [SCENE_CAPTIONS[i % len(SCENE_CAPTIONS)] + f" number {i}" for i in range(600)]
    text = processor(text=captions, return_tensors="pt")
    pixels = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole_text = longclip.encode_text(text["input_ids"], text["attention_mask"], batch_size=len(captions))
        whole_image = longclip.encode_image(pixels, batch_size=len(pixels))
        text_calls = _count_calls(longclip, "get_text_features")
        chunked_text = longclip.encode_text(text["input_ids"], text["attention_mask"])  # default 256 per call
        explicit = longclip.encode_text(text["input_ids"], text["attention_mask"], batch_size=100)
        image_calls = _count_calls(longclip, "get_image_features")
        chunked_image = longclip.encode_image(pixels, batch_size=16)
    del longclip.get_text_features, longclip.get_image_features  # back to the class methods
    assert text_calls == [256, 256, 88] + [100] * 6
    assert image_calls == [16, 16, 8]
    torch.testing.assert_close(chunked_text, whole_text, rtol=0, atol=1e-6)
    torch.testing.assert_close(explicit, whole_text, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked_image, whole_image, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="batch_size"):
            longclip.encode_image(pixels, batch_size=0)
