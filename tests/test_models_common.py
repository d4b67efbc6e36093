"""The contracts every registered variant keeps, run over the registry with one tiny-model factory.

Per-variant test files hold each method's maths; this file holds what makes a variant a transformers model and a
trainable hf_longclip variant: registry completeness, save / load (with and without the package), the two-stage
loss interface, cached accumulation, construction options, exports, checkpointing, loud keyword handling, output
conventions, hidden states and attentions, the zero-shot pipeline and the training hooks.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor, CLIPModel, pipeline

from hf_longclip import VARIANTS, CLIPVariantOutput, FrozenPrefixEmbedding
from hf_longclip.models.modeling_fixclip import random_patch_mask
from hf_longclip.testing_utils import SCENE_CAPTIONS, run_without_package, tiny_clip, tiny_processor, tiny_variant
from hf_longclip.text import parse_hierarchies
from hf_longclip.training.accumulation import cached_accumulation_step
from hf_longclip.training.arguments import parse_training_arguments

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(VARIANTS)
#: Extra config fields that make the common checks reach more code (the PCA step of Long-CLIP with 8 samples, the
#: optional global term of FineLIP, so that logit_scale trains). Tests of a registered variant not listed here run
#: with its defaults.
RICHER_CONFIG = {
    "longclip": {"pca_components": 3},
    "finelip": {"global_loss_weight": 0.5},
}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _examples(count=8, seed=0, hierarchy=False):
    torch.manual_seed(seed)
    examples = [
        {"pixel_values": torch.randn(3, 32, 32), "caption": caption, "id": i % 6}  # ids 0, 1 repeat
        for i, caption in enumerate(SCENE_CAPTIONS[:count])
    ]
    if hierarchy:
        for example, parsed in zip(examples, parse_hierarchies([e["caption"] for e in examples])):
            example.update(parsed)
    return examples


def _model_and_batch(name, processor, count=4, richer=False, **fields):
    variant = VARIANTS[name]
    model = tiny_variant(name, seed=3, processor=processor, **(RICHER_CONFIG.get(name, {}) if richer else {}), **fields)
    collator = variant.make_collator(processor, seed=0)
    batch = collator(_examples(count, hierarchy=bool(variant.record_fields)))
    return model, collator, batch


def _inference_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def _tensors(output):
    """Every tensor of an output (nested outputs flattened), by dotted name."""
    found = {}
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            found[key] = value
        elif hasattr(value, "items"):
            found.update({f"{key}.{k}": v for k, v in _tensors(value).items()})
        elif isinstance(value, (tuple, list)):
            found.update({f"{key}.{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
    return found


# ----------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_complete(name, processor):
    """A registered variant has its card section, docs page, recipes (for this variant), a collator whose batches
    the model takes, and heads that exist; anything missing fails here, named."""
    variant = VARIANTS[name]
    missing = []
    if not (ROOT / "model_cards" / f"{name}.md").is_file():
        missing.append(f"card section model_cards/{name}.md")
    if not (ROOT / "docs" / f"{name}.md").is_file():
        missing.append(f"docs page docs/{name}.md")
    if not variant.recipes:
        missing.append("a training recipe")
    for recipe in variant.recipes:
        path = ROOT / "training_scripts" / "configs" / recipe
        if not path.is_file():
            missing.append(f"recipe training_scripts/configs/{recipe}")
            continue
        model_args, _, _ = parse_training_arguments(["--config", str(path)])
        if model_args.variant != name:
            missing.append(f"recipe {recipe} trains {model_args.variant!r}, not {name!r}")
    assert not missing, f"variant {name!r} lacks: " + "; ".join(missing)
    model, _, batch = _model_and_batch(name, processor)
    assert type(model) is variant.model_class and model.config.model_type == name
    assert model(**batch, return_loss=True).loss.dim() == 0


def test_registry_rejects_inconsistent_entries():
    from hf_longclip import FineLIPConfig, FineLIPModel, LongCLIPModel, Variant, get_variant
    from hf_longclip.data import FineLIPCollator

    with pytest.raises(ValueError, match="model_type"):
        Variant("finelip2", "x", FineLIPConfig, FineLIPModel, FineLIPCollator, "s", "r", ("finelip-vit-b16.yaml",))
    with pytest.raises(ValueError, match="config_class"):
        Variant("finelip", "x", FineLIPConfig, LongCLIPModel, FineLIPCollator, "s", "r", ("finelip-vit-b16.yaml",))
    with pytest.raises(ValueError, match="unknown variant 'nope'; choose one of longclip"):
        get_variant("nope")
    with pytest.raises(ValueError, match="does not fit"):
        VARIANTS["longclip"].make_collator(tiny_processor(), max_phrases=3)


def test_no_other_list_of_variant_names():
    """Outside the registry and the variants' own files, no source file names several variants on one line."""
    own = {f"{kind}_{name}.py" for name in NAMES for kind in ("configuration", "modeling", "losses", "collate")}
    offenders = []
    for path in [*(ROOT / "hf_longclip").rglob("*.py"), *(ROOT / "training_scripts").rglob("*.py")]:
        if path.name in own or path.name == "variants.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if sum(f'"{name}"' in line or f"'{name}'" in line for name in NAMES) >= 2:
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------------------------- save / load
def _sibling_imports(source: str) -> set[str]:
    return {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level == 1}


@pytest.mark.parametrize("name", NAMES)
def test_save_and_auto_load_round_trip(name, processor, tmp_path):
    model, _, batch = _model_and_batch(name, processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    # no legacy `text_config_dict` (CLIPConfig would merge it over text_config and reset 248 rows to 77)
    assert config["model_type"] == name and "text_config_dict" not in config and "vision_config_dict" not in config
    assert config["text_config"]["max_position_embeddings"] == 248
    modeling = f"modeling_{name}.{VARIANTS[name].model_class.__name__}"
    assert config["auto_map"]["AutoModel"] == modeling
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == modeling
    # every sibling module the saved code imports was saved with it (remote code needs them)
    pending, seen = [f"modeling_{name}", f"configuration_{name}"], set()
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            assert (tmp_path / f"{module}.py").is_file(), f"{module}.py missing next to the weights"
            pending += sorted(_sibling_imports((tmp_path / f"{module}.py").read_text()))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and isinstance(loaded_processor, type(processor))
    assert loaded_processor.tokenizer.model_max_length == 248
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(**batch, return_loss=True)
        torch.manual_seed(0)
        actual = loaded(**batch, return_loss=True)
    for key, value in _tensors(expected).items():
        torch.testing.assert_close(_tensors(actual)[key], value, rtol=0, atol=0, msg=key)
    assert loaded.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
def test_trust_remote_code_and_zero_shot_pipeline_without_the_package(name, processor, tmp_path):
    model, _, batch = _model_and_batch(name, processor)
    model.eval().save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    inputs = _inference_inputs(batch)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "case.pt")
    result = run_without_package(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained(r"{tmp_path / 'model'}", trust_remote_code=True).eval()
        assert type(model).__name__ == "{VARIANTS[name].model_class.__name__}", type(model)
        case = torch.load(r"{tmp_path / 'case.pt'}", weights_only=True)
        with torch.no_grad():
            logits = model(**case["inputs"]).logits_per_image
        assert torch.allclose(logits, case["expected"], rtol=0, atol=1e-5), (logits - case["expected"]).abs().max()
        classify = pipeline("zero-shot-image-classification", model=r"{tmp_path / 'model'}", trust_remote_code=True)
        scores = classify(Image.new("RGB", (32, 32), (200, 30, 30)), candidate_labels=["a red square", "a dog", "a cat"])
        assert len(scores) == 3 and abs(sum(s["score"] for s in scores) - 1) < 1e-4, scores
        print("REMOTE_OK")
        """
    )
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_zero_shot_pipeline_with_the_package(name, processor, tmp_path):
    """One image against three texts: unpaired inputs work like stock CLIP (beta-CLIP included)."""
    model, _, _ = _model_and_batch(name, processor)
    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from PIL import Image

    classify = pipeline("zero-shot-image-classification", model=str(tmp_path))
    scores = classify(Image.new("RGB", (32, 32), (20, 200, 30)), candidate_labels=["a green square", "a dog", "a car"])
    image = processor(images=Image.new("RGB", (32, 32), (20, 200, 30)), return_tensors="pt")["pixel_values"]
    labels = ["a green square", "a dog", "a car"]  # the pipeline's default template, padded to the longest
    texts = processor(text=[f"This is a photo of {label}." for label in labels], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], pixel_values=image)
    assert logits.logits_per_image.shape == (1, 3)
    probabilities = logits.logits_per_image.softmax(-1)[0]
    by_label = {s["label"]: s["score"] for s in scores}
    assert by_label == pytest.approx(dict(zip(labels, probabilities.tolist())), abs=1e-5)


# ----------------------------------------------------------------------------------------------- two-stage loss
@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_loss_from_features_of_loss_features(name, processor):
    model, _, batch = _model_and_batch(name, processor, richer=True)
    model.train()
    kwargs = model.training_loss_kwargs(step=3, steps_per_epoch=10)
    torch.manual_seed(7)
    whole = model(**batch, return_loss=True, **kwargs)
    torch.manual_seed(7)
    split = model.loss_from_features(model.loss_features(**batch), **kwargs)
    assert whole.loss_terms().keys() == split.loss_terms().keys() and len(whole.loss_terms()) >= 2
    for key, value in whole.loss_terms().items():
        torch.testing.assert_close(split.loss_terms()[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_cached_accumulation_over_four_micro_batches_equals_one_full_batch(name, processor):
    """GradCache: 4 micro-batches of 2 give the loss and the gradients of one pass over all 8 samples (float64, so
    the comparison tests the algebra, not float32 summation order)."""
    model, collator, _ = _model_and_batch(name, processor, richer=True)
    model.train().double()
    examples = [{**e, "pixel_values": e["pixel_values"].double()}
                for e in _examples(8, hierarchy=bool(VARIANTS[name].record_fields))]
    whole = VARIANTS[name].make_collator(processor, seed=0)(examples)  # a second collator: the same draws
    micro = [collator(examples[i : i + 2]) for i in range(0, 8, 2)]  # each micro-batch padded on its own
    if "patch_mask" in inspect.signature(model.loss_features).parameters:  # random masks: the same in both runs
        whole["patch_mask"] = random_patch_mask(8, model.config.num_patches, 0.75, generator=5)
        for i, batch in enumerate(micro):
            batch["patch_mask"] = whole["patch_mask"][2 * i : 2 * i + 2]
    kwargs = model.training_loss_kwargs(step=3, steps_per_epoch=10)

    full = model(**whole, return_loss=True, **kwargs)
    full.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    output = cached_accumulation_step(model, micro, kwargs)
    torch.testing.assert_close(output.loss, full.loss.detach(), rtol=1e-10, atol=1e-12)
    cached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert cached.keys() == reference.keys() and len(cached) > 10
    assert any(model.is_head_parameter(n) for n in cached) or not model.head_modules
    for key, grad in cached.items():
        torch.testing.assert_close(grad, reference[key], rtol=1e-8, atol=1e-10, msg=lambda m: f"{key}: {m}")
    # and it is not the authors' naive accumulation (2-way negatives per micro-batch)
    model.zero_grad()
    for batch in micro:
        (model(**batch, return_loss=True, **kwargs).loss / 4).backward()
    naive = model.text_projection.weight.grad
    assert not torch.allclose(naive, reference["text_projection.weight"], rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------- training hooks
@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_gets_a_gradient_in_the_default_configuration(name, processor):
    """What lets DDP run without find_unused_parameters (the model's `ddp_find_unused_parameters` says False)."""
    model, _, batch = _model_and_batch(name, processor)
    model.train()
    model(**batch, return_loss=True, **model.training_loss_kwargs(0, 10)).loss.backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without and model.ddp_find_unused_parameters is False, without
    # and without the optional inputs of the collator (no short captions, no hierarchy): still none missing
    model.zero_grad(set_to_none=True)
    model(**_inference_inputs(batch), return_loss=True).loss.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.mark.parametrize("name", NAMES)
def test_heads_are_exactly_what_stock_clip_lacks(name, processor):
    model, _, _ = _model_and_batch(name, processor)
    heads = {k for k in model.state_dict() if model.is_head_parameter(k)}
    backbone = set(model.backbone_state_dict())
    assert heads.isdisjoint(backbone) and heads | backbone == set(model.state_dict())
    assert bool(heads) == bool(model.head_modules)
    assert backbone == set(CLIPModel(model.config).state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_training_hooks_are_callable_by_the_trainer(name, processor):
    model, _, batch = _model_and_batch(name, processor)
    kwargs = model.training_loss_kwargs(step=0, steps_per_epoch=4)
    assert isinstance(kwargs, dict)
    model(**batch, return_loss=True, **kwargs)  # the forward takes what the hook gives
    model.loss_from_features(model.loss_features(**batch), **kwargs)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    model.after_optimizer_step()
    assert model.logit_scale.item() == 9.0 or model.logit_scale.item() <= 4.6052  # a clamp, or nothing


# ----------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("name", NAMES)
def test_from_clip_honours_loading_arguments_on_a_folder_and_an_object(name, processor, tmp_path):
    cls = VARIANTS[name].model_class
    tiny = dict(VARIANTS[name].tiny_config)
    clip = tiny_clip(seed=0, processor=processor)
    clip.save_pretrained(tmp_path / "clip")
    for source in (str(tmp_path / "clip"), clip):
        model = cls.from_clip(source, dtype=torch.float64, attn_implementation="eager", **tiny)
        assert model.dtype == torch.float64
        assert model.config.text_config._attn_implementation == "eager"
        assert model.config.vision_config._attn_implementation == "eager"
        assert model.text_model.embeddings.position_embedding.weight.shape[0] == 248
    model = cls.from_pretrained(tmp_path / "clip", dtype=torch.bfloat16, **tiny)  # a stock CLIP is stretched
    assert type(model) is cls and model.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="hinge_margn"):
        cls.from_clip(clip, hinge_margn=0.3)
    with pytest.raises(TypeError, match="image_idx"):
        cls.from_clip(str(tmp_path / "clip"), image_idx=1)
    with pytest.raises(TypeError, match="revision"):
        cls.from_clip(clip, revision="main")


@pytest.mark.parametrize("name", NAMES)
def test_from_clip_continues_another_variant(name, processor, tmp_path):
    """Another hf_longclip model gives its trained backbone (already stretched, logit_scale kept); heads are new."""
    source = tiny_variant("longclip", seed=4, processor=processor)
    with torch.no_grad():
        source.logit_scale.fill_(3.0)
    source.save_pretrained(tmp_path)
    model = VARIANTS[name].model_class.from_clip(str(tmp_path), **VARIANTS[name].tiny_config)
    for key, value in source.backbone_state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert model.logit_scale.item() == 3.0


@pytest.mark.parametrize("name", NAMES)
def test_fresh_model_frozen_rows_equal_the_saved_rows(name, processor, tmp_path):
    """A model built from a config (post_init runs twice) and one from a folder without weights use the rows they
    save: the forward's frozen rows equal weight[:keep] and the state dict holds the weight."""
    config = tiny_variant(name, processor=processor).config
    model = VARIANTS[name].model_class(config)
    embedding = model.text_model.embeddings.position_embedding
    assert isinstance(embedding, FrozenPrefixEmbedding)
    ids = torch.tensor([[1, 5, 9, config.text_config.eos_token_id]])
    with torch.no_grad():
        model.get_text_features(input_ids=ids)
    keep = config.position_keep
    torch.testing.assert_close(embedding.frozen_rows, embedding.weight[:keep], rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict()["text_model.embeddings.position_embedding.weight"],
                               embedding.weight.detach(), rtol=0, atol=0)
    reloaded = VARIANTS[name].model_class.from_pretrained(None, config=config, state_dict=model.state_dict())
    with torch.no_grad():
        reloaded.get_text_features(input_ids=ids)
    frozen = reloaded.text_model.embeddings.position_embedding
    torch.testing.assert_close(frozen.frozen_rows, embedding.weight[:keep], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_export_to_stock_clip_text_model(name, processor):
    model, _, batch = _model_and_batch(name, processor)
    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = model.to_text_model(with_projection=True)
    with torch.no_grad():
        torch.testing.assert_close(text(input_ids=ids, attention_mask=mask).text_embeds,
                                   model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output)
    try:
        clip = model.to_clip_model()
    except NotImplementedError as error:  # an image tower with no stock equivalent (Fix-CLIP's prompts) says so
        assert "to_text_model" in str(error)
        return
    with torch.no_grad():
        expected = model(**_inference_inputs(batch)).logits_per_image
        torch.testing.assert_close(clip(**_inference_inputs(batch)).logits_per_image, expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("towers", ["all", "text"])
def test_checkpointing_keeps_the_loss_and_the_gradients(name, towers, processor):
    model, _, batch = _model_and_batch(name, processor)
    model.train()

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = run()
    model.enable_checkpointing(towers)
    assert model.text_model.encoder.gradient_checkpointing
    assert model.vision_model.encoder.gradient_checkpointing is (towers == "all")
    loss, grads = run()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == plain.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, plain[key], rtol=1e-4, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------- loud contracts
@pytest.mark.parametrize("name", NAMES)
def test_unknown_keywords_raise_naming_them(name, processor):
    model, _, batch = _model_and_batch(name, processor)
    with pytest.raises(TypeError, match="image_idx"):
        model(**batch, image_idx=torch.arange(4), return_loss=True)
    with pytest.raises(TypeError, match="short_input_id"):
        model.loss_features(**batch, short_input_id=batch["input_ids"])
    features = model.loss_features(**batch)
    with pytest.raises(TypeError, match="warmup_alfa"):
        model.loss_from_features(features, warmup_alfa=0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("return_loss", [False, True])
def test_hidden_states_and_attentions_reach_both_towers(name, return_loss, processor):
    model, _, batch = _model_and_batch(name, processor)
    model.set_attn_implementation("eager")
    inputs = batch if return_loss else _inference_inputs(batch)
    with torch.no_grad():
        out = model(**inputs, return_loss=return_loss, output_hidden_states=True, output_attentions=True)
    text_layers = model.config.text_config.num_hidden_layers
    vision_layers = model.config.vision_config.num_hidden_layers
    text, vision = out.text_model_output, out.vision_model_output
    assert len(text.hidden_states) == text_layers + 1 and len(text.attentions) == text_layers
    assert len(vision.hidden_states) == vision_layers + 1 and len(vision.attentions) == vision_layers
    tokens = model.config.num_patches + 1
    assert all(h.shape[:2] == (4, tokens) for h in vision.hidden_states)
    assert all(a.shape[0] == 4 and a.dim() == 4 for a in vision.attentions)
    with torch.no_grad():  # selected layers only, as transformers' towers do
        out = model(**_inference_inputs(batch), output_hidden_states=[0, -1])
    assert [h is None for h in out.vision_model_output.hidden_states] == [False] + [True] * (vision_layers - 1) + [False]
    with torch.no_grad():
        quiet = model(**_inference_inputs(batch))
    assert quiet.text_model_output.hidden_states is None and quiet.vision_model_output.attentions is None


@pytest.mark.parametrize("name", NAMES)
def test_output_conventions(name, processor):
    """Batch on dim 0 for per-sample tensors, 0-d loss terms, no boolean outputs, tuples equal to the dict, and
    return_dict=False (or config.return_dict=False) gives the tuple."""
    model, _, batch = _model_and_batch(name, processor)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        out = model(**batch, return_loss=True)
        torch.manual_seed(0)
        as_tuple = model(**batch, return_loss=True, return_dict=False)
    assert isinstance(out, CLIPVariantOutput) and isinstance(as_tuple, tuple)
    assert all(v.dim() == 0 for v in out.loss_terms().values()) and "loss" in out.loss_terms()
    for key, value in _tensors(out).items():
        assert value.dtype != torch.bool, f"{key} is a boolean output"
        if value.dim() and not key.startswith(("text_model_output", "vision_model_output")):
            assert value.shape[0] == 4, f"{key} has shape {tuple(value.shape)}: the batch is not on dim 0"
    flat = [v for v in _tensors(out).values()]
    flat_tuple = [v for v in torch.utils._pytree.tree_leaves(as_tuple) if isinstance(v, torch.Tensor)]
    assert len(flat) == len(flat_tuple)
    for a, b in zip(flat, flat_tuple):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=False)
        assert isinstance(features, tuple) and features[1].shape == (4, model.config.projection_dim)
    model.config.return_dict = False
    with torch.no_grad():
        assert isinstance(model(**_inference_inputs(batch)), tuple)
        assert isinstance(model.get_image_features(pixel_values=batch["pixel_values"]), tuple)


def test_a_sixth_variant_is_picked_up_from_its_registry_entry(tmp_path):
    """A variant defined outside the package and registered with one `register_variant` call works with the Auto
    classes, the training arguments, the CLI's stretch command, save / load and `from_clip`; the model card asks for
    its card section by name. (In a subprocess: registration is process-wide.)"""
    clip_dir = tmp_path / "clip"
    tiny_clip(seed=0, processor=tiny_processor()).save_pretrained(clip_dir)
    tiny_processor(max_length=77).save_pretrained(clip_dir)
    script = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        from transformers import AutoModel
        import hf_longclip
        from hf_longclip import LongCLIPConfig, LongCLIPModel, Variant, register_variant
        from hf_longclip.data import LongCLIPCollator

        class ToyConfig(LongCLIPConfig):
            model_type = "toyclip"

        class ToyModel(LongCLIPModel):
            config_class = ToyConfig
            head_modules = ("toy_head",)

            def __init__(self, config):
                super().__init__(config)
                self.toy_head = nn.Linear(config.projection_dim, 1)
                self.post_init()

        register_variant(Variant("toyclip", "Toy", ToyConfig, ToyModel, LongCLIPCollator, summary="s",
                                 reference_recipe="r", recipes=("toyclip.yaml",)))
        from hf_longclip.cli import main
        from hf_longclip.hub import render_model_card
        from hf_longclip.training.arguments import parse_training_arguments

        assert parse_training_arguments(["--variant", "toyclip"])[0].variant == "toyclip"
        assert main(["stretch", "--base", r"{clip_dir}", "--variant", "toyclip", "--output", r"{tmp_path / 'toy'}"]) == 0
        model = AutoModel.from_pretrained(r"{tmp_path / 'toy'}")
        assert type(model) is ToyModel and model.is_head_parameter("toy_head.weight")
        assert set(model.backbone_state_dict()) == set(LongCLIPModel(model.config).state_dict())
        try:
            render_model_card(model)
        except FileNotFoundError as error:
            assert "toyclip.md" in str(error), error
        else:
            raise AssertionError("a card without the variant's section was rendered")
        print("SIXTH_OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert "SIXTH_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", NAMES)
def test_text_reaches_the_towers_at_its_own_length_never_at_248(name, processor):
    """No collator, processor or head pads text to the 248-token table: every text-tower call of a training step is
    at most as wide as the batch's longest text of its kind (packed rows: at most the packing capacity)."""
    model, _, batch = _model_and_batch(name, processor)
    text_keys = [k for k in batch if k.endswith("input_ids")]
    widths = {k: batch[k].shape[-1] for k in text_keys}
    for key in text_keys:
        mask = batch[key.replace("input_ids", "attention_mask")]
        assert widths[key] == int(mask.sum(-1).max()), f"{key} is padded past its longest row"
    calls = []
    hook = model.text_model.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[-1]), with_kwargs=True
    )
    try:
        model(**batch, return_loss=True).loss.backward()
    finally:
        hook.remove()
    longest = max(max(widths.values()), 64)  # 64: the default packing capacity
    assert calls and max(calls) <= longest < 248


def _step_with_saved_bytes(model, batch):
    """Loss terms, gradients and the bytes autograd saved for backward (parameters excluded) of one step."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # Fix-CLIP's patch masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(**batch, return_loss=True)
    output.loss.backward()
    terms = {k: v.detach() for k, v in output.items() if k.startswith("loss") and isinstance(v, torch.Tensor)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms, grads, sum(seen.values())


@pytest.mark.parametrize("name", NAMES)
def test_memory_efficient_quick_gelu_keeps_losses_and_gradients_and_saves_less(name, processor):
    from hf_longclip.models.activations import use_memory_efficient_activations

    model, _, batch = _model_and_batch(name, processor)
    layers = len(model.text_model.encoder.layers) + len(model.vision_model.encoder.layers)
    assert use_memory_efficient_activations(model, False) == layers  # on by default, in every tower MLP
    terms, grads, saved = _step_with_saved_bytes(model, batch)
    assert use_memory_efficient_activations(model, True) == layers
    new_terms, new_grads, new_saved = _step_with_saved_bytes(model, batch)
    assert new_terms.keys() == terms.keys() and new_grads.keys() == grads.keys()
    for key, value in terms.items():
        torch.testing.assert_close(new_terms[key], value, rtol=1e-5, atol=1e-7)
    scale = max(float(g.abs().max()) for g in grads.values())
    for key, value in grads.items():
        # rel 1e-5 per parameter, with a floor at 1e-6 of the largest gradient: the attention key biases' gradients
        # are zero in exact arithmetic (softmax ignores a per-query constant) and float noise in practice
        error = float((new_grads[key] - value).norm())
        assert error <= 1e-5 * float(value.norm()) + 1e-6 * scale, (key, error, float(value.norm()))
    assert new_saved < saved
