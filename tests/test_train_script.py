"""The training entry point end to end (through training_scripts/train.py, the thin wrapper over
hf_longclip.train): quickstart per variant, 2 processes == 1, resume, bad data, trackers."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hf_longclip import VARIANTS
from hf_longclip.testing_utils import spawn_distributed

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "training_scripts" / "configs" / "quickstart.yaml"


def _train_module():
    spec = importlib.util.spec_from_file_location("hf_longclip_train_script", ROOT / "training_scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(*flags) -> dict:
    return _train_module().main([str(f) for f in flags])


#: A small, fast model and data set (the tests' version of the quickstart recipe).
TINY = [
    "--base", "tiny-random", "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "4",
    "--tiny_projection_dim", "32", "--tiny_image_size", "48", "--tiny_patch_size", "16",
    "--synthetic_image_size", "48", "--num_workers", "0", "--disable_progress_bar", "true",
    "--learning_rate", "1e-3", "--warmup_steps", "2", "--weight_decay_filter", "matrices",
]


# ----------------------------------------------------------------------------------------------- quickstart
#: Recipe settings the short runs below add to the quickstart recipe, per variant (others run it unchanged).
QUICK_OPTIONS = {
    "finelip": ["--model_config", '{"global_loss_weight": 1.0, "hinge_warmup": false}', "--head_learning_rate", "1e-3"],
    # num_groups comes from the registry's tiny_config, which --base tiny-random applies (2 divides the 2 layers)
    "fixclip": ["--model_config", '{"group_align_start": 1}'],
    "betaclip": ["--model_config", '{"beta_cal_loss_weight": 0.5}', "--head_learning_rate", "1e-3",
                 "--collator_config", '{"max_phrases": 8}'],
}


def _quick_options(variant: str) -> list:
    return QUICK_OPTIONS.get(variant, [])


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quickstart_recipe_trains_every_variant(variant, tmp_path):
    """The quickstart recipe, shortened (200 steps): the loss falls and held-out long-caption R@1 rises far above
    chance (measured: 1% before; after, t2i / i2t R@1 Long-CLIP 26/26, FineLIP 33/47, Fix-CLIP 20/22, MulCLIP 23/29,
    beta-CLIP 10/9, among 100 scenes). Slow (7 min for all five on 2 cores): ``pytest -m slow``."""
    data = tmp_path.parent / "synthetic-shared"  # generated once, reused by every variant
    summary = train(
        "--config", QUICKSTART, "--variant", variant, "--output_dir", tmp_path / "run", "--image_root", data,
        "--synthetic_num_train", 2000, "--synthetic_num_eval", 100, "--max_steps", 200, "--warmup_steps", 15,
        "--logging_steps", 10, "--save_steps", 0, "--disable_progress_bar", "true", "--text_cache_dir", data,
        *_quick_options(variant),
    )
    before, after = summary["evaluations"]["before"], summary["evaluations"]["after"]
    chance = 100.0 / after["num_images"]  # R@1 of a random ranking, in percent
    assert after["num_images"] == 100 and summary["finished"]
    assert after["t2i_R@1"] >= 5 * chance and after["i2t_R@1"] >= 5 * chance, (before, after)
    assert before["t2i_R@1"] <= 2 * chance and before["i2t_R@1"] <= 2 * chance
    assert after["t2i_R@5"] > before["t2i_R@5"]
    log = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert log["last_loss_terms"]["loss"] < _first_loss(tmp_path / "run", variant)
    # the saved model loads with AutoModel and is the trained one
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "run")
    assert model.config.model_type == variant and (tmp_path / "run" / "README.md").is_file()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quickstart_smoke_every_variant(variant, tmp_path):
    """The quickstart recipe on a few steps of tiny data (the default suite's version of the test above): the run
    finishes, logs every loss term of the model's output, evaluates before and after, and saves a model that loads
    with AutoModel next to its card."""
    data = tmp_path.parent / "synthetic-smoke"
    summary = train(
        "--config", QUICKSTART, *TINY, "--variant", variant, "--output_dir", tmp_path / "run", "--image_root", data,
        "--synthetic_num_train", 48, "--synthetic_num_eval", 16, "--max_steps", 4, "--warmup_steps", 1,
        "--per_device_train_batch_size", 8, "--logging_steps", 2, "--save_steps", 0, "--text_cache_dir", data,
        *_quick_options(variant),
    )
    assert summary["finished"] and summary["global_step"] == 4
    assert {"before", "after"} <= set(summary["evaluations"])
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "run")
    assert model.config.model_type == variant and (tmp_path / "run" / "README.md").is_file()
    # every term the model reports is logged, Fix-CLIP's per-group terms included
    logged = set(summary["last_loss_terms"])
    assert "loss" in logged and len(logged) >= 2
    if variant == "fixclip":
        assert {"loss_group_1", "loss_group_2", "loss_hierarchical"} <= logged


def _first_loss(run_dir: Path, variant: str) -> float:
    """The loss at step 0 of the same run, recomputed from the recipe (the summary keeps the last one)."""
    first = json.loads((run_dir / "train_summary.json").read_text()).get("first_loss_terms")
    return first["loss"]


# ----------------------------------------------------------------------------------------------- distributed
def _distributed_flags(out_dir, variant, per_device, accum):
    flags = [
        "--config", QUICKSTART, *TINY, "--variant", variant, "--output_dir", out_dir,
        "--image_root", Path(out_dir).parent / "data", "--synthetic_num_train", 64, "--synthetic_num_eval", 0,
        "--per_device_train_batch_size", per_device, "--gradient_accumulation_steps", accum, "--max_steps", 3,
        "--save_steps", 0, "--eval_before_training", "false", "--logging_steps", 1,
    ]
    if variant == "longclip":
        flags += ["--model_config", '{"pca_components": 4, "pca_scope": "global"}']
    else:  # plain DDP without find_unused_parameters: FineLIP leaves its unused logit_scale out of training
        flags += ["--model_config", '{"hinge_warmup": false}', "--head_learning_rate", "1e-3"]
    return flags


def _distributed_worker(out_dir, variant, per_device, accum):
    train(*_distributed_flags(out_dir, variant, per_device, accum))


@pytest.mark.parametrize(
    "variant, per_device, accum",
    [("longclip", 2, 2), ("finelip", 4, 1)],
    ids=["longclip-cached-accumulation", "finelip-plain-ddp"],
)
def test_two_processes_give_the_same_loss_and_weights_as_one(tmp_path, variant, per_device, accum):
    """2 processes x `per_device` samples x `accum` cached micro-batches == 1 process x 8 samples: same losses,
    same weights (Long-CLIP through the cached accumulation, FineLIP through plain DDP)."""
    one = tmp_path / "one"
    single = train(*_distributed_flags(one, variant, per_device=8, accum=1))
    two = tmp_path / "two"
    spawn_distributed(_distributed_worker, args=(str(two), variant, per_device, accum))
    multi = json.loads((two / "train_summary.json").read_text())
    assert multi["global_step"] == single["global_step"] == 3
    for key, value in single["last_loss_terms"].items():
        assert multi["last_loss_terms"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    # Parameters whose true gradient is exactly 0 -- attention key biases (a softmax ignores a constant shift) and
    # FineLIP's aggregation output bias (the softmax over tokens cancels it) -- get float noise as gradient, which
    # Adam turns into full-size steps of random sign: no two runs share them. Everything else must match.
    zero_gradient = ("k_proj.bias", "aggregation.fc2.bias")
    bad = {
        k: (b[k] - a[k]).abs().max().item()
        for k in a
        if not k.endswith(zero_gradient) and not torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-6)
    }
    assert not bad, bad
    assert len(a) - sum(k.endswith(zero_gradient) for k in a) > 30



# ----------------------------------------------------------------------------------------------- resume
def _resume_flags(out_dir, data_dir, *extra):
    return [
        "--config", QUICKSTART, *TINY, "--variant", "fixclip", "--output_dir", out_dir, "--image_root", data_dir,
        "--model_config", '{"num_groups": 2, "group_align_start": 1}', "--transform", "random_resized_crop",
        "--num_workers", 2, "--synthetic_num_train", 96, "--synthetic_num_eval", 0, "--per_device_train_batch_size",
        8, "--gradient_accumulation_steps", 2, "--num_train_epochs", 2, "--save_steps", 2, "--save_total_limit", 2,
        *extra,
    ]


def test_killed_and_resumed_run_ends_bit_identical(tmp_path):
    """Random crops (2 workers), random patch masks and cached accumulation: stopping after step 5 and resuming
    from the latest checkpoint ends with exactly the weights of an uninterrupted run."""
    data = tmp_path / "data"
    whole = train(*_resume_flags(tmp_path / "whole", data))
    assert whole["total_steps"] == 12 and whole["finished"]
    part = train(*_resume_flags(tmp_path / "parts", data, "--stop_after_steps", 5))
    assert part["global_step"] == 5 and not part["finished"]
    assert not (tmp_path / "parts" / "model.safetensors").exists()
    # a save that died half-way leaves only a temporary folder, which resuming ignores
    (tmp_path / "parts" / "checkpoints" / ".tmp-step-00000006").mkdir()
    kept = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").glob("step-*"))
    assert kept == ["step-00000004", "step-00000005"]  # save_total_limit 2
    rest = train(*_resume_flags(tmp_path / "parts", data, "--resume_from_checkpoint", "latest"))
    assert rest["finished"] and rest["global_step"] == 12
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ----------------------------------------------------------------------------------------------- bad data
def _png16(path: Path, value: int) -> None:
    """A 16-bit grayscale PNG written by hand (PIL writes I;16 too, but be explicit about the bit depth)."""
    width = height = 40
    raw = b"".join(b"\x00" + struct.pack(">H", value) * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _bad_data_set(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rgb(name, size=(40, 40)):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / name)
        return name

    rows = [{"image": rgb(f"good{i}.png"), "caption": f"a red circle number {i}. it is large."} for i in range(12)]
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "CMYK").save(folder / "cmyk.jpg")
    _png16(folder / "deep.png", 40000)
    (folder / "corrupt.jpg").write_bytes(b"not an image at all" * 10)
    (folder / "empty.png").write_bytes(b"")
    full = folder / "good0.png"
    (folder / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 3])
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    rows += [
        {"image": "gray.png", "caption": "a gray picture"},
        {"image": "rgba.png", "caption": "a transparent picture"},
        {"image": "cmyk.jpg", "caption": "a cmyk picture"},
        {"image": "deep.png", "caption": "a sixteen bit picture"},
        {"image": "corrupt.jpg", "caption": "broken"},
        {"image": "empty.png", "caption": "empty file"},
        {"image": "truncated.png", "caption": "cut short"},
        {"image": "missing.png", "caption": "not there"},
        {"image": "huge.png", "caption": "too many pixels"},
        {"image": "good1.png", "caption": ""},
        {"image": "good2.png", "caption": 17},
    ]
    table = folder / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return table


def test_bad_samples_are_skipped_counted_and_reported(tmp_path):
    table = _bad_data_set(tmp_path / "data")
    flags = [*TINY, "--train_data", table, "--output_dir", tmp_path / "run", "--max_image_pixels", 200 * 200,
             "--per_device_train_batch_size", 23, "--max_steps", 2, "--save_steps", 0, "--report_to", "tensorboard"]
    summary = train(*flags)
    assert summary["finished"] and summary["global_step"] == 2
    # two passes over the 23 records: every bad one counted each time it was drawn; grayscale, RGBA, CMYK and
    # 16-bit images are converted, not skipped
    per_epoch = {"corrupt": 2, "empty": 1, "missing": 1, "too_large": 1, "empty_caption": 1, "non_string_caption": 1}
    # two epochs: every bad sample counted once, its reads twice
    assert summary["skipped_samples"] == per_epoch
    assert summary["skipped_visits"] == {k: 2 * v for k, v in per_epoch.items()}
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "the tensorboard tracker wrote nothing"
    # --strict stops at start-up, naming the problem, before any training: a ValueError from Python, one line from
    # the command line
    from hf_longclip.training import main as train_from_python

    strict = [*flags, "--strict", "true", "--output_dir", tmp_path / "strict"]
    with pytest.raises(ValueError, match=r"bad sample at index 17 .*empty\.png.*: empty"):
        train_from_python([str(f) for f in strict])
    with pytest.raises(SystemExit, match=r"^error: bad sample at index 17 .*empty\.png.*: empty"):
        train(*strict)
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_strict_stops_at_an_undecodable_image_with_the_same_line_with_and_without_workers(tmp_path):
    """A corrupt file passes the start-up check (it exists and is not empty) and is found only when decoded, inside
    a data worker with --num_workers 2: the command still ends in the one line it prints with --num_workers 0, not
    torch's multi-line re-raise."""
    table = _bad_data_set(tmp_path / "data")
    rows = [json.loads(line) for line in Path(table).read_text().splitlines()]
    keep = [row for row in rows if row["image"].startswith("good") and row["caption"]][:6]
    keep.insert(3, next(row for row in rows if row["image"] == "corrupt.jpg"))
    only_corrupt = tmp_path / "data" / "corrupt_only.jsonl"
    only_corrupt.write_text("".join(json.dumps(row) + "\n" for row in keep))
    messages = []
    for workers in (0, 2):
        flags = [*TINY, "--train_data", only_corrupt, "--output_dir", tmp_path / f"w{workers}", "--strict", "true",
                 "--per_device_train_batch_size", 7, "--max_steps", 1, "--save_steps", 0, "--num_workers", workers]
        with pytest.raises(SystemExit) as stop:
            train(*flags)
        messages.append(str(stop.value))
    assert messages[0] == messages[1]
    assert re.fullmatch(r"error: bad sample at index 3 \(image .*corrupt\.jpg\): corrupt[^\n]*", messages[0])


def test_invalid_recipe_value_stops_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="learning_rate must be >= 0"):
        train(*TINY, "--learning_rate", "-0.1", "--output_dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_log_lines_are_printed_above_the_progress_bar_not_inside_it(tmp_path):
    """accelerate's checkpoint messages and our own log lines each start a line of their own while the tqdm bar is
    shown (without the redirect they were glued to the bar's last frame)."""
    import os
    import re
    import subprocess
    import sys

    flags = [*TINY, "--disable_progress_bar", "false", "--synthetic_num_train", "128", "--synthetic_num_eval", "16",
             "--per_device_train_batch_size", "16", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
             "--output_dir", tmp_path / "run"]
    done = subprocess.run([sys.executable, "-m", "hf_longclip.train", *map(str, flags)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    segments = re.split(r"[\r\n]", done.stderr)  # what a terminal shows as separate (re)drawn lines
    logged = [s for s in segments if "Saving current state" in s or "hf_longclip.train: checkpoint" in s]
    assert len(logged) >= 4, done.stderr[-3000:]  # step 2 (in the loop, under the bar) and the final one
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", s) for s in logged), logged
    assert any(s.startswith("train longclip:") and "4/4" in s for s in segments)  # the bar itself was shown
