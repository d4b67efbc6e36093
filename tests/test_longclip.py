"""Long-CLIP backbone: stretching, frozen rows, loss, save/load, remote code, export, processor, bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection

from hf_longclip import LongCLIPConfig, LongCLIPModel, LongCLIPProcessor, stretch_position_embeddings
from hf_longclip.models.losses_common import local_contrastive_loss
from hf_longclip.models.losses_longclip import pca_reconstruct
from hf_longclip.testing_utils import tiny_clip


def _ids(processor, texts):
    return processor(text=texts, return_tensors="pt")


# ---------------------------------------------------------------- stretching
def test_stretch_matches_formula_row_by_row():
    torch.manual_seed(0)
    table = torch.randn(77, 8, dtype=torch.float64)
    out = stretch_position_embeddings(table, keep=20, ratio=4)
    assert out.shape == (248, 8) and out.dtype == torch.float64
    for p in range(20):
        assert torch.equal(out[p], table[p])
    for i in range(56):
        for k in range(4):
            expected = (1 - k / 4) * table[20 + i] + (k / 4) * table[21 + i]
            torch.testing.assert_close(out[20 + 4 * i + k], expected, rtol=0, atol=1e-12)
    for k in range(4):  # rows 244..247 extrapolate past the last source row
        expected = table[76] + (k / 4) * (table[76] - table[75])
        torch.testing.assert_close(out[244 + k], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[244], table[76])


def test_stretch_other_geometries_and_dtype():
    table = torch.randn(77, 4, dtype=torch.float16)
    out = stretch_position_embeddings(table, keep=10, ratio=8)
    assert out.shape == (10 + 8 * 67, 4) and out.dtype == torch.float16
    assert torch.equal(out[:10], table[:10])
    assert torch.equal(out[10::8][:67], table[10:])  # every ratio-th row is a source row


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep=77, ratio=4), "keep"),
        (dict(keep=20, ratio=0), "ratio"),
        (dict(keep=20, ratio=4, target_length=250), "250"),
        (dict(keep=-1, ratio=4), "keep"),
    ],
)
def test_stretch_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stretch_position_embeddings(torch.randn(77, 4), **kwargs)


def test_config_rejects_bad_geometry():
    with pytest.raises(ValueError, match="keep"):
        LongCLIPConfig(position_keep=80)
    with pytest.raises(ValueError, match="ratio"):
        LongCLIPConfig(position_ratio=0)
    with pytest.raises(ValueError, match="248"):
        LongCLIPConfig(text_config={"max_position_embeddings": 300})
    with pytest.raises(ValueError, match="text_config_dict"):
        LongCLIPConfig(text_config_dict={"hidden_size": 32})
    assert LongCLIPConfig(position_keep=10, position_ratio=8).text_config.max_position_embeddings == 10 + 8 * 67


def test_from_clip_keeps_short_inputs_identical(clip_model, longclip_model, processor):
    assert longclip_model.text_model.embeddings.position_embedding.weight.shape[0] == 248
    assert longclip_model.config.text_config.max_position_embeddings == 248
    inputs = _ids(processor, ["a red circle", "a small blue square in the top left"])
    assert inputs["input_ids"].shape[1] <= 20
    with torch.no_grad():
        ours = longclip_model.get_text_features(**inputs)
        theirs = clip_model.get_text_features(**inputs)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(
            longclip_model.get_image_features(pixel_values=pixels).pooler_output,
            clip_model.get_image_features(pixel_values=pixels).pooler_output,
        )


def test_long_inputs_use_stretched_positions(longclip_model, processor):
    caption = "the red circle is next to the blue square and " * 30
    inputs = _ids(processor, [caption])
    assert inputs["input_ids"].shape[1] == 248
    base = longclip_model.encode_text(**inputs)
    table = longclip_model.text_model.embeddings.position_embedding.weight
    with torch.no_grad():
        table[200] += torch.randn(table.shape[1])  # a constant shift would vanish in LayerNorm
    changed = longclip_model.encode_text(**inputs)
    assert not torch.allclose(base, changed)


# ---------------------------------------------------------------- frozen rows
def test_kept_rows_get_no_gradient_and_stay_fixed(longclip_model, processor):
    model = longclip_model.train()
    caption = "a large red circle in the top left and a small blue square " * 8
    text = _ids(processor, [caption, "a green triangle " * 20])
    batch = dict(pixel_values=torch.randn(2, 3, 32, 32), **text)
    table = model.text_model.embeddings.position_embedding
    original = table.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(2):
        loss = model(**batch, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        grad = table.weight.grad
        assert torch.count_nonzero(grad[:20]) == 0
        assert torch.count_nonzero(grad[20 : text["input_ids"].shape[1]]) > 0
        optimizer.step()
    # weight decay touched weight[:20] in place, but the table the model uses and the saved table did not move
    assert torch.equal(table.effective_weight()[:20], original[:20])
    assert torch.equal(model.state_dict()["text_model.embeddings.position_embedding.weight"][:20], original[:20])
    assert not torch.equal(table.effective_weight()[20:], original[20:])


def test_freezing_can_be_disabled(clip_model, processor):
    model = LongCLIPModel.from_clip(clip_model, freeze_kept_positions=False).train()
    text = _ids(processor, ["a red circle " * 10, "a blue square " * 10])
    out = model(pixel_values=torch.randn(2, 3, 32, 32), **text, return_loss=True)
    out.loss.backward()
    assert torch.count_nonzero(model.text_model.embeddings.position_embedding.weight.grad[:20]) > 0


# ---------------------------------------------------------------- loss
def _smoothed_ce(logits, targets, eps):
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    n = logits.shape[1]
    return np.mean([-(1 - eps) * logp[i, t] - eps * logp[i].sum() / n for i, t in enumerate(targets)])


def test_pca_short_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    short = rng.normal(size=(6, 5))
    short /= np.linalg.norm(short, axis=1, keepdims=True)
    # principal components by hand (float64): project the centred features on the top-2 right singular vectors
    mean = image.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(image - mean, full_matrices=False)
    primary = (image - mean) @ vt[:2].T @ vt[:2] + mean
    ours = pca_reconstruct(torch.tensor(image), 2).numpy()
    np.testing.assert_allclose(ours, primary, atol=1e-10)
    scale = 7.0
    logits = scale * primary @ short.T
    expected = 0.5 * (_smoothed_ce(logits, range(6), 0.1) + _smoothed_ce(logits.T, range(6), 0.1))
    loss = local_contrastive_loss(
        torch.tensor(primary), torch.tensor(short), torch.tensor(np.log(scale)), label_smoothing=0.1
    )
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    # batches no larger than the component count keep every direction
    assert torch.equal(pca_reconstruct(torch.tensor(image[:2]), 2), torch.tensor(image[:2]))


def _svd_reference(features, k):
    """The authors' computation: autograd through torch's SVD."""
    mean = features.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(features - mean, full_matrices=False)
    return (features - mean) @ vh[:k].t() @ vh[:k] + mean


def test_pca_gradient_equals_svd_gradient_and_stays_finite_where_svd_gives_nan():
    torch.manual_seed(0)
    for rows, dim, k in [(10, 6, 3), (40, 16, 5), (8, 20, 4)]:
        features = torch.randn(rows, dim, dtype=torch.float64, requires_grad=True)
        upstream = torch.randn(rows, dim, dtype=torch.float64)
        (pca_reconstruct(features, k) * upstream).sum().backward()
        ours, features.grad = features.grad, None
        (_svd_reference(features, k) * upstream).sum().backward()
        torch.testing.assert_close(ours, features.grad, rtol=1e-9, atol=1e-11)
    # Nearly identical features (a freshly initialised model on similar images): rank 3 < 32 components. torch's
    # SVD backward divides by differences of equal (zero) singular values and returns NaN, which is how a
    # Long-CLIP run's weights become NaN (the authors' issue #52); the projection keeps the batch as it is.
    base = torch.randn(1, 64) + 1e-2 * torch.randn(64, 3) @ torch.randn(3, 64)
    features = F.normalize(base, dim=-1).requires_grad_()
    upstream = torch.randn(64, 64)
    (_svd_reference(features, 32) * upstream).sum().backward()
    assert not torch.isfinite(features.grad).all()
    features.grad = None
    out = pca_reconstruct(features, 32)
    torch.testing.assert_close(out, features.detach(), rtol=0, atol=1e-6)
    (out * upstream).sum().backward()
    torch.testing.assert_close(features.grad, upstream)


def test_forward_loss_terms(longclip_model, processor):
    model = longclip_model
    text = _ids(processor, ["a red circle in the top left. it is large.", "a blue square. small.", "a cat"])
    short = _ids(processor, ["a red circle", "a blue square", "a cat"])
    pixels = torch.randn(3, 3, 32, 32)
    out = model(
        pixel_values=pixels,
        **text,
        short_input_ids=short["input_ids"],
        short_attention_mask=short["attention_mask"],
        return_loss=True,
    )
    with torch.no_grad():
        img = model.encode_image(pixels)
        long_ = model.encode_text(**text)
        short_ = model.encode_text(short["input_ids"], short["attention_mask"])
    ls = model.config.label_smoothing
    expect_long = local_contrastive_loss(img, long_, model.logit_scale.detach(), ls)
    expect_short = local_contrastive_loss(pca_reconstruct(img, 32), short_, model.logit_scale.detach(), ls)
    torch.testing.assert_close(out.loss_long.detach(), expect_long)
    torch.testing.assert_close(out.loss_short.detach(), expect_short)
    torch.testing.assert_close(out.loss.detach(), expect_long + expect_short)
    assert out.logits_per_image.shape == (3, 3)
    model.config.short_loss_weight = 0.1
    weighted = model(pixel_values=pixels, **text, short_input_ids=short["input_ids"], return_loss=True)
    torch.testing.assert_close(weighted.loss.detach(), expect_long + 0.1 * expect_short)


# ---------------------------------------------------------------- save / load / remote code / export


def test_exports_to_stock_clip(longclip_model, processor, tmp_path):
    text = _ids(processor, ["a small green triangle at the bottom right " * 12, "a cat"])
    pixels = torch.randn(2, 3, 32, 32)
    clip = longclip_model.to_clip_model()
    assert type(clip) is CLIPModel and clip.config.text_config.max_position_embeddings == 248
    clip.save_pretrained(tmp_path / "clip")
    clip = CLIPModel.from_pretrained(tmp_path / "clip")
    text_model = longclip_model.to_text_model()
    with_proj = longclip_model.to_text_model(with_projection=True)
    assert type(text_model) is CLIPTextModel and type(with_proj) is CLIPTextModelWithProjection
    with torch.no_grad():
        ours_t = longclip_model.get_text_features(**text)
        assert torch.equal(clip.get_text_features(**text).pooler_output, ours_t.pooler_output)
        assert torch.equal(
            clip.get_image_features(pixel_values=pixels).pooler_output,
            longclip_model.get_image_features(pixel_values=pixels).pooler_output,
        )
        assert torch.equal(text_model(**text).last_hidden_state, ours_t.last_hidden_state)
        assert torch.equal(with_proj(**text).text_embeds, ours_t.pooler_output)


def test_from_pretrained_on_stock_clip_folder_stretches(clip_model, tmp_path):
    clip_model.save_pretrained(tmp_path)
    model = LongCLIPModel.from_pretrained(tmp_path)
    assert model.config.text_config.max_position_embeddings == 248
    expected = stretch_position_embeddings(clip_model.text_model.embeddings.position_embedding.weight)
    assert torch.equal(model.text_model.embeddings.position_embedding.weight, expected)
    assert torch.equal(LongCLIPModel.from_clip(str(tmp_path)).logit_scale, model.logit_scale)


def test_wrong_position_table_size_is_an_error_naming_sizes(longclip_model, tmp_path):
    longclip_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 100
    config["source_max_position_embeddings"] = 30
    config["position_keep"] = 20
    config["position_ratio"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"248.*100|100.*248"):
        AutoModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------- processor
def test_processor_truncates_to_248_with_eot_last(processor):
    caption = " ".join(["red circle"] * 200)  # 400 words
    batch = processor(text=[caption, "a cat"], return_tensors="pt")
    ids = batch["input_ids"]
    assert ids.shape == (2, 248)
    eot = processor.tokenizer.eos_token_id
    assert ids[0, -1].item() == eot and ids[0, 0].item() == processor.tokenizer.bos_token_id
    assert (ids[0] == eot).sum() == 1
    assert batch["attention_mask"][1].sum() == 4  # bos, a, cat, eos


def test_processor_images_and_type_errors(processor):
    image = Image.new("RGB", (50, 40), "red")
    batch = processor(images=[image, image.convert("L")], text=["a", "b"], return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(TypeError, match="index 1"):
        processor(text=["fine", 3])
    with pytest.raises(TypeError, match="index 0"):
        processor(text=[None])


def test_processor_from_a_folder_without_tokenizer_files_is_an_error(tmp_path):
    from transformers import CLIPImageProcessorPil

    tiny_clip(seed=0).save_pretrained(tmp_path)
    CLIPImageProcessorPil().save_pretrained(tmp_path)
    with pytest.raises(OSError, match="no CLIP tokenizer files"):
        LongCLIPProcessor.from_clip(tmp_path)
