"""Attribute-binding hard negatives: the metric, the generated scenes' records, `hf-longclip evaluate hardneg:`, the
trainer's before/after score; and the quickstart findings (recipe keys per variant, the ShareGPT4V holdout log,
MulCLIP's word loss on 3x3 patches)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from hf_longclip.data.synthetic import (
    COLORS,
    NEGATIVE_TYPES,
    SYNTHETIC_WORDS,
    Scene,
    SceneObject,
    hard_negative_records,
    parse_caption,
    write_hard_negative_dataset,
    write_synthetic_dataset,
)
from hf_longclip.evaluation import (
    EvalSettings,
    evaluate,
    evaluate_hard_negatives,
    hard_negative_accuracy,
    hard_negative_ranks,
    parse_benchmarks,
    read_hard_negatives,
)
from hf_longclip.testing_utils import DEFAULT_WORDS, tiny_processor, tiny_variant

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "training_scripts" / "configs" / "quickstart.yaml"
SETTINGS = EvalSettings(batch_size=4, progress=False)


# ----------------------------------------------------------------------------------------------- the metric
#: 3 images x 7 texts. Image 0: positive t0 beats t1, t2. Image 1: positive t3 ties t4, loses to t5, beats t1.
#: Image 2: positive t6 beats t0.
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.3, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.2, 0.0, 0.6, 0.6, 0.7, 0.0],
        [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4],
    ]
)
POSITIVES = [0, 3, 6]
NEGATIVES = [[1, 2], [4, 5, 1], [0]]
TYPES = [["colour", "swap"], ["colour", "swap", "shape"], ["colour"]]


def test_hand_made_case_with_a_tie():
    result = hard_negative_accuracy(SCORES, POSITIVES, NEGATIVES, TYPES)
    # image 1 fails: its tie with t4 ranks t4 above it, t5 beats it -> rank 3; images 0 and 2 rank 1
    assert result["accuracy"] == pytest.approx(100 * 2 / 3)
    assert result["mean_rank"] == pytest.approx((1 + 3 + 1) / 3)
    assert result["chance"] == pytest.approx(100 * (1 / 3 + 1 / 4 + 1 / 2) / 3)
    assert result["chance_mean_rank"] == pytest.approx(((1 + 1) + (1 + 1.5) + (1 + 0.5)) / 3)
    assert result["num_images"] == 3 and result["num_negatives"] == 6
    assert result["per_type"] == {
        "colour": {"accuracy": pytest.approx(100 * 2 / 3), "num_pairs": 3},  # the tie is a miss
        "shape": {"accuracy": 100.0, "num_pairs": 1},
        "swap": {"accuracy": 50.0, "num_pairs": 2},
    }
    positive = SCORES[[0, 1, 2], POSITIVES]
    negative = torch.tensor([[0.5, 0.3, -math.inf], [0.6, 0.7, 0.2], [0.1, -math.inf, -math.inf]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    assert hard_negative_ranks(positive, negative, mask).tolist() == [1, 3, 1]
    # a NaN score never counts as a win; without types there is no per_type
    nan = hard_negative_accuracy(torch.tensor([[float("nan"), 0.0]]), [0], [[1]])
    assert nan["accuracy"] == 0.0 and nan["mean_rank"] == 2.0 and "per_type" not in nan
    with pytest.raises(ValueError, match="at least one negative"):
        hard_negative_accuracy(SCORES, POSITIVES, [[1], [], [0]])


class FixedScores(nn.Module):
    """A model whose retrieval interface scores image i against text t with ``SCORES[i, t]``: images are recognised
    by their (processed) red channel, texts by their token ids."""

    retrieval_scorings = ("global",)

    def __init__(self, texts: list[str], processor, images: list[Path]):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.ids = {tuple(processor.tokenizer(text)["input_ids"]): t for t, text in enumerate(texts)}
        pixels = processor.image_processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
        self.reds = pixels["pixel_values"][:, 0].mean(dim=(1, 2))

    def retrieval_image_features(self, pixel_values, scoring="global"):
        reds = pixel_values[:, 0].mean(dim=(1, 2))
        index = (reds[:, None] - self.reds[None, :]).abs().argmin(1)
        return {"image_embeds": index.float()[:, None]}

    def retrieval_text_features(self, input_ids, attention_mask, scoring="global"):
        rows = [self.ids[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask)]
        return {"text_embeds": torch.tensor(rows, dtype=torch.float32)[:, None]}

    def retrieval_scores(self, image_features, text_features, scoring="global"):
        images = image_features["image_embeds"][:, 0].long()
        texts = text_features["text_embeds"][:, 0].long()
        return SCORES[images][:, texts]


def _write_images(folder: Path, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"img{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(folder / name)
        names.append(name)
    return names


def test_scored_through_the_models_retrieval_interface(tmp_path, processor):
    """The same hand-made case, read from JSONL and scored by `evaluate_hard_negatives` through the model's
    `retrieval_scores`: same accuracy, ranks and per-type results; a missing image is skipped and counted."""
    texts = [f"text number {t} " + "red " * t for t in range(7)]
    images = _write_images(tmp_path, 3)
    path = tmp_path / "hn.jsonl"
    lines = [
        {"image": images[i], "caption": texts[POSITIVES[i]], "negatives": [texts[t] for t in NEGATIVES[i]],
         "negative_types": TYPES[i]}
        for i in range(3)
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    model = FixedScores(texts, processor, [tmp_path / name for name in images])
    result = evaluate_hard_negatives(model, processor, path, settings=SETTINGS)
    expected = hard_negative_accuracy(SCORES, POSITIVES, NEGATIVES, TYPES)
    for key in ("accuracy", "mean_rank", "chance", "num_images", "num_negatives", "per_type"):
        assert result[key] == expected[key], key
    assert result["scoring"] == "global" and result["unreadable_images"] == 0

    (tmp_path / images[1]).unlink()  # image 1 (the failing one) is skipped: 2 of 2 left succeed
    skipped = evaluate_hard_negatives(model, processor, path, settings=SETTINGS)
    assert skipped["accuracy"] == 100.0 and skipped["num_images"] == 2 and skipped["unreadable_images"] == 1
    assert skipped["unreadable_reasons"] == {"missing": 1}


def test_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "caption": "x", "negatives": ["y"]}\n\n{"image": "a.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: 'negatives'"):
        read_hard_negatives(path)
    path.write_text('{"image": "a.png", "caption": "x", "negatives": ["y", "z"], "negative_types": ["colour"]}\n')
    with pytest.raises(ValueError, match="one per negative"):
        read_hard_negatives(path)
    with pytest.raises(FileNotFoundError):
        read_hard_negatives(tmp_path / "none.jsonl")
    assert parse_benchmarks("urban1k,hardneg:Data/HN.jsonl") == ["urban1k", "hardneg:Data/HN.jsonl"]
    with pytest.raises(ValueError, match="names no file"):
        parse_benchmarks("hardneg:")


# ----------------------------------------------------------------------------------------------- generated records
def _differences(a: Scene, b: Scene) -> list[tuple[int, str]]:
    assert a.background == b.background and len(a.objects) == len(b.objects)
    return [
        (i, name)
        for i, (x, y) in enumerate(zip(a.objects, b.objects))
        for name in ("color", "shape", "size", "cell")
        if getattr(x, name) != getattr(y, name)
    ]


def test_generated_negatives_change_exactly_one_attribute_of_one_object(tmp_path):
    path = write_hard_negative_dataset(tmp_path, num_scenes=60, seed=3, image_size=48)
    data = read_hard_negatives(path)
    assert len(data.captions) == 60 and all(p.is_file() for p in data.image_paths)
    attribute_of = {"colour": "color", "shape": "shape", "size": "size", "position": "cell"}
    seen = set()
    for caption, negatives, kinds in zip(data.captions, data.negatives, data.negative_types):
        positive = parse_caption(caption)
        assert positive.caption() == caption and len(positive.objects) >= 2
        assert kinds == list(NEGATIVE_TYPES)  # >= 3 shapes, so every type is there
        for negative_text, kind in zip(negatives, kinds):
            negative = parse_caption(negative_text)  # a valid caption of the generator's own format
            assert negative_text != caption
            changed = _differences(positive, negative)
            if kind == "swap":
                (i, name_i), (j, name_j) = changed
                assert i != j and name_i == name_j != "cell"
                assert getattr(positive.objects[i], name_i) == getattr(negative.objects[j], name_i)
                assert getattr(positive.objects[j], name_i) == getattr(negative.objects[i], name_i)
            else:
                assert len(changed) == 1 and changed[0][1] == attribute_of[kind], (kind, changed)
            seen.add(kind)
    assert seen == set(NEGATIVE_TYPES)
    # the held-out split's own scenes and image files, deterministic from the seed
    paths = write_synthetic_dataset(tmp_path / "full", num_train=4, num_eval=60, seed=3, image_size=48)
    eval_lines = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert [r["caption"] for r in eval_lines] == data.captions
    assert paths["hard_negatives"].read_text() == path.read_text()
    assert hard_negative_records(5, seed=4) != hard_negative_records(5, seed=3)


def test_swap_falls_back_when_colours_agree_and_parse_refuses_other_text():
    same_colour = Scene("gray", (SceneObject("circle", "red", "small", (0, 0)), SceneObject("square", "red", "small", (2, 2)),
                                 SceneObject("circle", "red", "large", (1, 1))))
    import random

    from hf_longclip.data.synthetic import hard_negative_scenes

    swap = {kind: scene for scene, kind in hard_negative_scenes(same_colour, random.Random(0))}["swap"]
    assert {name for _, name in _differences(same_colour, swap)} == {"shape"}  # colours all red: shapes swapped
    caption = same_colour.caption()
    for broken in (caption.replace("red", "pink", 1), caption.replace("three", "four"), caption.replace(" above", " below"),
                   caption[:-1]):
        with pytest.raises(ValueError):
            parse_caption(broken)
    assert "pink" not in COLORS


# ----------------------------------------------------------------------------------------------- CLI and Python runner
def test_cli_evaluate_writes_the_hard_negative_metric(tmp_path, processor, longclip_model, capsys):
    from hf_longclip.cli import main

    model_dir = tmp_path / "model"
    longclip_model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    path = write_hard_negative_dataset(tmp_path / "hn", num_scenes=12, seed=0, image_size=32)
    out = tmp_path / "results.json"
    code = main(["evaluate", "--model", str(model_dir), "--benchmarks", f"hardneg:{path}", "--output", str(out),
                 "--batch-size", "8", "--no-progress", "--device", "cpu"])
    assert code == 0
    saved = json.loads(out.read_text())["benchmarks"][f"hardneg:{path}"]
    assert saved["num_images"] == 12 and saved["num_negatives"] == 60
    assert saved["chance"] == pytest.approx(100 / 6) and 1 <= saved["mean_rank"] <= 6
    assert 0 <= saved["accuracy"] <= 100 and set(saved["per_type"]) == set(NEGATIVE_TYPES)
    assert "chance" in capsys.readouterr().out
    # without --data-root a named benchmark is refused in one line
    assert main(["evaluate", "--model", str(model_dir), "--benchmarks", "urban1k", "--output", str(out)]) == 1
    assert "--data-root is required for urban1k" in capsys.readouterr().err


def test_fine_grained_scoring_and_relative_path_under_data_root(tmp_path):
    proc = tiny_processor()
    finelip = tiny_variant("finelip", processor=proc)
    write_hard_negative_dataset(tmp_path / "root" / "hn", num_scenes=6, seed=1, image_size=32)
    report = evaluate(finelip, proc, "hardneg:hn/hard_negatives.jsonl", tmp_path / "root", scoring="fused",
                      settings=SETTINGS)
    result = report["benchmarks"]["hardneg:hn/hard_negatives.jsonl"]
    assert result["scoring"] == "fused" and result["num_images"] == 6


# ----------------------------------------------------------------------------------------------- trainer
TINY = [
    "--base", "tiny-random", "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "4",
    "--tiny_projection_dim", "32", "--tiny_image_size", "48", "--tiny_patch_size", "16",
    "--synthetic_image_size", "48", "--num_workers", "0", "--disable_progress_bar", "true",
]


def test_trainer_reports_attribute_binding_before_and_after(tmp_path, caplog):
    from hf_longclip.training import main

    with caplog.at_level(logging.INFO, logger="hf_longclip.train"):
        summary = main([
            "--config", str(QUICKSTART), *TINY, "--output_dir", str(tmp_path / "run"), "--image_root",
            str(tmp_path / "data"), "--synthetic_num_train", "32", "--synthetic_num_eval", "16", "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--warmup_steps", "1", "--save_steps", "0",
            "--save_final_model", "false",
        ])
    for tag in ("before", "after"):
        metrics = summary["evaluations"][tag]
        assert metrics["attribute_binding_chance"] == pytest.approx(100 / 6)
        assert metrics["attribute_binding_num_images"] == 16
        assert {f"attribute_binding_{kind}" for kind in NEGATIVE_TYPES} <= set(metrics)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval (")]
    assert len(lines) == 2 and all("attribute binding" in line and "(chance 16.7%)" in line for line in lines), lines
    saved = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert "attribute_binding_accuracy" in saved["evaluations"]["after"]


# ----------------------------------------------------------------------------------------------- findings
def test_recipe_model_config_applies_only_to_its_variant(tmp_path):
    from hf_longclip.training.arguments import parse_training_arguments
    from hf_longclip.training.setup import build_model_and_processor

    model_args, _, _ = parse_training_arguments(["--config", str(QUICKSTART), "--variant", "finelip"])
    assert model_args.model_config_overrides() == {}  # the recipe's Long-CLIP pca_components is not carried over
    model_args, _, _ = parse_training_arguments(["--config", str(QUICKSTART)])
    assert model_args.model_config_overrides() == {"pca_components": 32}

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  variant: longclip\n  base: tiny-random\n  tiny_image_size: 32\n  tiny_patch_size: 8\n"
                      "  model_config: {pca_components: 8, label_smoothing: 0.2}\n")
    model_args, _, _ = parse_training_arguments(["--config", str(recipe), "--variant", "mulclip"])
    assert model_args.model_config_overrides() == {"label_smoothing": 0.2}  # mulclip reads it; not pca_components
    model, _ = build_model_and_processor(model_args)
    assert model.config.pca_components == 32 and model.config.label_smoothing == 0.2  # 32: the default, not 8
    # given explicitly for a variant that never reads it: refused, naming the field and the variant that reads it
    with pytest.raises(ValueError, match=r"pca_components.*not used by finelip.*longclip"):
        parse_training_arguments(["--variant", "finelip", "--model_config", '{"pca_components": 8}'])
    with pytest.raises(ValueError, match="label_smoothing"):
        parse_training_arguments(["--variant", "betaclip", "--model_config", '{"label_smoothing": 0.1}'])


def _sharegpt4v(path: Path, count: int) -> Path:
    entries = [{"image": f"img{i}.jpg", "conversations": [{"from": "human", "value": "?"},
                                                          {"from": "gpt", "value": f"Caption {i}. More."}]}
               for i in range(count)]
    path.write_text(json.dumps(entries))
    return path


def test_sharegpt4v_holdout_is_logged_and_a_large_one_warned(tmp_path, caplog):
    from hf_longclip.training.arguments import DataArguments
    from hf_longclip.training.data import training_records

    source = _sharegpt4v(tmp_path / "share.json", 8)
    with caplog.at_level(logging.INFO, logger="hf_longclip.training.data"):
        records = training_records(DataArguments(train_data=str(source), holdout=1), tmp_path)
    assert [r["id"] for r in records] == list(range(1, 8))
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(level == "INFO" and "1 of 8 records held out for evaluation (--holdout), 7 train" in m
               for level, m in messages), messages
    assert not any(level == "WARNING" for level, _ in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_longclip.training.data"):
        records = training_records(DataArguments(train_data=str(source), holdout=2), tmp_path)
    assert len(records) == 6
    assert any(r.levelname == "WARNING" and "25%" in r.getMessage() for r in caplog.records)


def test_mulclip_word_loss_is_not_zero_on_the_quickstart_geometry():
    from hf_longclip.data import MulCLIPCollator
    from hf_longclip.data.synthetic import synthetic_records
    from hf_longclip.models.losses_mulclip import word_reconstruction_loss

    proc = tiny_processor(words=sorted(set(SYNTHETIC_WORDS) | set(DEFAULT_WORDS)), image_size=48)
    model = tiny_variant("mulclip", processor=proc, clip_kwargs={"image_size": 48, "patch_size": 16})  # 3 x 3 patches
    assert model.config.visual_calibration_size == model.config.text_calibration_size == 2  # int(9 * 0.2) = 1 before
    batch = MulCLIPCollator(proc, seed=0)(synthetic_records(4, image_size=48))
    out = model.train()(**batch, return_loss=True)
    assert out.loss_word_image.item() > 0 and out.loss_word_text.item() > 0
    out.loss.backward()
    assert model.visual_calibration.fc2.weight.grad.abs().sum() > 0
    # one calibrated token: the loss is exactly zero, which is why such a configuration is warned about
    one = torch.randn(2, 1, 8)
    assert word_reconstruction_loss(one, torch.randn(2, 3, 8))[1].item() == 0.0


@pytest.mark.parametrize(
    "clip_kwargs, fields, names",
    [
        ({"image_size": 48, "patch_size": 16}, {"calibration_visual_tokens": 1}, "calibration_visual_tokens"),
        ({"image_size": 48, "patch_size": 16}, {"calibration_text_tokens": 1}, "calibration_text_tokens"),
        ({"image_size": 16, "patch_size": 16}, {}, "patch_size"),
    ],
    ids=["one-visual-token", "one-text-token", "one-patch"],
)
def test_mulclip_warns_where_the_word_loss_cannot_train(clip_kwargs, fields, names):
    with pytest.warns(UserWarning, match=f"MulCLIP word-level loss: .*{names}"):
        tiny_variant("mulclip", clip_kwargs=clip_kwargs, **fields)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_variant("mulclip", clip_kwargs=clip_kwargs, word_loss_weight=0.0, **fields)  # no word loss: no warning
