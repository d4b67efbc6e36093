"""Long prompts in SD3 / SD3.5 and Flux: tiny pipelines built from configs, offline, CPU, 2 inference steps."""

import copy
import random

import pytest
import torch
from diffusers import (
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hf_longclip import stretch_position_embeddings
from hf_longclip.diffusion import (
    check_long_prompt_pipeline,
    encode_long_prompt,
    long_prompt_flux_pipeline,
    long_prompt_pipeline,
    long_prompt_sd3_pipeline,
    long_prompt_sd_pipeline,
    pipeline_kind,
    text_encoder_length,
    tiny_flux_base_pipeline,
    tiny_longclip,
    tiny_sd3_base_pipeline,
    tiny_sd_base_pipeline,
    tiny_sdxl_base_pipeline,
)
from hf_longclip.testing_utils import DEFAULT_WORDS

GEN = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
SD3_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def words(n: int, seed: int) -> list[str]:
    """`n` words of the tiny vocabulary (one CLIP token each)."""
    rng = random.Random(seed)
    return [rng.choice(DEFAULT_WORDS) for _ in range(n)]


def text(ws: list[str]) -> str:
    return " ".join(ws)


def prompts_differing_at_100_to_140() -> tuple[str, str]:
    """Two 150-token prompts that differ only in tokens 100-139 (0-based, prompt tokens only)."""
    head, tail = words(100, seed=0), words(10, seed=3)
    mid_a, mid_b = words(40, seed=1), words(40, seed=2)
    assert mid_a != mid_b
    return text(head + mid_a + tail), text(head + mid_b + tail)


def latents(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), **GEN).images


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


@pytest.fixture(scope="module")
def longclip():
    return tiny_longclip()


@pytest.fixture(scope="module")
def sd3_base():
    return tiny_sd3_base_pipeline()


@pytest.fixture(scope="module")
def sd3_pipe(sd3_base, longclip):
    return long_prompt_sd3_pipeline(sd3_base, longclip)


@pytest.fixture(scope="module")
def flux_base():
    return tiny_flux_base_pipeline()


@pytest.fixture(scope="module")
def flux_pipe(flux_base, longclip):
    return long_prompt_flux_pipeline(flux_base, longclip)


@pytest.fixture(autouse=True)
def _no_grad():
    """The pipelines' __call__ runs without autograd; encode_prompt compared with it must too (CPU attention picks
    another kernel with autograd on, which changes the last digits)."""
    with torch.no_grad():
        yield


# ------------------------------------------------------------------------------------------------ SD3
def test_sd3_pipeline_is_stock_with_both_clip_encoders_at_248(sd3_pipe, sd3_base, longclip):
    assert type(sd3_pipe) is StableDiffusion3Pipeline
    for encoder in (sd3_pipe.text_encoder, sd3_pipe.text_encoder_2):
        assert type(encoder) is CLIPTextModelWithProjection and text_encoder_length(encoder) == 248
    assert sd3_pipe.tokenizer.model_max_length == sd3_pipe.tokenizer_2.model_max_length == 248
    assert sd3_pipe.tokenizer_max_length == 248  # what SD3 actually pads / truncates both CLIP prompts to
    # T5, transformer and VAE are shared, untouched; the base keeps its 77-token encoders
    assert sd3_pipe.text_encoder_3 is sd3_base.text_encoder_3 and sd3_pipe.tokenizer_3 is sd3_base.tokenizer_3
    assert sd3_pipe.transformer is sd3_base.transformer and sd3_pipe.vae is sd3_base.vae
    assert sd3_base.tokenizer_max_length == 77 and text_encoder_length(sd3_base.text_encoder_2) == 77
    reference = longclip.to_text_model(with_projection=True).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in sd3_pipe.text_encoder.state_dict().items())
    # bigG: Long-CLIP's stretch of the base's table, nothing else changed
    key = "text_model.embeddings.position_embedding.weight"
    new, old = sd3_pipe.text_encoder_2.state_dict(), sd3_base.text_encoder_2.state_dict()
    assert torch.equal(new[key], stretch_position_embeddings(old[key], 20, 4, 248))
    assert all(torch.equal(v, old[k]) for k, v in new.items() if k != key)
    assert check_long_prompt_pipeline(sd3_pipe) == 248 and pipeline_kind(sd3_pipe) == "sd3"


def test_sd3_150_token_prompt_reaches_both_clip_encoders_and_tail_is_used(sd3_pipe, sd3_base):
    prompt_a, prompt_b = prompts_differing_at_100_to_140()
    t5_prompt = "a dog"  # T5 gets the same prompt for a and b: any difference comes from CLIP
    capture = CaptureIds(sd3_pipe.text_encoder, sd3_pipe.text_encoder_2)
    try:
        lat_a = latents(sd3_pipe, prompt=prompt_a, prompt_3=t5_prompt)
    finally:
        capture.close()
    body = sd3_pipe.tokenizer(prompt_a, add_special_tokens=False).input_ids
    assert len(body) == 150
    for encoder in (sd3_pipe.text_encoder, sd3_pipe.text_encoder_2):
        shapes = [tuple(ids.shape) for ids in capture[encoder]]
        assert shapes == [(1, 248), (1, 248)]  # prompt and (empty) negative prompt, both > 77 positions
        assert capture[encoder][0][0, 1:151].tolist() == body

    emb_a = sd3_pipe.encode_prompt(prompt_a, None, t5_prompt, device="cpu", do_classifier_free_guidance=False)
    emb_b = sd3_pipe.encode_prompt(prompt_b, None, t5_prompt, device="cpu", do_classifier_free_guidance=False)
    assert emb_a[0].shape == (1, 248 + 256, 96)  # 248 CLIP tokens (32 + 48 wide, zero-padded to 96), then T5
    # causal encoders: identical up to token 100 (position 101 with the start token), different after
    assert torch.equal(emb_a[0][:, :101], emb_b[0][:, :101])
    assert not torch.allclose(emb_a[0][:, 101:141], emb_b[0][:, 101:141])
    assert torch.equal(emb_a[0][:, 248:], emb_b[0][:, 248:])  # the T5 part
    assert not torch.allclose(emb_a[2], emb_b[2])  # pooled: end token at position 151
    assert torch.equal(lat_a, latents(sd3_pipe, prompt=prompt_a, prompt_3=t5_prompt))  # deterministic
    assert not torch.allclose(lat_a, latents(sd3_pipe, prompt=prompt_b, prompt_3=t5_prompt))
    # the stock pipeline cuts both at 77 tokens and cannot see the difference
    assert torch.equal(
        latents(sd3_base, prompt=prompt_a, prompt_3=t5_prompt), latents(sd3_base, prompt=prompt_b, prompt_3=t5_prompt)
    )


def test_sd3_short_prompts_with_stretched_encoders_equal_stock(sd3_base):
    stretched = long_prompt_sd3_pipeline(sd3_base)  # clip_l=None, clip_g=None: both of the base's stretched
    assert text_encoder_length(stretched.text_encoder) == text_encoder_length(stretched.text_encoder_2) == 248
    prompt, negative = text(words(15, seed=5)), "a cat"  # within the 20 positions the stretch copies exactly
    long = stretched.encode_prompt(prompt, None, None, device="cpu", negative_prompt=negative)
    stock = sd3_base.encode_prompt(prompt, None, None, device="cpu", negative_prompt=negative)
    for name, a, b in zip(SD3_NAMES, long, stock):
        if a.dim() == 3:  # CLIP tokens up to the end token (the pad token differs after it), then the T5 part
            end = 17 if name == "prompt_embeds" else 4
            torch.testing.assert_close(a[:, :end], b[:, :end], rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(a[:, 248:], b[:, 77:], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_sd3_encode_long_prompt_equals_plain_and_windows_past_248(sd3_pipe):
    prompt = text(words(246, seed=20))  # 246 prompt tokens + start + end = 248: one window
    plain = sd3_pipe.encode_prompt(prompt, None, None, device="cpu", negative_prompt="a dog")
    chunked = encode_long_prompt(sd3_pipe, prompt, "a dog")
    for name, value in zip(SD3_NAMES, plain):
        torch.testing.assert_close(chunked[name], value, rtol=0, atol=1e-6, msg=name)

    body = words(400, seed=21)
    long = encode_long_prompt(sd3_pipe, text(body), "a dog", max_sequence_length=64)
    assert long["prompt_embeds"].shape == long["negative_prompt_embeds"].shape == (1, 2 * 248 + 64, 96)
    first = sd3_pipe.encode_prompt(text(body), None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=64)
    second = sd3_pipe.encode_prompt(text(body[246:]), None, None, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(long["prompt_embeds"][:, :248], first[0][:, :248], rtol=0, atol=1e-6)  # window 1
    torch.testing.assert_close(long["prompt_embeds"][:, 248:496], second[0][:, :248], rtol=0, atol=1e-6)  # window 2
    torch.testing.assert_close(long["prompt_embeds"][:, 496:], first[0][:, 248:], rtol=0, atol=0)  # T5 after
    torch.testing.assert_close(long["pooled_prompt_embeds"], first[2], rtol=0, atol=1e-6)  # first window's (batch of 2 windows: last digits)
    assert long["pooled_prompt_embeds"].shape == (1, 16 + 24)
    lat = latents(sd3_pipe, **long, max_sequence_length=64)
    assert torch.isfinite(lat).all()
    assert not torch.allclose(lat, latents(sd3_pipe, prompt=text(body), negative_prompt="a dog", max_sequence_length=64))
    # prompt_3 reaches T5 only; without T5 (text_encoder_3=None) the T5 part is zeros, as in diffusers
    with_t5_prompt = encode_long_prompt(sd3_pipe, prompt, prompt_3="a cat", do_classifier_free_guidance=False)
    expected = sd3_pipe.encode_prompt(prompt, None, "a cat", device="cpu", do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(with_t5_prompt["prompt_embeds"], expected, rtol=0, atol=1e-6)
    no_t5 = StableDiffusion3Pipeline(**{**sd3_pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    embeds = encode_long_prompt(no_t5, prompt, max_sequence_length=32)
    assert embeds["prompt_embeds"].shape == (1, 248 + 32, 96) and not embeds["prompt_embeds"][:, 248:].any()


# ------------------------------------------------------------------------------------------------ Flux
def test_flux_pipeline_is_stock_with_clip_l_at_248(flux_pipe, flux_base, longclip):
    assert type(flux_pipe) is FluxPipeline and type(flux_pipe.text_encoder) is CLIPTextModel
    assert text_encoder_length(flux_pipe.text_encoder) == 248 == flux_pipe.tokenizer.model_max_length
    assert flux_pipe.tokenizer_max_length == 248
    assert flux_pipe.text_encoder_2 is flux_base.text_encoder_2 and flux_pipe.tokenizer_2 is flux_base.tokenizer_2
    assert flux_base.tokenizer_max_length == 77 and text_encoder_length(flux_base.text_encoder) == 77
    reference = longclip.to_text_model().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in flux_pipe.text_encoder.state_dict().items())
    assert check_long_prompt_pipeline(flux_pipe) == 248 and pipeline_kind(flux_pipe) == "flux"


def test_flux_150_token_prompt_reaches_clip_and_changes_pooled_and_latents(flux_pipe, flux_base):
    prompt_a, prompt_b = prompts_differing_at_100_to_140()
    t5_prompt = "a dog"  # prompt_2 goes to T5: the same for a and b
    capture = CaptureIds(flux_pipe.text_encoder)
    try:
        lat_a = latents(flux_pipe, prompt=prompt_a, prompt_2=t5_prompt)
    finally:
        capture.close()
    (ids,) = capture[flux_pipe.text_encoder]
    assert ids.shape == (1, 248)
    assert ids[0, 1:151].tolist() == flux_pipe.tokenizer(prompt_a, add_special_tokens=False).input_ids

    pooled_a = flux_pipe.encode_prompt(prompt_a, t5_prompt, device="cpu")[1]
    pooled_b = flux_pipe.encode_prompt(prompt_b, t5_prompt, device="cpu")[1]
    assert pooled_a.shape == (1, 32) and not torch.allclose(pooled_a, pooled_b)
    assert not torch.allclose(lat_a, latents(flux_pipe, prompt=prompt_b, prompt_2=t5_prompt))
    stock = [flux_base.encode_prompt(p, t5_prompt, device="cpu")[1] for p in (prompt_a, prompt_b)]
    assert torch.equal(*stock)  # the stock CLIP-L sees only the first 75 prompt tokens
    assert torch.equal(
        latents(flux_base, prompt=prompt_a, prompt_2=t5_prompt), latents(flux_base, prompt=prompt_b, prompt_2=t5_prompt)
    )
    # T5 reads the whole prompt in either pipeline (up to max_sequence_length)
    t5_a, t5_b = (flux_pipe._get_t5_prompt_embeds(p, max_sequence_length=512, device="cpu") for p in (prompt_a, prompt_b))
    assert not torch.allclose(t5_a, t5_b)


def test_flux_short_prompts_with_stretched_encoder_equal_stock(flux_base):
    stretched = long_prompt_flux_pipeline(flux_base)
    assert text_encoder_length(stretched.text_encoder) == 248
    prompt = text(words(15, seed=6))  # the end token at position 16 < 20: exactly the stock pooled vector
    long, stock = stretched.encode_prompt(prompt, device="cpu"), flux_base.encode_prompt(prompt, device="cpu")
    torch.testing.assert_close(long[1], stock[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(long[0], stock[0], rtol=0, atol=0)


def test_flux_encode_long_prompt(flux_pipe):
    for n in (150, 400):  # past 248 tokens the CLIP input is cut (pooled vector only), T5 reads on
        prompt = text(words(n, seed=30 + n))
        plain = flux_pipe.encode_prompt(prompt, device="cpu", max_sequence_length=512)
        embeds = encode_long_prompt(flux_pipe, prompt)
        assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds"}  # no negative prompt: no true CFG
        torch.testing.assert_close(embeds["prompt_embeds"], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(embeds["pooled_prompt_embeds"], plain[1], rtol=0, atol=1e-6)
    with_negative = encode_long_prompt(flux_pipe, [prompt, "a cat"], "blurry", prompt_2="a dog", max_sequence_length=32)
    assert with_negative["prompt_embeds"].shape == with_negative["negative_prompt_embeds"].shape == (2, 32, 32)
    assert with_negative["negative_pooled_prompt_embeds"].shape == (2, 32)
    out = flux_pipe(**with_negative, true_cfg_scale=2.0, max_sequence_length=32, **GEN).images
    assert out.shape == (2, 64, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="hidden_states and clip_skip do not apply"):
        encode_long_prompt(flux_pipe, prompt, hidden_states="last")


def test_flux_img2img_and_fill_keep_their_class(flux_base, longclip):
    img2img = long_prompt_flux_pipeline(FluxImg2ImgPipeline(**flux_base.components), longclip)
    assert type(img2img) is FluxImg2ImgPipeline and img2img.tokenizer_max_length == 248
    out = img2img(text(words(150, seed=40)), image=torch.rand(1, 3, 32, 32), strength=1.0, **GEN).images
    assert torch.isfinite(out).all()
    fill_components = {k: v for k, v in flux_base.components.items() if k not in ("image_encoder", "feature_extractor")}
    fill = long_prompt_flux_pipeline(FluxFillPipeline(**fill_components), longclip)
    assert type(fill) is FluxFillPipeline and check_long_prompt_pipeline(fill) == 248


# ------------------------------------------------------------------------------------------------ dispatch
def test_pipeline_kind_recognises_components_not_class_names(sd3_base, flux_base):
    sd, xl = tiny_sd_base_pipeline(), tiny_sdxl_base_pipeline()
    assert [pipeline_kind(p) for p in (sd, xl, sd3_base, flux_base)] == ["sd", "sdxl", "sd3", "flux"]
    refiner = StableDiffusionXLImg2ImgPipeline(  # the refiner has only text_encoder_2
        vae=xl.vae, text_encoder=None, text_encoder_2=xl.text_encoder_2, tokenizer=None, tokenizer_2=xl.tokenizer_2,
        unet=xl.unet, scheduler=xl.scheduler,
    )
    assert pipeline_kind(refiner) == "sdxl"
    assert pipeline_kind(StableDiffusion3Img2ImgPipeline(**sd3_base.components)) == "sd3"
    assert pipeline_kind(StableDiffusion3Pipeline(**{**sd3_base.components, "text_encoder_3": None, "tokenizer_3": None})) == "sd3"

    class PixArtLikePipeline:  # a transformer conditioned on T5 only
        components = {"transformer": flux_base.transformer, "text_encoder": flux_base.text_encoder_2, "tokenizer": None}

    for call in (pipeline_kind, check_long_prompt_pipeline, lambda p: encode_long_prompt(p, "a dog")):
        with pytest.raises(ValueError, match=r"PixArtLikePipeline has no CLIP text encoder.*supported: Stable Diffusion"):
            call(PixArtLikePipeline())
    # a Flux layout whose CLIP slot holds T5: no CLIP encoder either
    with pytest.raises(ValueError, match="FluxPipeline has no CLIP text encoder"):
        pipeline_kind(FluxPipeline(**{**flux_base.components, "text_encoder": flux_base.text_encoder_2}))
    # SD3 with T5 in bigG's slot: a CLIP encoder, but no known layout
    odd = StableDiffusion3Pipeline(**{**sd3_base.components, "text_encoder_2": sd3_base.text_encoder_3})
    with pytest.raises(ValueError, match="StableDiffusion3Pipeline is not a pipeline layout this module knows"):
        pipeline_kind(odd)
    with pytest.raises(ValueError, match="expected a diffusers pipeline, got str"):
        pipeline_kind("stabilityai/stable-diffusion-3.5-medium")


def test_long_prompt_pipeline_dispatches_objects_and_folders(tmp_path, sd3_base, flux_base, sd3_pipe, flux_pipe, longclip):
    xl = tiny_sdxl_base_pipeline()
    built = {
        "sd": long_prompt_pipeline(tiny_sd_base_pipeline(), longclip),
        "sdxl": long_prompt_pipeline(xl, longclip),
        "sd3": long_prompt_pipeline(sd3_base, longclip),
        "flux": long_prompt_pipeline(flux_base, longclip),
    }
    for kind, pipe in built.items():
        assert pipeline_kind(pipe) == kind and check_long_prompt_pipeline(pipe) == 248
    prompt = text(words(200, seed=50))
    assert torch.equal(encode_long_prompt(built["sd3"], prompt)["prompt_embeds"], encode_long_prompt(sd3_pipe, prompt)["prompt_embeds"])
    # folders: the kind comes from model_index.json before loading; the builders' folder path loads the long encoder
    longclip.save_pretrained(tmp_path / "longclip")
    for name, base, reference in (("sd3", sd3_base, sd3_pipe), ("flux", flux_base, flux_pipe)):
        base.save_pretrained(tmp_path / name)
        pipe = long_prompt_pipeline(str(tmp_path / name), str(tmp_path / "longclip"))
        assert type(pipe) is type(reference) and pipe.tokenizer_max_length == 248
        a, b = encode_long_prompt(pipe, prompt, "a cat"), encode_long_prompt(reference, prompt, "a cat")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the whole long pipeline round-trips through the stock save_pretrained / from_pretrained
    sd3_pipe.save_pretrained(tmp_path / "sd3_long")
    reloaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3_long")
    assert reloaded.tokenizer_max_length == 248 and check_long_prompt_pipeline(reloaded) == 248
    with pytest.raises(ValueError, match=r"clip_g= does not apply to FluxPipeline, a Flux pipeline"):
        long_prompt_pipeline(flux_base, longclip, clip_g=longclip)
    with pytest.raises(ValueError, match=r"text_encoder_2= does not apply to StableDiffusion3Pipeline"):
        long_prompt_pipeline(sd3_base, longclip, text_encoder_2=longclip)
    with pytest.raises(ValueError, match="give the long CLIP-L once"):
        long_prompt_pipeline(sd3_base, longclip, clip_l=longclip)


# ------------------------------------------------------------------------------------------------ bad input
def test_wrong_width_encoders_raise(sd3_base, flux_base, longclip):
    # the 32-wide Long-CLIP given as bigG (48 wide here; 768 vs 1280 in SD3)
    with pytest.raises(ValueError, match=r"long clip_g has width 32 but the base pipeline's text_encoder_2 has width 48"):
        long_prompt_sd3_pipeline(sd3_base, None, longclip)
    wide = tiny_longclip(hidden_size=48)
    with pytest.raises(ValueError, match=r"long clip_l has width 48 but the base pipeline's text_encoder has width 32"):
        long_prompt_sd3_pipeline(sd3_base, wide)
    with pytest.raises(ValueError, match=r"long clip_l has width 48 but the base pipeline's text_encoder has width 32"):
        long_prompt_flux_pipeline(flux_base, wide)
    with pytest.raises(ValueError, match=r"has 77 positions.*not a long encoder"):
        long_prompt_flux_pipeline(flux_base, flux_base.text_encoder)
    with pytest.raises(ValueError, match=r"long_prompt_sd3_pipeline is for SD3 / SD3.5 pipelines but FluxPipeline"):
        long_prompt_sd3_pipeline(flux_base, longclip)
    with pytest.raises(ValueError, match=r"long_prompt_flux_pipeline is for Flux pipelines but StableDiffusion3Pipeline"):
        long_prompt_flux_pipeline(sd3_base, longclip)
    with pytest.raises(ValueError, match=r"width 48 but the base pipeline's text_encoder has width 32"):
        long_prompt_sd_pipeline(tiny_sd_base_pipeline(), wide)


def test_encoders_that_do_not_fit_the_transformer_raise(sd3_pipe, flux_pipe):
    too_wide = tiny_longclip(hidden_size=64).to_text_model(with_projection=True)  # 64 + 48 > joint_attention_dim 96
    with pytest.raises(ValueError, match=r"widths \(text_encoder 64 \+ text_encoder_2 48 = 112\) exceed the transformer's joint_attention_dim \(96\)"):
        check_long_prompt_pipeline(StableDiffusion3Pipeline(**{**sd3_pipe.components, "text_encoder": too_wide}))
    config = copy.deepcopy(sd3_pipe.text_encoder.config)
    config.projection_dim = 8
    other_projection = CLIPTextModelWithProjection(config).eval()  # 248 positions, 32 wide, pooled 8 instead of 16
    with pytest.raises(ValueError, match=r"pooled widths \(text_encoder 8 \+ text_encoder_2 24 = 32\) do not match the transformer's pooled_projection_dim \(40\)"):
        check_long_prompt_pipeline(StableDiffusion3Pipeline(**{**sd3_pipe.components, "text_encoder": other_projection}))
    with pytest.raises(ValueError, match=r"long clip_l has a pooled \(projection\) width of 8 but the base pipeline's text_encoder has 16"):
        long_prompt_sd3_pipeline(tiny_sd3_base_pipeline(), other_projection)
    wide = tiny_longclip(hidden_size=48).to_text_model()
    with pytest.raises(ValueError, match=r"text_encoder has width 48 but the transformer's pooled_projection_dim is 32"):
        check_long_prompt_pipeline(FluxPipeline(**{**flux_pipe.components, "text_encoder": wide}))


def test_tokenizer_length_mismatches_raise(sd3_pipe, sd3_base, flux_pipe, flux_base, longclip):
    mixed = StableDiffusion3Pipeline(**{**sd3_pipe.components, "tokenizer_2": sd3_base.tokenizer_2})
    for call in (lambda: check_long_prompt_pipeline(mixed), lambda: encode_long_prompt(mixed, "a dog")):
        with pytest.raises(ValueError, match=r"tokenizer_2.model_max_length is 77 but text_encoder_2 has 248 positions"):
            call()
    one_long = StableDiffusion3Pipeline(
        **{**sd3_pipe.components, "text_encoder_2": sd3_base.text_encoder_2, "tokenizer_2": sd3_base.tokenizer_2}
    )
    with pytest.raises(ValueError, match=r"text_encoder has 248 positions but text_encoder_2 has 77: SD3"):
        check_long_prompt_pipeline(one_long)
    # swapping long components into a built SD3 pipeline: it keeps cutting at the 77 it read at construction
    swapped = StableDiffusion3Pipeline(**sd3_base.components)
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        setattr(swapped, name, getattr(sd3_pipe, name))
    prompt = text(words(150, seed=60))
    assert swapped.encode_prompt(prompt, None, None, device="cpu", do_classifier_free_guidance=False)[0].shape[1] == 77 + 256
    with pytest.raises(ValueError, match=r"StableDiffusion3Pipeline.tokenizer_max_length is 77 but its CLIP encoders have 248"):
        check_long_prompt_pipeline(swapped)
    flux_mixed = FluxPipeline(**{**flux_pipe.components, "tokenizer": flux_base.tokenizer})
    with pytest.raises(ValueError, match=r"tokenizer.model_max_length is 77 but text_encoder has 248 positions"):
        encode_long_prompt(flux_mixed, "a dog")
    tokenizer_100 = long_prompt_flux_pipeline(flux_base, longclip).tokenizer
    tokenizer_100.model_max_length = 100
    with pytest.raises(ValueError, match=r"model_max_length 100 but the text encoder has 248"):
        long_prompt_flux_pipeline(flux_base, longclip, tokenizer=tokenizer_100)
    with pytest.raises(ValueError, match=r"model_max_length 100 but the text encoder has 248"):
        long_prompt_sd3_pipeline(sd3_base, longclip, tokenizer_2=tokenizer_100)


def test_prompt_batches_that_disagree_raise_before_denoising(sd3_pipe, flux_pipe):
    calls = {
        r"negative_prompt has 1 entries but prompt has 2": lambda: encode_long_prompt(sd3_pipe, ["a", "b"], ["c"]),
        r"prompt_2 has 3 entries but prompt has 2": lambda: encode_long_prompt(sd3_pipe, ["a", "b"], prompt_2=["c"] * 3),
        r"negative_prompt_3 has 1 entries but prompt has 2": lambda: encode_long_prompt(sd3_pipe, ["a", "b"], negative_prompt_3=["c"]),
        r"prompt_2 has 1 entries but prompt has 2": lambda: encode_long_prompt(flux_pipe, ["a", "b"], prompt_2=["c"]),
        r"negative_prompt has 3 entries but prompt has 2": lambda: encode_long_prompt(flux_pipe, ["a", "b"], ["c"] * 3),
        r"prompt must be a string or a non-empty list": lambda: encode_long_prompt(sd3_pipe, []),
        r"prompt_3 / negative_prompt_3 are SD3's T5 prompts; this is a Flux pipeline": lambda: encode_long_prompt(flux_pipe, "a", prompt_3="b"),
        r"max_sequence_length cannot be greater than 512": lambda: encode_long_prompt(sd3_pipe, "a", max_sequence_length=600),
    }
    for message, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
