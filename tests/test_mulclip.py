"""MulCLIP: hand-computed L_word, masked L_sub == unpadded L_sub, distributed L_sub, model wiring, export, collator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from hf_longclip import MulCLIPConfig, MulCLIPModel
from hf_longclip.data import MulCLIPCollator
from hf_longclip.models.losses_common import local_contrastive_loss
from hf_longclip.models.losses_mulclip import (
    aggregate_by_subcaption,
    subcaption_contrastive_loss,
    word_reconstruction_loss,
)
from hf_longclip.testing_utils import spawn_distributed

CAPTIONS = [
    "a red dog sitting on the grass. a cat on a chair. the sky is blue",
    "a man standing next to a car",  # one sentence: its only subcaption is the summary
    "a large tree in front of a house. a small square table. a yellow circle at the top. a woman near the tree",
    "a black cat. a white dog",
]


# ---------------------------------------------------------------------------------------------- L_word by hand


def _norm(x):
    n = math.sqrt(sum(c * c for c in x))
    return [c / n for c in x]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [x / sum(e) for x in e]


def _hand_recon(queries, keys, tau_a, tau_c, symmetric):
    """Pure-python L_recon for one sample: rebuild queries from keys, then token-level InfoNCE."""
    rebuilt = []
    for q in queries:
        weights = _softmax([_dot(_norm(q), _norm(k)) / tau_a for k in keys])
        rebuilt.append([sum(w * k[d] for w, k in zip(weights, keys)) for d in range(len(q))])
    n = len(queries)
    logits = [[_dot(_norm(queries[i]), _norm(rebuilt[j])) / tau_c for j in range(n)] for i in range(n)]
    rows = sum(-math.log(_softmax(logits[i])[i]) for i in range(n)) / n
    if not symmetric:
        return rows
    cols = sum(-math.log(_softmax([logits[j][i] for j in range(n)])[i]) for i in range(n)) / n
    return 0.5 * (rows + cols)


VISUAL = [[1.0, 0.0, 0.5], [0.2, 2.0, 0.0], [-1.0, 0.3, 1.0]]
TEXT = [[0.9, 0.1, 0.0], [0.0, 1.0, 1.0], [0.5, -0.5, 2.0]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_word_loss_matches_hand_computation(symmetric):
    tau_a, tau_c = 0.5, 0.2
    v, t = torch.tensor([VISUAL], dtype=torch.float64), torch.tensor([TEXT], dtype=torch.float64)
    loss, loss_image, loss_text = word_reconstruction_loss(v, t, None, tau_a, tau_c, symmetric)
    expected_image = _hand_recon(VISUAL, TEXT, tau_a, tau_c, symmetric)
    expected_text = _hand_recon(TEXT, VISUAL, tau_a, tau_c, symmetric)
    assert loss_image.item() == pytest.approx(expected_image, rel=1e-12)
    assert loss_text.item() == pytest.approx(expected_text, rel=1e-12)
    assert loss.item() == pytest.approx(expected_image + expected_text, rel=1e-12)


def test_word_loss_closed_form_on_orthonormal_tokens():
    # v' = t' = e1, e2, e3: attention weights p on the matching token and q on each other one; the reconstruction of
    # token k is p e_k + q (e_j + e_l), so cos(v_i, ṽ_k) is p/n on the diagonal and q/n off it (n = sqrt(p² + 2q²)).
    tau_a, tau_c = 0.5, 0.25
    p = math.exp(1 / tau_a) / (math.exp(1 / tau_a) + 2)
    q = 1 / (math.exp(1 / tau_a) + 2)
    n = math.sqrt(p * p + 2 * q * q)
    per_direction = -math.log(math.exp(p / n / tau_c) / (math.exp(p / n / tau_c) + 2 * math.exp(q / n / tau_c)))
    eye = torch.eye(3, dtype=torch.float64)[None]
    loss, loss_image, loss_text = word_reconstruction_loss(eye, eye, None, tau_a, tau_c)
    assert loss_image.item() == pytest.approx(per_direction, rel=1e-12)
    assert loss.item() == pytest.approx(2 * per_direction, rel=1e-12)


def test_word_loss_is_within_sample_and_skips_masked_samples():
    torch.manual_seed(0)
    v, t = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    full = word_reconstruction_loss(v, t)[0]
    per_sample = torch.stack([word_reconstruction_loss(v[i : i + 1], t[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(full, per_sample.mean())  # no cross-sample term
    masked = word_reconstruction_loss(v, t, torch.tensor([True, False, True]))[0]
    torch.testing.assert_close(masked, per_sample[[0, 2]].mean())
    v.requires_grad_()
    none = word_reconstruction_loss(v, t, torch.zeros(3, dtype=torch.bool))[0]
    none.backward()
    assert none.item() == 0.0 and torch.equal(v.grad, torch.zeros_like(v))


# ---------------------------------------------------------------------------------------------- L_sub


def test_aggregate_by_subcaption_attention_and_top_k():
    torch.manual_seed(1)
    tokens, sub = torch.randn(2, 5, 6), torch.randn(2, 3, 6)
    out = aggregate_by_subcaption(tokens, sub, temperature=0.3)
    b, i = 1, 2
    weights = (F.cosine_similarity(tokens[b], sub[b, i][None], dim=-1) / 0.3).softmax(-1)
    torch.testing.assert_close(out[b, i], F.normalize(weights @ tokens[b], dim=-1))
    top1 = aggregate_by_subcaption(tokens, sub, temperature=0.3, top_k=1)
    best = F.cosine_similarity(tokens[b], sub[b, i][None], dim=-1).argmax()
    torch.testing.assert_close(top1[b, i], F.normalize(tokens[b, best], dim=-1))
    top2 = aggregate_by_subcaption(tokens, sub, temperature=0.3, top_k=2)
    sims = F.cosine_similarity(tokens[b], sub[b, i][None], dim=-1)
    keep = sims.topk(2).indices
    w2 = (sims[keep] / 0.3).softmax(-1)
    torch.testing.assert_close(top2[b, i], F.normalize(w2 @ tokens[b, keep], dim=-1))
    # top_k >= token count or 0 keeps every token
    torch.testing.assert_close(aggregate_by_subcaption(tokens, sub, 0.3, top_k=5), out)
    torch.testing.assert_close(aggregate_by_subcaption(tokens, sub, 0.3, top_k=0), out)


def _unpadded_sub_loss(pooled, text, mask, logit_scale, smoothing):
    """Reference: per slot, plain symmetric InfoNCE over the images whose slot is real, weighted by their count."""
    total, count = 0.0, 0
    for slot in range(mask.shape[1]):
        rows = mask[:, slot]
        n = int(rows.sum())
        if n:
            loss = local_contrastive_loss(pooled[rows, slot], text[rows, slot], logit_scale, smoothing, gather=False)
            total = total + loss * n
            count += n
    return total / count


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sub_loss_with_masked_slots_equals_unpadded(smoothing):
    torch.manual_seed(2)
    pooled = F.normalize(torch.randn(5, 4, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 4, 8, dtype=torch.float64), dim=-1)
    mask = torch.tensor(
        [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool
    )
    scale = torch.tensor(2.3, dtype=torch.float64)
    # padded slots hold garbage: it must not matter
    garbage_pooled, garbage_text = pooled.clone(), text.clone()
    garbage_pooled[~mask] = 1e3
    garbage_text[~mask] = -7.0
    loss = subcaption_contrastive_loss(garbage_pooled, garbage_text, mask, scale, smoothing)
    expected = _unpadded_sub_loss(pooled, text, mask, scale, smoothing)
    torch.testing.assert_close(loss, expected)
    # an extra, all-padded slot changes nothing
    wider = subcaption_contrastive_loss(
        F.pad(pooled, (0, 0, 0, 1)), F.pad(text, (0, 0, 0, 1)), F.pad(mask, (0, 1)), scale, smoothing
    )
    torch.testing.assert_close(wider, expected)


def test_sub_loss_gradients_skip_padding_and_empty_batch_is_zero():
    torch.manual_seed(3)
    pooled = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_()
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    subcaption_contrastive_loss(pooled, text, mask, torch.tensor(1.0)).backward()
    assert torch.equal(pooled.grad[0, 1], torch.zeros(4)) and torch.equal(text.grad[0, 1], torch.zeros(4))
    assert pooled.grad[1, 1].abs().sum() > 0
    pooled.grad = None
    zero = subcaption_contrastive_loss(pooled, text, torch.zeros(3, 2, dtype=torch.bool), torch.tensor(1.0))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(pooled.grad, torch.zeros_like(pooled))


def _sub_loss_worker(result_path):
    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(11)
    pooled = F.normalize(torch.randn(5, 3, 8, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(5, 3, 8, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # uneven split (2 / 3 images) and uneven slot counts (rank 0 holds only 2 slots)
    rows, slots = (slice(0, 2), 2) if rank == 0 else (slice(2, 5), 3)
    p = pooled[rows, :slots].clone().requires_grad_()
    t = text[rows, :slots].clone().requires_grad_()
    loss = subcaption_contrastive_loss(p, t, mask[rows, :slots], torch.tensor(1.5, dtype=torch.float64), 0.1)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = F.pad(torch.cat([p.grad, t.grad], dim=-1) / 2, (0, 0, 0, 3 - slots))  # DDP averages over 2 ranks
    sizes = [2, 3]
    buckets = [torch.zeros(3, 3, 16, dtype=torch.float64) for _ in sizes]
    dist.all_gather(buckets, F.pad(grads, (0, 0, 0, 0, 0, 3 - grads.shape[0])))
    if rank == 0:
        torch.save({"loss": mean_loss / 2, "grads": torch.cat([b[:n] for b, n in zip(buckets, sizes)])}, result_path)


def test_sub_loss_on_two_processes_matches_one(tmp_path):
    result = tmp_path / "result.pt"
    spawn_distributed(_sub_loss_worker, args=(str(result),))
    out = torch.load(result, weights_only=True)
    torch.manual_seed(11)
    pooled = F.normalize(torch.randn(5, 3, 8, dtype=torch.float64), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(5, 3, 8, dtype=torch.float64), dim=-1).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    loss = subcaption_contrastive_loss(pooled, text, mask, torch.tensor(1.5, dtype=torch.float64), 0.1)
    loss.backward()
    torch.testing.assert_close(out["loss"], loss.detach())
    torch.testing.assert_close(out["grads"], torch.cat([pooled.grad, text.grad], dim=-1))


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture
def mul_model(clip_model):
    return MulCLIPModel.from_clip(clip_model)


def _batch(processor, captions, seed=0, **collator_kwargs):
    torch.manual_seed(seed)
    collator = MulCLIPCollator(processor, **collator_kwargs)
    return collator([{"pixel_values": torch.randn(3, 32, 32), "caption": c} for c in captions])


def test_config_defaults_and_validation():
    config = MulCLIPConfig(vision_config={"image_size": 224, "patch_size": 16})
    assert config.visual_calibration_size == config.text_calibration_size == 39  # FineLIP's B/16 count
    assert config.short_loss_weight == 0.5 and config.label_smoothing == 0.0
    assert config.word_loss_weight == config.sub_loss_weight == 1.0
    assert MulCLIPConfig(calibration_visual_tokens=7, calibration_text_tokens=5).text_calibration_size == 5
    for bad in (
        {"sub_aggregate_from": "cls"},
        {"word_attention_temperature": 0.0},
        {"sub_top_k": -1},
        {"calibration_visual_tokens": 0},
        {"word_loss_weight": -1.0},
        {"calibration_token_ratio": 1.5},
    ):
        with pytest.raises(ValueError):
            MulCLIPConfig(**bad)


def test_forward_composes_every_loss_term(mul_model, processor):
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        out = mul_model(**batch, return_loss=True)
    cfg = mul_model.config
    for name in ("loss_long", "loss_summary", "loss_word", "loss_word_image", "loss_word_text", "loss_sub"):
        assert out[name] is not None and torch.isfinite(out[name]), name
    torch.testing.assert_close(out.loss_global, out.loss_long + 0.5 * out.loss_summary)
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_word + out.loss_sub)
    # the terms are the pure functions applied to the model's own features
    ls = mul_model.logit_scale
    torch.testing.assert_close(out.loss_long, local_contrastive_loss(out.image_embeds, out.text_embeds, ls))
    torch.testing.assert_close(out.loss_summary, local_contrastive_loss(out.image_embeds, out.short_text_embeds, ls))
    word = word_reconstruction_loss(
        out.calibrated_image_tokens, out.calibrated_text_tokens, None,
        cfg.word_attention_temperature, cfg.word_contrastive_temperature,
    )[0]
    torch.testing.assert_close(out.loss_word, word)
    sub = subcaption_contrastive_loss(out.subcaption_image_embeds, out.subcaption_embeds, batch["subcaption_mask"], ls)
    torch.testing.assert_close(out.loss_sub, sub)
    assert out.calibrated_image_tokens.shape == (4, cfg.visual_calibration_size, cfg.projection_dim)
    assert out.calibrated_text_tokens.shape == (4, cfg.text_calibration_size, cfg.projection_dim)
    # weights from the config
    mul_model.config.word_loss_weight, mul_model.config.sub_loss_weight, mul_model.config.short_loss_weight = 0.3, 2.0, 1.0
    with torch.no_grad():
        out2 = mul_model(**batch, return_loss=True)
    torch.testing.assert_close(out2.loss, out.loss_long + out.loss_summary + 0.3 * out.loss_word + 2.0 * out.loss_sub)


def test_text_calibration_sees_only_word_tokens(mul_model, processor):
    batch = _batch(processor, CAPTIONS)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        _, tokens, mask, _ = mul_model.text_tokens(ids, attn)
        calibrated = mul_model.text_calibration(tokens, mask)
        for row in range(ids.shape[0]):
            length = int(attn[row].sum())
            words = tokens[row : row + 1, 1 : length - 1]  # between start and end-of-text tokens
            torch.testing.assert_close(calibrated[row : row + 1], mul_model.text_calibration(words), atol=1e-6, rtol=0)
        # padding the batch further changes nothing
        wide_ids = F.pad(ids, (0, 7), value=int(ids[0, -1]))
        _, wide_tokens, wide_mask, _ = mul_model.text_tokens(wide_ids, F.pad(attn, (0, 7)))
        torch.testing.assert_close(mul_model.text_calibration(wide_tokens, wide_mask), calibrated, atol=1e-6, rtol=0)


def test_packed_subcaptions_equal_one_by_one(mul_model, processor):
    batch = _batch(processor, CAPTIONS)
    mask = batch["subcaption_mask"]
    assert mask.sum(1).tolist() == [3, 1, 4, 2]
    with torch.no_grad():
        embeds, _ = mul_model.encode_subcaptions(
            batch["subcaption_input_ids"], batch["subcaption_attention_mask"], mask
        )
        for b, caption in enumerate(CAPTIONS):
            for i, sentence in enumerate(caption.split(". ")):
                single = processor(text=[sentence], return_tensors="pt")
                torch.testing.assert_close(
                    embeds[b, i], mul_model.encode_text(single["input_ids"], single["attention_mask"])[0],
                    atol=1e-5, rtol=0,
                )
    assert torch.equal(embeds[~mask], torch.zeros_like(embeds[~mask]))


def test_packed_short_captions_and_subcaptions_give_the_padded_losses_and_gradients(clip_model, processor):
    """pack_texts only changes the text tower's shapes: every loss term and gradient equals the padded path's (fp64),
    and the short captions and subcaptions go through one packed call with fewer positions than padding."""
    batch = _batch(processor, CAPTIONS)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    results = []
    for pack in (False, True):
        torch.manual_seed(0)
        model = MulCLIPModel.from_clip(clip_model, pack_texts=pack).double()
        calls = []
        hook = model.text_model.embeddings.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )
        output = model(**batch, return_loss=True)
        hook.remove()
        output.loss.backward()
        results.append((output, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls))
    (padded, padded_grads, padded_calls), (packed, packed_grads, packed_calls) = results
    assert len(padded_calls) == 3 and len(packed_calls) == 2  # caption, short, subcaptions -> caption, packed
    padded_positions = padded_calls[1][0] * padded_calls[1][1] + padded_calls[2][0] * padded_calls[2][1]
    assert packed_calls[1][0] * packed_calls[1][1] < padded_positions
    for term in ("loss", "loss_global", "loss_summary", "loss_word", "loss_sub"):
        torch.testing.assert_close(getattr(packed, term), getattr(padded, term), rtol=1e-10, atol=0)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-10 * float(grad.abs().max()) + 1e-14)


def test_gradients_reach_both_calibration_modules_and_backbone(mul_model, processor):
    mul_model.train()
    batch = _batch(processor, CAPTIONS)
    for term in ("loss", "loss_word", "loss_sub"):
        mul_model.zero_grad()
        out = mul_model(**batch, return_loss=True)
        out[term].backward()
        grads = {n: p.grad for n, p in mul_model.named_parameters()}
        def reached(prefix):
            return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))
        assert reached("visual_calibration."), term
        assert reached("vision_model.encoder."), term
        assert reached("text_model.encoder."), term
        if term != "loss_sub":  # L_sub aggregates v' only; t' is trained by L_word
            assert reached("text_calibration."), term
    position = mul_model.text_model.embeddings.position_embedding
    assert torch.equal(position.weight.grad[: position.keep], torch.zeros_like(position.weight.grad[: position.keep]))


def test_sub_loss_from_patches_option(clip_model, processor):
    model = MulCLIPModel.from_clip(clip_model, sub_aggregate_from="patches", sub_top_k=2)
    assert model.config.sub_aggregate_from == "patches" and model.config.sub_top_k == 2
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        _, patches, _ = model.image_tokens(batch["pixel_values"])
    expected = aggregate_by_subcaption(patches, out.subcaption_embeds, model.config.sub_attention_temperature, 2)
    torch.testing.assert_close(out.subcaption_image_embeds, expected)


def test_inference_is_global_only_and_export_equals_model(mul_model, processor):
    batch = _batch(processor, CAPTIONS)
    assert mul_model.retrieval_scorings == ("global",)
    with torch.no_grad():
        out = mul_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
        assert out.loss is None and out.calibrated_image_tokens is None  # no head runs at inference
        clip = mul_model.to_clip_model()
        assert type(clip) is CLIPModel and not any(k.startswith(("visual_cal", "text_cal")) for k in clip.state_dict())
        image = F.normalize(clip.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
        text = F.normalize(clip.get_text_features(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).pooler_output, dim=-1)
        torch.testing.assert_close(image, out.image_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(text, out.text_embeds, atol=1e-6, rtol=0)
        images = mul_model.retrieval_image_features(batch["pixel_values"])
        texts = mul_model.retrieval_text_features(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(mul_model.retrieval_scores(images, texts), image @ text.t(), atol=1e-6, rtol=0)
        text_model = mul_model.to_text_model(with_projection=True)
        torch.testing.assert_close(
            F.normalize(text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds, dim=-1),
            out.text_embeds, atol=1e-6, rtol=0,
        )


# ---------------------------------------------------------------------------------------------- collator


def test_collator_summary_subcaptions_and_lengths(processor):
    tok = processor.tokenizer
    examples = [
        {"pixel_values": torch.zeros(3, 32, 32), "caption": "a red dog. a cat on a chair. the sky is blue. a tree"},
        {"pixel_values": torch.zeros(3, 32, 32), "caption": "a man", "short_caption": "a person",
         "subcaptions": ["a man", "standing"]},
    ]
    batch = MulCLIPCollator(processor, max_subcaptions=3)(examples)
    assert batch["subcaption_mask"].tolist() == [[True, True, True], [True, True, False]]
    decoded = tok.batch_decode(batch["short_input_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == ["a red dog", "a person"]
    subs = [tok.decode(batch["subcaption_input_ids"][0, i], skip_special_tokens=True).strip() for i in range(3)]
    assert subs == ["a red dog", "a cat on a chair", "the sky is blue"]
    # each granularity padded to its own longest text, not to 248 or to the caption length
    longest_sub = max(len(tok(s)["input_ids"]) for s in ["a red dog", "a cat on a chair", "the sky is blue", "a man", "standing"])
    assert batch["subcaption_input_ids"].shape[-1] == longest_sub
    assert batch["short_input_ids"].shape[-1] == max(len(tok(s)["input_ids"]) for s in ["a red dog", "a person"])
    assert batch["subcaption_attention_mask"][1, 2].sum() == 0
    # selection options
    skip = MulCLIPCollator(processor, max_subcaptions=8, include_summary_in_subcaptions=False)(examples[:1])
    assert skip["subcaption_mask"].sum() == 3
    rand = MulCLIPCollator(processor, max_subcaptions=2, subcaption_selection="random", seed=0)
    sentences = ["a red dog", "a cat on a chair", "the sky is blue", "a tree"]
    picked = rand.subcaptions(examples[0], examples[0]["caption"])
    assert len(picked) == 2 and sorted(picked, key=sentences.index) == picked
    with pytest.raises(ValueError):
        MulCLIPCollator(processor, subcaption_selection="longest")
    with pytest.raises(TypeError):
        MulCLIPCollator(processor)([{"pixel_values": torch.zeros(3, 32, 32), "caption": "a", "subcaptions": [3]}])


def test_bad_inputs_give_finite_losses(mul_model, processor):
    long_caption = " ".join(["a red circle next to a blue square"] * 60)  # far over 248 tokens
    captions = ["", "a man standing next to a car", long_caption + ". " + long_caption, "a cat"]
    batch = _batch(processor, captions)
    assert batch["input_ids"].shape[1] == 248 and batch["subcaption_input_ids"].shape[-1] == 248
    assert batch["subcaption_mask"].sum(1).tolist() == [0, 1, 2, 1]
    mul_model.train()
    out = mul_model(**batch, return_loss=True)
    for name in ("loss", "loss_long", "loss_summary", "loss_word", "loss_sub"):
        assert torch.isfinite(out[name]), name
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mul_model.parameters() if p.grad is not None)
    # the empty caption has no word token: it leaves L_word but stays in the global loss
    valid = torch.tensor([False, True, True, True])
    expected = word_reconstruction_loss(
        out.calibrated_image_tokens, out.calibrated_text_tokens, valid,
        mul_model.config.word_attention_temperature, mul_model.config.word_contrastive_temperature,
    )[0]
    torch.testing.assert_close(out.loss_word, expected)
    assert out.logits_per_image.shape == (4, 4)
    # a batch without any subcaption (all captions empty) still trains
    mul_model.zero_grad()
    empty = _batch(processor, ["", ""])
    assert empty["subcaption_mask"].shape == (2, 0)
    out = mul_model(**empty, return_loss=True)
    assert out.loss_sub.item() == 0.0 and out.loss_word.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    # captions longer than the position table are refused with a clear message, not an index error
    with pytest.raises(ValueError, match="at most 248"):
        mul_model(input_ids=torch.zeros(1, 249, dtype=torch.long), pixel_values=batch["pixel_values"][:1])

