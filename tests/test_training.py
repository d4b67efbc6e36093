"""Training pieces: settings, optimiser groups and schedules, cached-feature gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_longclip import BetaCLIPModel, FineLIPModel, LongCLIPModel
from hf_longclip.data import FixCLIPCollator
from hf_longclip.features import concat_features
from hf_longclip.models.modeling_fixclip import random_patch_mask
from hf_longclip.testing_utils import SCENE_CAPTIONS, tiny_clip, tiny_processor, tiny_variant
from hf_longclip.training.accumulation import cached_accumulation_step
from hf_longclip.training.arguments import load_recipe, parse_training_arguments
from hf_longclip.training.optim import (
    GroupSchedule,
    build_scheduler,
    lr_multiplier,
    parameter_groups,
    schedules_for_groups,
)

# ----------------------------------------------------------------------------------------------- settings
def test_recipe_and_flags_merge_with_flags_winning(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  variant: finelip\n  model_config: {hinge_margin: 0.3}\n"
        "training:\n  learning_rate: 1e-6\n  head_learning_rate: 2e-4\n  per_device_train_batch_size: 8\n"
        "  eval_before_training: false\n"
    )
    model_args, data_args, train_args = parse_training_arguments(
        ["--config", str(recipe), "--per_device_train_batch_size", "4", "--train_data", "x.jsonl"]
    )
    assert model_args.variant == "finelip" and model_args.model_config_overrides() == {"hinge_margin": 0.3}
    assert train_args.learning_rate == 1e-6 and isinstance(train_args.learning_rate, float)  # YAML's "1e-6" string
    assert train_args.head_learning_rate == 2e-4 and train_args.eval_before_training is False
    assert train_args.per_device_train_batch_size == 4 and data_args.train_data == "x.jsonl"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate", "-1"], "learning_rate must be >= 0"),
        (["--warmup_ratio", "1.5"], "warmup_ratio"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--report_to", "mlflowz"], "unknown tracker"),
        (["--min_learning_rate", "1e-3", "--learning_rate", "1e-4"], "min_learning_rate"),
        (["--model_config", "[1, 2]"], "JSON object"),
        (["--push_to_hub", "true"], "hub_model_id"),
        (["--variant", "nope"], "unknown variant .nope.; choose one of longclip, finelip"),
    ],
)
def test_invalid_settings_fail_before_any_work(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_training_arguments(flags)


def test_recipe_with_unknown_key_lists_the_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1.0e-6\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rat'\].*learning_rate"):
        load_recipe(recipe)


# ----------------------------------------------------------------------------------------------- optimiser
def test_parameter_groups_split_heads_and_decay():
    model = FineLIPModel.from_clip(tiny_clip(seed=0))
    groups = {g["name"]: g for g in parameter_groups(model, 1e-6, 0.01, head_learning_rate=2e-4,
                                                      weight_decay_filter="matrices")}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    head_names = {names[id(p)] for g in ("head", "head_no_decay") for p in groups[g]["params"]}
    assert head_names and all(n.startswith(("image_aggregation.", "text_aggregation.")) for n in head_names)
    assert groups["head"]["lr"] == 2e-4 and groups["backbone"]["lr"] == 1e-6
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.01
    no_decay = {names[id(p)] for p in groups["backbone_no_decay"]["params"]}
    assert all(n.endswith(("bias", "logit_scale", "embedding")) or "norm" in n for n in no_decay)
    # FineLIP's default loss does not read logit_scale: it is left out of training, and joins with the global term
    grouped = {names[id(p)] for g in groups.values() for p in g["params"]}
    assert "logit_scale" not in grouped and not model.logit_scale.requires_grad
    with_global = FineLIPModel.from_clip(tiny_clip(seed=0), global_loss_weight=1.0)
    grouped = {n for g in parameter_groups(with_global, 1e-6, 0.01, weight_decay_filter="matrices")
               for n, p in with_global.named_parameters() if any(p is q for q in g["params"])}
    assert "logit_scale" in grouped
    # Long-CLIP's recipe decays everything: one backbone group holding every parameter
    everything = parameter_groups(LongCLIPModel.from_clip(tiny_clip(seed=0)), 1e-6, 0.01, weight_decay_filter="all")
    assert [g["name"] for g in everything] == ["backbone"]


def test_schedule_values_by_hand():
    s = GroupSchedule("backbone", peak=1e-5, floor=1e-7, warmup_steps=4)
    assert lr_multiplier(0, 104, s) == pytest.approx(0.25)  # Long-CLIP's (step + 1) / warmup ramp
    assert lr_multiplier(3, 104, s) == pytest.approx(1.0)
    assert lr_multiplier(4, 104, s) == pytest.approx(1.0)  # cosine starts at the peak
    mid = 1e-7 / 1e-5 + (1 - 1e-7 / 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_multiplier(54, 104, s) == pytest.approx(mid)
    assert lr_multiplier(104, 104, s) == pytest.approx(1e-7 / 1e-5)  # the floor
    assert lr_multiplier(10, 104, s, "constant") == 1.0
    assert lr_multiplier(54, 104, GroupSchedule("h", 1.0, 0.0, 4), "linear") == pytest.approx(0.5)

    model = BetaCLIPModel.from_clip(tiny_clip(seed=0))
    groups = parameter_groups(model, 1e-5, 0.01, head_learning_rate=1e-3, weight_decay_filter="matrices")
    optimizer = torch.optim.AdamW(groups)
    schedules = schedules_for_groups(groups, 1e-5, 1e-7, 4, head_learning_rate=1e-3, head_min_learning_rate=1e-4,
                                     head_warmup_steps=0)
    scheduler = build_scheduler(optimizer, 104, schedules)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.25e-5) and lrs["head"] == pytest.approx(1e-3)  # no head warm-up
    for _ in range(104):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(1e-7) and lrs["head"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------------- accumulation
def _examples(seed=0):
    torch.manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 32, 32), "caption": c, "id": i % 6}  # ids 0, 1 repeat: duplicate images
        for i, c in enumerate(SCENE_CAPTIONS)
    ]


def test_cached_accumulation_replays_random_choices():
    """Random patch masks drawn inside the encoder are the same in the no-grad pass and the recompute."""
    processor = tiny_processor()
    model = tiny_variant("fixclip", seed=3, processor=processor, group_align_start=1).train()
    collator = FixCLIPCollator(processor)
    micro = [collator(_examples()[i : i + 4]) for i in (0, 4)]
    torch.manual_seed(123)
    cached_accumulation_step(model, micro)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch.manual_seed(123)  # the masks the cached step drew: one draw per micro-batch, in order
    masks = [random_patch_mask(4, 16, model.config.mask_ratio, None) for _ in micro]
    torch.manual_seed(123)
    features = []
    for batch, mask in zip(micro, masks):
        features.append(model.loss_features(**batch, patch_mask=mask))
    model.loss_from_features(concat_features(features)[0]).loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4, atol=1e-6)


def test_concat_features_pads_trailing_dims():
    a = {"q": torch.ones(2, 3, 4), "m": torch.ones(2, 3, dtype=torch.bool), "x": None}
    b = {"q": torch.ones(1, 5, 4), "m": torch.ones(1, 5, dtype=torch.bool), "x": None}
    merged, shapes = concat_features([a, b])
    assert set(merged) == {"q", "m"} and merged["q"].shape == (3, 5, 4)
    assert merged["m"].tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 5]
    assert shapes == [{"q": (2, 3, 4), "m": (2, 3)}, {"q": (1, 5, 4), "m": (1, 5)}]


def test_every_recipe_parses():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "training_scripts" / "configs").glob("*.yaml"))
    assert len(recipes) >= 7
    for recipe in recipes:
        model_args, data_args, train_args = parse_training_arguments(["--config", str(recipe)])
        assert model_args.variant in recipe.name or recipe.name == "quickstart.yaml"
        data_args.collator_overrides(), model_args.model_config_overrides()


def test_collator_config_reaches_the_collator():
    from hf_longclip import get_variant

    _, data_args, _ = parse_training_arguments(["--collator_config", '{"max_phrases": 3, "num_sentences": 2}'])
    collator = get_variant("betaclip").make_collator(tiny_processor(), seed=0, **data_args.collator_overrides())
    assert collator.max_phrases == 3 and collator.num_sentences == 2
    with pytest.raises(ValueError, match="does not fit LongCLIPCollator"):
        get_variant("longclip").make_collator(tiny_processor(), seed=0, max_phrases=3)
