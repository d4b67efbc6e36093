"""`hf-longclip generate`: one command for long-prompt images with SD, SDXL, SD3 and Flux pipelines (tiny, offline)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from hf_longclip.cli import main as cli
from hf_longclip.generate import GenerateSettings, PromptSpec, read_prompt_file

LONG_PROMPT = (
    "A quiet harbour at dawn with three red fishing boats moored beside a stone pier, gulls circling above the masts, "
    "a lighthouse with white and blue stripes on the far headland, nets drying on wooden racks, a woman in a yellow "
    "coat carrying a basket of silver fish, mist lifting from the green hills behind the town, and a small black dog "
    "asleep on a coil of rope next to a stack of orange buoys while the first sunlight touches the roofs of the "
    "houses along the waterfront and a bell rings somewhere in the old church tower"
)


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("\ufeff# a comment\n\na red cube\n  a blue sphere  \n")
    assert [s.prompt for s in read_prompt_file(text)] == ["a red cube", "a blue sphere"]
    rows = tmp_path / "prompts.jsonl"
    rows.write_text('{"prompt": "a cat", "seed": 7}\n\n{"prompt": "a dog", "negative_prompt": "blurry"}\n')
    assert read_prompt_file(rows) == [PromptSpec("a cat", None, 7), PromptSpec("a dog", "blurry", None)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: .*'prompt'"):
        read_prompt_file(bad)
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompt_file(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="steps"):
        GenerateSettings(steps=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerateSettings(height=30)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_generate_with_every_tiny_pipeline(kind, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{LONG_PROMPT}\na small green frog\n")
    out = tmp_path / "out"
    args = ["generate", "--tiny", kind, "--prompt-file", str(prompts), "--out", str(out), "--steps", "2",
            "--seed", "3", "--no-progress"]
    assert cli(args) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["pipeline_kind"] == kind and record["text_encoder_positions"] == 248
    assert [image["seed"] for image in record["images"]] == [3, 4]
    first, second = record["images"]
    assert first["prompt"] == LONG_PROMPT and first["prompt_tokens"] > 77
    if kind == "flux":  # one pooled CLIP vector of the first 248 tokens
        assert first["clip_windows"] == 1
    else:
        assert first["clip_windows"] == (2 if first["prompt_tokens"] > 248 else 1)
    for image in record["images"]:
        with Image.open(out / image["file"]) as png:
            assert png.size == (32, 32)
    # the same seed gives the same image again; the record is rewritten, not appended
    again = tmp_path / "again"
    assert cli([*args[:6], str(again), *args[7:]]) == 0
    assert (again / "00000.png").read_bytes() == (out / "00000.png").read_bytes()
    assert "wrote 2 images" in capsys.readouterr().out


def test_a_prompt_past_248_tokens_is_windowed_for_per_token_pipelines(tmp_path):
    out = tmp_path / "out"
    prompt = " ".join([LONG_PROMPT] * 3)
    assert cli(["generate", "--tiny", "sd", "--prompt", prompt, "--out", str(out), "--steps", "1",
                "--no-progress"]) == 0
    image = json.loads((out / "generate.json").read_text())["images"][0]
    assert image["prompt_tokens"] > 248 and image["clip_windows"] >= 2


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    cases = [
        (["--tiny", "sd", "--prompt-file", str(prompts), "--out", str(a_file)], "is a file"),
        (["--tiny", "sd", "--prompt-file", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")], "not found"),
        (["--prompt-file", str(prompts), "--out", str(tmp_path / "o")], "exactly one of --pipeline"),
        (["--tiny", "sd", "--out", str(tmp_path / "o")], "no prompt"),
        (["--tiny", "sd", "--prompt", "x", "--out", str(tmp_path / "o"), "--steps", "0"], "steps"),
        (["--pipeline", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o"), "--device",
          "cuda:7"], "cuda"),
    ]
    for flags, message in cases:
        assert cli(["generate", *flags]) == 1, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, (flags, err)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_from_a_saved_pipeline_folder(kind, tmp_path):
    """The --pipeline path: a diffusers folder (here a tiny one saved offline) is loaded with the class its
    model_index.json names, recognised by its components, and made long."""
    from hf_longclip import diffusion

    folder = tmp_path / "base"
    getattr(diffusion, f"tiny_{kind}_base_pipeline")().save_pretrained(folder)
    out = tmp_path / "out"
    flags = ["generate", "--pipeline", str(folder), "--prompt", LONG_PROMPT, "--out", str(out), "--steps", "1",
             "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]
    assert cli(flags) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["pipeline_kind"] == kind and record["text_encoder_positions"] == 248
    if kind == "flux":  # Flux has one CLIP encoder: a second one is refused, in one line
        assert cli([*flags, "--text-encoder-2", str(folder)]) == 1
