"""Long prompts in diffusers: tiny SD / SDXL pipelines built from configs, offline, CPU, 2 inference steps."""

import importlib.util
import random
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hf_longclip import stretch_position_embeddings
from hf_longclip.diffusion import (
    check_long_prompt_pipeline,
    encode_long_prompt,
    export_long_text_components,
    export_text_encoder,
    load_long_text_components,
    load_long_text_encoder,
    long_prompt_sd_pipeline,
    long_prompt_sdxl_pipeline,
    stretch_text_encoder,
    text_encoder_length,
    tiny_longclip,
    tiny_sd_base_pipeline,
    tiny_sdxl_base_pipeline,
)
from hf_longclip.testing_utils import DEFAULT_WORDS

ROOT = Path(__file__).resolve().parents[1]
GEN = dict(num_inference_steps=2, height=32, width=32, output_type="latent")


def words(n: int, seed: int) -> list[str]:
    """`n` words of the tiny vocabulary (one token each)."""
    rng = random.Random(seed)
    return [rng.choice(DEFAULT_WORDS) for _ in range(n)]


def text(ws: list[str]) -> str:
    return " ".join(ws)


def latents(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), **GEN).images


@pytest.fixture(scope="module")
def longclip():
    return tiny_longclip()


@pytest.fixture(scope="module")
def sd_base():
    return tiny_sd_base_pipeline()


@pytest.fixture(scope="module")
def sd_pipe(sd_base, longclip):
    return long_prompt_sd_pipeline(sd_base, longclip)


@pytest.fixture(scope="module")
def xl_base():
    return tiny_sdxl_base_pipeline()


@pytest.fixture(scope="module")
def xl_pipe(xl_base, longclip):
    return long_prompt_sdxl_pipeline(xl_base, longclip)


class CaptureIds:
    """Record the input ids every call of an encoder receives."""

    def __init__(self, *encoders):
        self.calls = {id(e): [] for e in encoders}
        self.handles = [e.register_forward_pre_hook(self._hook(e), with_kwargs=True) for e in encoders]

    def _hook(self, encoder):
        def hook(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            self.calls[id(encoder)].append(ids.clone())

        return hook

    def __getitem__(self, encoder):
        return self.calls[id(encoder)]

    def close(self):
        for h in self.handles:
            h.remove()


def test_tiny_words_are_single_tokens(sd_base):
    ids = sd_base.tokenizer(text(DEFAULT_WORDS), add_special_tokens=False).input_ids
    assert len(ids) == len(DEFAULT_WORDS)


# ------------------------------------------------------------------------------------------------ SD
def test_sd_pipeline_is_stock_with_248_encoder_and_tokenizer(sd_pipe, sd_base, longclip):
    assert type(sd_pipe) is StableDiffusionPipeline and type(sd_pipe.text_encoder) is CLIPTextModel
    assert sd_pipe.text_encoder.config.max_position_embeddings == 248 == text_encoder_length(sd_pipe.text_encoder)
    assert sd_pipe.tokenizer.model_max_length == 248
    assert sd_pipe.unet is sd_base.unet and sd_pipe.vae is sd_base.vae  # shared, not copied
    # the base pipeline is left as it was
    assert sd_base.tokenizer.model_max_length == 77 and text_encoder_length(sd_base.text_encoder) == 77
    reference = longclip.to_text_model().state_dict()
    for key, value in sd_pipe.text_encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert check_long_prompt_pipeline(sd_pipe) == 248


def test_150_token_prompt_reaches_encoder_at_248_and_tail_is_used(sd_pipe, sd_base):
    head = words(100, seed=0)
    prompt_a, prompt_b = text(head + words(50, seed=1)), text(head + words(50, seed=2))
    assert prompt_a != prompt_b

    capture = CaptureIds(sd_pipe.text_encoder)
    try:
        lat_a = latents(sd_pipe, prompt=prompt_a)
    finally:
        capture.close()
    ids = capture[sd_pipe.text_encoder][0]
    assert ids.shape == (1, 248)
    expected_body = sd_pipe.tokenizer(prompt_a, add_special_tokens=False).input_ids
    assert len(expected_body) == 150 and ids[0, 1:151].tolist() == expected_body
    assert ids[0, 151].item() == sd_pipe.tokenizer.eos_token_id and (ids[0, 152:] == 0).all()

    emb_a, _ = sd_pipe.encode_prompt(prompt_a, "cpu", 1, False)
    emb_b, _ = sd_pipe.encode_prompt(prompt_b, "cpu", 1, False)
    assert emb_a.shape == (1, 248, 32)
    first_change = 1 + next(i for i, (x, y) in enumerate(zip(prompt_a.split(), prompt_b.split())) if x != y)
    assert first_change > 77  # the prompts differ only past token 77
    # causal encoder: positions before the first changed token are identical, the tail differs
    assert torch.equal(emb_a[:, :first_change], emb_b[:, :first_change])
    assert not torch.allclose(emb_a[:, first_change:], emb_b[:, first_change:])
    assert torch.equal(lat_a, latents(sd_pipe, prompt=prompt_a))  # deterministic
    assert not torch.allclose(lat_a, latents(sd_pipe, prompt=prompt_b))
    # the stock 77-token pipeline cannot see the difference (what this module fixes)
    base_a, _ = sd_base.encode_prompt(prompt_a, "cpu", 1, False)
    base_b, _ = sd_base.encode_prompt(prompt_b, "cpu", 1, False)
    assert base_a.shape[1] == 77 and torch.equal(base_a, base_b)


def test_pad_choices_change_only_pad_positions(sd_base, longclip, sd_pipe):
    eos_pipe = long_prompt_sd_pipeline(sd_base, longclip, pad_with="eos")
    base_pad_pipe = long_prompt_sd_pipeline(sd_base, longclip, pad_with="base")
    prompt = text(words(30, seed=3))
    ids_zero = sd_pipe.tokenizer(prompt, padding="max_length", max_length=248, return_tensors="pt").input_ids
    ids_eos = eos_pipe.tokenizer(prompt, padding="max_length", max_length=248, return_tensors="pt").input_ids
    ids_base = base_pad_pipe.tokenizer(prompt, padding="max_length", max_length=248, return_tensors="pt").input_ids
    eos = sd_pipe.tokenizer.eos_token_id
    assert (ids_zero[0, 32:] == 0).all() and (ids_eos[0, 32:] == eos).all()
    assert torch.equal(ids_base, ids_eos)  # the tiny SD-1.x-style base tokenizer pads with EOT
    assert torch.equal(ids_zero[:, :32], ids_eos[:, :32])
    out_zero, out_eos = sd_pipe.text_encoder(ids_zero), eos_pipe.text_encoder(ids_eos)
    torch.testing.assert_close(out_zero.pooler_output, out_eos.pooler_output)  # pooled: pad-invariant
    torch.testing.assert_close(out_zero.last_hidden_state[:, :32], out_eos.last_hidden_state[:, :32])
    assert not torch.allclose(out_zero.last_hidden_state[:, 32:], out_eos.last_hidden_state[:, 32:])
    with pytest.raises(ValueError, match="pad_with"):
        long_prompt_sd_pipeline(sd_base, longclip, pad_with="zeros")


def test_sd_from_folders_and_hub_style_sources(tmp_path, sd_base, sd_pipe, longclip):
    base_dir, lc_dir, clip_dir, te_dir = (tmp_path / n for n in ("base", "longclip", "clip248", "te248"))
    sd_base.save_pretrained(base_dir)
    longclip.save_pretrained(lc_dir)
    longclip.to_clip_model().save_pretrained(clip_dir)  # a stock `clip` checkpoint with 248 positions
    longclip.to_text_model().save_pretrained(te_dir)  # a stock `clip_text_model`
    prompt = text(words(120, seed=4))
    reference, _ = sd_pipe.encode_prompt(prompt, "cpu", 1, False)
    for source in (lc_dir, clip_dir, str(te_dir)):
        pipe = long_prompt_sd_pipeline(str(base_dir), source, requires_safety_checker=False)
        assert pipe.tokenizer.model_max_length == 248
        torch.testing.assert_close(pipe.encode_prompt(prompt, "cpu", 1, False)[0], reference, rtol=0, atol=1e-6)
    # text_encoder=None: the base's own encoder stretched (no training), e.g. for SD 2.x; from an object, a copy
    from_object = long_prompt_sd_pipeline(sd_base, None)
    assert text_encoder_length(from_object.text_encoder) == 248 and text_encoder_length(sd_base.text_encoder) == 77
    stretched = long_prompt_sd_pipeline(str(base_dir), None, requires_safety_checker=False)
    assert text_encoder_length(stretched.text_encoder) == 248 == stretched.tokenizer.model_max_length
    short = text(words(15, seed=5))  # fits in the 20 copied positions: identical to the base
    torch.testing.assert_close(
        stretched.encode_prompt(short, "cpu", 1, False)[0][:, :17], sd_base.encode_prompt(short, "cpu", 1, False)[0][:, :17]
    )


def test_export_reloads_into_pipeline_with_identical_embeddings(tmp_path, sd_base, sd_pipe, longclip):
    base_dir, out = tmp_path / "base", tmp_path / "long"
    sd_base.save_pretrained(base_dir)
    written = export_text_encoder(longclip, out, sd_base.tokenizer)
    assert (written / "text_encoder" / "config.json").is_file() and (written / "tokenizer").is_dir()
    reloaded = StableDiffusionPipeline.from_pretrained(
        base_dir, **load_long_text_components(out), requires_safety_checker=False
    )
    assert reloaded.tokenizer.model_max_length == 248
    prompt = text(words(140, seed=6)) + " wow! a dog!"  # '!' is the pad token: tokenisation must survive reloading
    for embed_fn in (lambda p: p.encode_prompt(prompt, "cpu", 1, True, "a cat")[0], lambda p: p.encode_prompt(prompt, "cpu", 1, True, "a cat")[1]):
        assert torch.equal(embed_fn(reloaded), embed_fn(sd_pipe))
    # the whole long pipeline round-trips through the stock save_pretrained / from_pretrained
    sd_pipe.save_pretrained(tmp_path / "full")
    full = StableDiffusionPipeline.from_pretrained(tmp_path / "full")
    assert full.tokenizer.model_max_length == 248 and text_encoder_length(full.text_encoder) == 248
    assert torch.equal(full.encode_prompt(prompt, "cpu", 1, False)[0], sd_pipe.encode_prompt(prompt, "cpu", 1, False)[0])


# ------------------------------------------------------------------------------------------------ SDXL
def test_sdxl_runs_with_both_encoders_at_248(xl_pipe, xl_base):
    assert type(xl_pipe) is StableDiffusionXLPipeline
    assert type(xl_pipe.text_encoder) is CLIPTextModel and type(xl_pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert text_encoder_length(xl_pipe.text_encoder) == text_encoder_length(xl_pipe.text_encoder_2) == 248
    assert xl_pipe.tokenizer.model_max_length == xl_pipe.tokenizer_2.model_max_length == 248
    assert xl_pipe.text_encoder_2.config.max_position_embeddings == 248
    # the second encoder got Long-CLIP's stretch (same function) and nothing else; the base keeps its 77 rows
    base_table = xl_base.text_encoder_2.text_model.embeddings.position_embedding.weight
    assert base_table.shape[0] == 77
    new_state, base_state = xl_pipe.text_encoder_2.state_dict(), xl_base.text_encoder_2.state_dict()
    position_key = "text_model.embeddings.position_embedding.weight"
    assert torch.equal(new_state[position_key], stretch_position_embeddings(base_table, 20, 4, 248))
    assert all(torch.equal(v, base_state[k]) for k, v in new_state.items() if k != position_key)

    capture = CaptureIds(xl_pipe.text_encoder, xl_pipe.text_encoder_2)
    try:
        lat = latents(xl_pipe, prompt=text(words(150, seed=7)), negative_prompt="a cat")
    finally:
        capture.close()
    for encoder in (xl_pipe.text_encoder, xl_pipe.text_encoder_2):
        assert [tuple(ids.shape) for ids in capture[encoder]] == [(1, 248), (1, 248)]  # prompt, negative
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()


def test_sdxl_hidden_state_choice(xl_pipe):
    prompt = text(words(150, seed=8))
    plain = xl_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    default = encode_long_prompt(xl_pipe, prompt)  # as the pipeline: penultimate layer; empty negative -> zeros
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, value in zip(names, plain):
        torch.testing.assert_close(default[name], value, rtol=0, atol=1e-6)
    assert not default["negative_prompt_embeds"].any()

    last = encode_long_prompt(xl_pipe, prompt, "a cat", hidden_states="last")
    ids = xl_pipe.tokenizer(prompt, padding="max_length", max_length=248, return_tensors="pt").input_ids
    ids_2 = xl_pipe.tokenizer_2(prompt, padding="max_length", max_length=248, return_tensors="pt").input_ids
    out_1, out_2 = xl_pipe.text_encoder(ids), xl_pipe.text_encoder_2(ids_2)
    expected = torch.cat([out_1.last_hidden_state, out_2.last_hidden_state], dim=-1)  # after the final LayerNorm
    torch.testing.assert_close(last["prompt_embeds"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(last["pooled_prompt_embeds"], out_2.text_embeds, rtol=0, atol=1e-6)
    assert last["prompt_embeds"].shape == (1, 248, 64)
    assert not torch.allclose(last["prompt_embeds"], default["prompt_embeds"])
    assert torch.isfinite(latents(xl_pipe, **last)).all()
    with pytest.raises(ValueError, match="clip_skip"):
        encode_long_prompt(xl_pipe, prompt, hidden_states="last", clip_skip=1)


# ------------------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("lengths", [(150,), (246,), (246, 40)])
def test_chunked_equals_plain_up_to_248_tokens_sd(sd_pipe, lengths):
    prompts = [text(words(n, seed=10 + n)) for n in lengths]  # 246 prompt tokens + start + end = 248
    negatives = ["a cat"] * len(prompts)
    plain_pos, plain_neg = sd_pipe.encode_prompt(prompts, "cpu", 1, True, negatives)
    chunked = encode_long_prompt(sd_pipe, prompts, negatives)
    assert chunked["prompt_embeds"].shape == (len(prompts), 248, 32)
    torch.testing.assert_close(chunked["prompt_embeds"], plain_pos, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked["negative_prompt_embeds"], plain_neg, rtol=0, atol=1e-6)
    # clip_skip follows diffusers' SD rule (an earlier layer, then the final LayerNorm). diffusers 0.42's own SD
    # clip_skip path reads `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has, so the
    # expected value is computed here.
    ids = sd_pipe.tokenizer(prompts, padding="max_length", max_length=248, truncation=True, return_tensors="pt").input_ids
    hidden = sd_pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    skip_pos = sd_pipe.text_encoder.final_layer_norm(hidden)
    torch.testing.assert_close(encode_long_prompt(sd_pipe, prompts, clip_skip=1)["prompt_embeds"], skip_pos, rtol=0, atol=1e-6)


def test_chunked_equals_plain_sdxl(xl_pipe):
    prompt = text(words(246, seed=20))
    plain = xl_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt="a dog")
    chunked = encode_long_prompt(xl_pipe, prompt, "a dog")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, value in zip(names, plain):
        torch.testing.assert_close(chunked[name], value, rtol=0, atol=1e-6)


def test_prompts_past_248_tokens_are_encoded_in_windows(sd_pipe, xl_pipe):
    body = words(400, seed=30)
    prompt = text(body)
    chunked = encode_long_prompt(sd_pipe, prompt, "a cat")
    assert chunked["prompt_embeds"].shape == chunked["negative_prompt_embeds"].shape == (1, 496, 32)
    # window 1 = the plain (truncated) encoding; window 2 = the remaining 154 tokens encoded on their own
    first, _ = sd_pipe.encode_prompt(prompt, "cpu", 1, False)
    second, _ = sd_pipe.encode_prompt(text(body[246:]), "cpu", 1, False)
    torch.testing.assert_close(chunked["prompt_embeds"][:, :248], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked["prompt_embeds"][:, 248:], second, rtol=0, atol=1e-6)
    # the short negative prompt is padded with an empty window
    negative, empty = (sd_pipe.encode_prompt(p, "cpu", 1, False)[0] for p in ("a cat", ""))
    torch.testing.assert_close(chunked["negative_prompt_embeds"], torch.cat([negative, empty], 1), rtol=0, atol=1e-6)
    lat_long = latents(sd_pipe, **chunked)
    assert torch.isfinite(lat_long).all()
    assert not torch.allclose(lat_long, latents(sd_pipe, prompt=prompt, negative_prompt="a cat"))  # the tail matters

    # SDXL: both encoders get the same window count; the pooled vector is the first window's
    xl = encode_long_prompt(xl_pipe, prompt, hidden_states="last")
    assert xl["prompt_embeds"].shape == (1, 496, 64) and xl["negative_prompt_embeds"].shape == (1, 496, 64)
    plain_pooled = xl_pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(xl["pooled_prompt_embeds"], plain_pooled, rtol=0, atol=1e-6)
    assert torch.isfinite(latents(xl_pipe, **xl)).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_tokenizer_and_encoder_lengths_that_disagree_raise(sd_pipe, sd_base, longclip):
    # a 248 encoder behind the stock 77 tokenizer would silently cut prompts to 77
    mixed = StableDiffusionPipeline(**{**sd_pipe.components, "tokenizer": sd_base.tokenizer}, requires_safety_checker=False)
    for call in (lambda: check_long_prompt_pipeline(mixed), lambda: encode_long_prompt(mixed, "a dog")):
        with pytest.raises(ValueError, match=r"model_max_length is 77 but text_encoder has 248 positions"):
            call()
    tokenizer_100 = long_prompt_sd_pipeline(sd_base, longclip).tokenizer
    tokenizer_100.model_max_length = 100
    with pytest.raises(ValueError, match=r"model_max_length 100 but the text encoder has 248"):
        long_prompt_sd_pipeline(sd_base, longclip, tokenizer=tokenizer_100)
    with pytest.raises(ValueError, match=r"has 77 positions.*not a long encoder"):
        long_prompt_sd_pipeline(sd_base, sd_base.text_encoder)


def test_sdxl_with_one_encoder_stretched_raises(xl_pipe, xl_base, longclip):
    one_long = StableDiffusionXLPipeline(
        **{**xl_pipe.components, "text_encoder_2": xl_base.text_encoder_2, "tokenizer_2": xl_base.tokenizer_2}
    )
    with pytest.raises(ValueError, match=r"text_encoder has 248 positions but text_encoder_2 has 77"):
        check_long_prompt_pipeline(one_long)
    with pytest.raises(ValueError, match=r"text_encoder has 248 positions but the text_encoder_2 given has 77"):
        long_prompt_sdxl_pipeline(xl_base, longclip, text_encoder_2=xl_base.text_encoder_2)


def test_width_mismatch_names_both_widths(sd_base, xl_base):
    wide = tiny_longclip(hidden_size=48)
    with pytest.raises(ValueError, match=r"width 48 but the base pipeline's text_encoder has width 32"):
        long_prompt_sd_pipeline(sd_base, wide)
    with pytest.raises(ValueError, match=r"width 48 but the base pipeline's text_encoder has width 32"):
        long_prompt_sdxl_pipeline(xl_base, wide)


def test_stretch_text_encoder_and_loader_rules(xl_base, longclip):
    import copy

    source = xl_base.text_encoder_2
    stretched = stretch_text_encoder(copy.deepcopy(source))
    assert stretched.config.max_position_embeddings == 248
    assert stretched.text_model.embeddings.position_ids.shape == (1, 248)
    ids = xl_base.tokenizer_2(text(words(15, seed=40)), return_tensors="pt").input_ids  # within the 20 kept rows
    torch.testing.assert_close(stretched(ids).text_embeds, source(ids).text_embeds, rtol=0, atol=1e-6)
    assert stretch_text_encoder(stretched, target_length=248) is stretched  # already long: unchanged
    with pytest.raises(ValueError, match="248"):
        stretch_text_encoder(copy.deepcopy(source), target_length=250)
    # CLIPModel and LongCLIPModel sources give the same encoder; a plain text model has no projection
    from_clip = load_long_text_encoder(longclip.to_clip_model(), with_projection=True)
    torch.testing.assert_close(from_clip(ids).text_embeds, longclip.to_text_model(with_projection=True)(ids).text_embeds)
    with pytest.raises(TypeError, match="CLIPTextModelWithProjection"):
        load_long_text_encoder(longclip.to_text_model(), with_projection=True)


def test_sdxl_export_components_round_trip(tmp_path, xl_pipe, xl_base, longclip):
    xl_base.save_pretrained(tmp_path / "base")
    export_long_text_components(xl_pipe, tmp_path / "long")
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base", **load_long_text_components(tmp_path / "long"))
    check_long_prompt_pipeline(reloaded)
    prompt = text(words(200, seed=50))
    a, b = encode_long_prompt(reloaded, prompt, hidden_states="last"), encode_long_prompt(xl_pipe, prompt, hidden_states="last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # building from folders (the Hub-id code path) gives the same pipeline as building from objects
    longclip.save_pretrained(tmp_path / "longclip")
    from_folders = long_prompt_sdxl_pipeline(str(tmp_path / "base"), str(tmp_path / "longclip"))
    c = encode_long_prompt(from_folders, prompt, hidden_states="last")
    assert all(torch.equal(c[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------------------ examples
def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_loaded_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_example(name: str):
    return _load_module(ROOT / "examples" / f"{name}.py")


@pytest.mark.parametrize("name", ["long_prompt_sd", "long_prompt_sdxl"])
def test_examples_run_tiny(tmp_path, name, capsys):
    example = _load_example(name)
    output = tmp_path / f"{name}.png"
    image = example.main(["--tiny", "--steps", "2", "--output", str(output)])
    assert output.is_file() and Image.open(output).size == (32, 32) == image.size
    printed = capsys.readouterr().out
    assert re.search(r"reads? 248 tokens", printed) and "windows of 248 tokens" in printed  # the tiny vocabulary makes it > 248
    short = example.main(["--tiny", "--steps", "2", "--output", str(output), "--prompt", text(words(150, seed=60))])
    assert short.size == (32, 32) and "windows" not in capsys.readouterr().out


def test_original_pt_checkpoint_as_text_encoder(tmp_path):
    """The authors' .pt file (OpenAI layout, two position tables) is converted on the fly."""
    conversion_tests = _load_module(ROOT / "tests" / "test_conversion.py")
    longclip = tiny_longclip(hidden_size=128)  # the converter infers heads as width // 64
    path = tmp_path / "longclip-tiny.pt"
    torch.save(conversion_tests._to_openai_layout(longclip, keep=20), path)
    encoder = load_long_text_encoder(str(path))
    assert type(encoder) is CLIPTextModel and text_encoder_length(encoder) == 248
    reference = longclip.to_text_model().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in encoder.state_dict().items())


def test_other_pipeline_classes_keep_their_class(sd_base, xl_base, longclip):
    """img2img / refiner pipelines work the same way (components and config carried over, class kept)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    img2img = long_prompt_sd_pipeline(StableDiffusionImg2ImgPipeline(**sd_base.components), longclip)
    assert type(img2img) is StableDiffusionImg2ImgPipeline and img2img.tokenizer.model_max_length == 248
    torch.manual_seed(0)
    refiner_unet = UNet2DConditionModel(  # the refiner conditions on text_encoder_2 only
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=5 * 8 + 16, cross_attention_dim=32,
        norm_num_groups=8,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=xl_base.vae, text_encoder=None, text_encoder_2=xl_base.text_encoder_2, tokenizer=None,
        tokenizer_2=xl_base.tokenizer_2, unet=refiner_unet, scheduler=xl_base.scheduler, requires_aesthetics_score=True,
    )
    long_refiner = long_prompt_sdxl_pipeline(refiner, None)
    assert type(long_refiner) is StableDiffusionXLImg2ImgPipeline and long_refiner.config.requires_aesthetics_score
    assert long_refiner.text_encoder is None and text_encoder_length(long_refiner.text_encoder_2) == 248
    embeds = encode_long_prompt(long_refiner, text(words(300, seed=70)), hidden_states="last")
    assert embeds["prompt_embeds"].shape == (1, 496, 32)
    out = long_refiner(**embeds, image=torch.rand(1, 3, 32, 32), strength=1.0, **GEN).images
    assert torch.isfinite(out).all()
