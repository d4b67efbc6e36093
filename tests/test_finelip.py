"""FineLIP: token aggregation, CLIM, hinge loss, distributed assembly, retrieval, save/load, collator, bad inputs."""


import pytest
import torch
import torch.nn.functional as F

from hf_longclip import FineLIPConfig, FineLIPModel
from hf_longclip.data import FineLIPCollator
from hf_longclip.data.collate_finelip import stable_image_id
from hf_longclip.models.losses_finelip import bidirectional_hinge_loss, clim_scores, hinge_warmup_alpha
from hf_longclip.testing_utils import spawn_distributed, tiny_clip, tiny_processor
from hf_longclip.models.token_aggregation import TokenAggregation

CAPTIONS = [
    "a large red circle in the top left. it is next to a blue square.",
    "a small green triangle at the bottom. the sky is blue.",
    "a cat sitting on a chair near a table",
    "a white car in front of a house. a tree on the left. a dog.",
    "a purple square",
    "an orange circle and a yellow triangle in the middle of the image",
]


@pytest.fixture
def fine_model(clip_model):
    return FineLIPModel.from_clip(clip_model)


def _batch(processor, captions, ids=None, seed=0):
    torch.manual_seed(seed)
    examples = [{"pixel_values": torch.randn(3, 32, 32), "caption": c} for c in captions]
    if ids is not None:
        for example, i in zip(examples, ids):
            example["id"] = i
    return FineLIPCollator(processor)(examples)


# ---------------------------------------------------------------------------------------------- config


def test_config_sizes_and_validation():
    b16 = FineLIPConfig(vision_config={"image_size": 224, "patch_size": 16})
    assert b16.num_patches == 196 and b16.image_aggregation_size == 39 and b16.text_aggregation_size == 39
    assert FineLIPConfig(vision_config={"image_size": 224, "patch_size": 14}).image_aggregation_size == int(256 * 0.2)
    explicit = FineLIPConfig(num_image_aggregated_tokens=7, num_text_aggregated_tokens=5)
    assert (explicit.image_aggregation_size, explicit.text_aggregation_size) == (7, 5)
    assert b16.hinge_margin == 0.2 and b16.global_loss_weight == 0 and b16.fused_clim_weight == 0.2
    # the heads' parameter count at B/16 (width 512): 2 x (LN 1024 + 52,326 + 4,017 + scale 1) = 114,736
    heads = [TokenAggregation(512, b16.image_aggregation_size), TokenAggregation(512, b16.text_aggregation_size)]
    assert sum(p.numel() for h in heads for p in h.parameters()) == 114_736
    for bad in (
        {"num_image_aggregated_tokens": 0},
        {"aggregation_ratio": 0},
        {"sparse_ratio": 1.5},
        {"clim_chunk_size": 0},
        {"hinge_margin": -0.1},
        {"fused_clim_weight": -1},
        {"fine_loss_weight": 0, "global_loss_weight": 0},
    ):
        with pytest.raises(ValueError):
            FineLIPConfig(**bad)


# ---------------------------------------------------------------------------------------------- aggregation


def test_aggregation_softmax_runs_only_over_real_tokens():
    torch.manual_seed(0)
    head = TokenAggregation(8, 3)
    tokens = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    weights = head.aggregation_weights(tokens, mask)
    assert weights.shape == (2, 3, 6)
    assert torch.all(weights[0, :, 4:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    out = head(tokens, mask)
    changed = tokens.clone()
    changed[0, 4:] = 1e4 * torch.randn(2, 8)  # garbage in the padding
    torch.testing.assert_close(head(changed, mask), out, rtol=0, atol=0)
    # equals the head applied to the unpadded row alone
    torch.testing.assert_close(head(tokens[:1, :4]), out[:1], rtol=1e-6, atol=1e-6)


def test_token_set_shapes_and_padding_invariance(fine_model, processor):
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        out = fine_model(**batch)
    n = fine_model.config.image_aggregation_size
    assert n == 3  # int(16 patches * 0.4 * 0.5)
    assert out.image_tokens.shape == (6, 1 + n, 16) and out.text_tokens.shape == (6, n + 1, 16)
    assert out.text_token_mask.shape == (6, n + 1) and out.text_token_mask.all()
    torch.testing.assert_close(out.image_tokens.norm(dim=-1), torch.ones(6, 1 + n))
    torch.testing.assert_close(out.text_tokens.norm(dim=-1), torch.ones(6, n + 1))
    # CLS first, EOT last: they are the normalised global embeddings
    torch.testing.assert_close(out.image_tokens[:, 0], out.image_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.text_tokens[:, -1], out.text_embeds, rtol=0, atol=1e-6)
    # a caption encoded alone (no padding) gives the same token set as inside the padded batch
    short_index = 4
    alone = processor(text=[CAPTIONS[short_index]], return_tensors="pt")
    assert alone["input_ids"].shape[1] < batch["input_ids"].shape[1]
    with torch.no_grad():
        _, tokens, mask, _ = fine_model.text_token_set(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(tokens[0], out.text_tokens[short_index], rtol=1e-5, atol=1e-6)
    # and padding ids themselves are irrelevant: overwrite them with arbitrary ids
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = 5
    with torch.no_grad():
        _, tokens2, _, _ = fine_model.text_token_set(ids, batch["attention_mask"])
    torch.testing.assert_close(tokens2, out.text_tokens, rtol=1e-5, atol=1e-6)


def test_text_span_from_attention_mask_and_nonzero_quirk(clip_model, processor):
    ids = processor(text=["a dog red cat", "a cat"], return_tensors="pt")
    # id 0 is the BPE piece "!" (as in "wow!!"); put one inside the first caption
    ids["input_ids"][0, 3] = 0
    model = FineLIPModel.from_clip(clip_model)
    eot, span = model.text_spans(ids["input_ids"], ids["attention_mask"])
    assert eot.tolist() == [5, 3]  # SOT a dog ! cat EOT / SOT a cat EOT (padding after)
    assert span[0].tolist() == [True] * 5 + [False] and span[1].tolist() == [True] * 3 + [False] * 3
    no_start = FineLIPModel.from_clip(clip_model, text_aggregation_include_start=False)
    assert no_start.text_spans(ids["input_ids"], ids["attention_mask"])[1][1].tolist() == [False, True, True] + [False] * 3
    quirk = FineLIPModel.from_clip(clip_model, text_span_from_nonzero_ids=True)
    eot_q, span_q = quirk.text_spans(ids["input_ids"], ids["attention_mask"])
    assert eot_q.tolist() == [4, 3]  # the "!" shortens the span by one, as in the authors' code
    assert span_q[0].tolist() == [True] * 4 + [False] * 2
    # without an attention mask the EOT is found by id
    eot_noattn, _ = model.text_spans(ids["input_ids"][:1, :6])
    assert eot_noattn.tolist() == [5]


# ---------------------------------------------------------------------------------------------- CLIM


def _hand_tokens():
    e1, e2, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])
    texts = torch.stack([torch.stack([e1, e2, u]), torch.stack([-e1, e2, e2])])
    images = torch.stack([torch.stack([e1, u, -e2]), torch.stack([e2, -e1, u])])
    return texts, images


def test_clim_matches_hand_computation():
    texts, images = _hand_tokens()
    # text 0 vs image 0: LeakyReLU(cos) rows [1, .6, 0], [0, .8, -.1], [.6, 1, -.08] -> row-max mean 2.8/3,
    # column-max mean (1 + 1 + 0)/3; text 1 vs image 0: (0 + .8 + .8)/3 + (0 + .8 + 0)/3, and so on.
    expected = torch.tensor([[1.6, 2.4 / 3], [4.6 / 3, 1.0 + 2.8 / 3]])
    torch.testing.assert_close(clim_scores(texts, images), expected, rtol=0, atol=1e-6)
    # masking text 1's duplicate token: text->image (0 + .8)/2, image->text (0 + .8 + 0)/3 against image 0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    masked = clim_scores(texts, images, mask)
    torch.testing.assert_close(masked[:, 1], torch.tensor([0.4 + 0.8 / 3, 1.0 + 2.8 / 3]), rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[:, 0], expected[:, 0], rtol=0, atol=0)
    # slope 0 (ReLU): the -0.1 / -0.08 entries never win a max here, so only negative maxima would change
    assert clim_scores(texts, images, negative_slope=0.0).shape == (2, 2)


def test_clim_chunking_is_exact_and_gradients_match():
    torch.manual_seed(0)
    texts = F.normalize(torch.randn(7, 5, 8), dim=-1).requires_grad_()
    images = F.normalize(torch.randn(9, 4, 8), dim=-1).requires_grad_()
    mask = torch.rand(7, 5) > 0.3
    mask[:, -1] = True
    dense = clim_scores(texts, images, mask, chunk_size=None)
    # reference: LeakyReLU on the full (image, text) cosine tensor, then masked mean-of-max both ways
    sim = F.leaky_relu(torch.einsum("ind,tmd->itnm", images, texts), 0.1)  # (I, T, Nv, Nt)
    t2i = sim.max(dim=2).values  # (I, T, Nt)
    t2i = (t2i * mask[None]).sum(-1) / mask.sum(-1)[None]
    i2t = sim.masked_fill(~mask[None, :, None, :], -1e9).max(dim=3).values.mean(-1)
    torch.testing.assert_close(dense, t2i + i2t, rtol=1e-6, atol=1e-6)
    (grad_dense_t, grad_dense_i) = torch.autograd.grad(dense.square().sum(), (texts, images))
    for chunk in (1, 2, 4):
        chunked = clim_scores(texts, images, mask, chunk_size=chunk)
        torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-6)
        grads = torch.autograd.grad(chunked.square().sum(), (texts, images))
        torch.testing.assert_close(grads[0], grad_dense_t, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grad_dense_i, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- hinge loss

HINGE_SCORES = torch.tensor([[0.9, 0.45, 0.85], [0.6, 0.7, 0.65], [0.85, 0.1, 1.0]])


def test_hinge_loss_matches_hand_computation():
    # image anchors: row 0 -> .2 + .85 - .9 = .15; row 1 -> .1 and .15; row 2 -> .05          = .45
    # caption anchors: column 0 -> .2 + .85 - .9 = .15 (image 2); column 2 -> .2 + .85 - 1 = .05 = .20
    loss, image_anchor, text_anchor = bidirectional_hinge_loss(HINGE_SCORES)
    torch.testing.assert_close(image_anchor, torch.tensor(0.45))
    torch.testing.assert_close(text_anchor, torch.tensor(0.20))
    torch.testing.assert_close(loss, torch.tensor(0.65))
    # images 0 and 2 are the same image: their pairs stop being negatives of each other
    loss_ids, s_ids, im_ids = bidirectional_hinge_loss(HINGE_SCORES, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(s_ids, torch.tensor(0.25))
    torch.testing.assert_close(im_ids, torch.tensor(0.0))
    torch.testing.assert_close(loss_ids, torch.tensor(0.25))
    # hardest negative only (VSE++ max_violation): rows .15 + .15 + .05, columns .15 + 0 + .05
    loss_max, _, _ = bidirectional_hinge_loss(HINGE_SCORES, max_violation=True)
    torch.testing.assert_close(loss_max, torch.tensor(0.55))
    # with margin 0 no negative beats its positive here, so nothing is left
    loss_m0, _, _ = bidirectional_hinge_loss(HINGE_SCORES, margin=0.0)
    torch.testing.assert_close(loss_m0, torch.tensor(0.0))


def test_hinge_loss_single_pair_is_zero_with_zero_gradient():
    scores = torch.tensor([[0.3]], requires_grad=True)
    loss, _, _ = bidirectional_hinge_loss(scores)
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad.abs().sum() == 0
    with pytest.raises(ValueError):
        bidirectional_hinge_loss(torch.zeros(2, 3))


def test_warmup_alpha_ramp():
    assert hinge_warmup_alpha(0, 10) == 0.0
    assert hinge_warmup_alpha(5, 10) == 0.5
    assert hinge_warmup_alpha(9, 10) == 0.9
    assert hinge_warmup_alpha(10, 10) == 1.0 and hinge_warmup_alpha(123, 10) == 1.0
    # the authors' formula ramps in epoch `warmup_epochs` and leaves earlier epochs at 1
    assert hinge_warmup_alpha(3, 10, warmup_epochs=1) == 1.0 and hinge_warmup_alpha(13, 10, warmup_epochs=1) == 0.3
    with pytest.raises(ValueError):
        hinge_warmup_alpha(0, 0)


# ---------------------------------------------------------------------------------------------- model loss


def test_forward_loss_is_hinge_on_clim_of_token_sets(fine_model, processor):
    batch = _batch(processor, CAPTIONS, ids=[0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        out = fine_model(**batch, return_loss=True, warmup_alpha=0.25)
    expected_scores = clim_scores(out.text_tokens, out.image_tokens)
    torch.testing.assert_close(out.clim_scores, expected_scores, rtol=0, atol=1e-6)
    hinge, s, im = bidirectional_hinge_loss(expected_scores, batch["image_ids"], margin=0.2)
    torch.testing.assert_close(out.loss_hinge, hinge, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, 0.25 * hinge, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss_hinge_image_anchor + out.loss_hinge_text_anchor, out.loss_hinge)
    assert out.loss_global is None and out.loss_hinge > 0
    # the duplicate-image mask is used: without ids the loss differs
    with torch.no_grad():
        no_ids = fine_model(**{k: v for k, v in batch.items() if k != "image_ids"}, return_loss=True)
    assert not torch.isclose(no_ids.loss_hinge, out.loss_hinge)
    # warm-up helper on the model follows the config
    assert fine_model.hinge_warmup_alpha(2, 8) == 0.25
    fine_model.config.hinge_warmup = False
    assert fine_model.hinge_warmup_alpha(2, 8) == 1.0


def test_global_infonce_option(clip_model, processor):
    from hf_longclip.models.losses_common import local_contrastive_loss

    model = FineLIPModel.from_clip(clip_model, global_loss_weight=0.5)
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    expected_global = local_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, 0.1)
    torch.testing.assert_close(out.loss_global, expected_global)
    torch.testing.assert_close(out.loss, out.loss_hinge + 0.5 * expected_global)


def test_gradients_reach_both_heads_and_backbone(fine_model, processor):
    fine_model.train()
    captions = CAPTIONS[:5] + ["a large red circle next to a blue square " * 4]  # > 20 tokens
    out = fine_model(**_batch(processor, captions), return_loss=True)
    out.loss.backward()
    grads = {n: p.grad for n, p in fine_model.named_parameters()}
    for prefix in ("image_aggregation.", "text_aggregation."):
        head = {n: g for n, g in grads.items() if n.startswith(prefix)}
        assert len(head) == 7 and all(g is not None for g in head.values()), prefix
        assert sum(g.abs().sum() for g in head.values()) > 0, prefix
    for name in (
        "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_model.post_layernorm.weight",
        "visual_projection.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "text_model.embeddings.token_embedding.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # frozen position rows get no gradient; logit_scale is unused by the default loss
    position = grads["text_model.embeddings.position_embedding.weight"]
    assert position[: fine_model.config.position_keep].abs().sum() == 0 and position[20:].abs().sum() > 0
    assert grads["logit_scale"] is None


# ---------------------------------------------------------------------------------------------- distributed


def _dist_setup():
    processor = tiny_processor()
    model = FineLIPModel.from_clip(tiny_clip(seed=3, processor=processor))
    model.train().double()  # float64: the comparison tests the algebra, not float32 summation order
    batch = _batch(processor, CAPTIONS, ids=[10, 11, 12, 13, 14, 10], seed=7)
    batch["pixel_values"] = batch["pixel_values"].double()
    return model, batch


def _rows(batch, rows):
    out = {k: v[rows] for k, v in batch.items()}
    # each process pads its captions to its own longest
    length = int(out["attention_mask"].sum(-1).max())
    out["input_ids"], out["attention_mask"] = out["input_ids"][:, :length], out["attention_mask"][:, :length]
    return out


def _finelip_two_process_worker(result_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    # Forked children inherit the parent's OpenMP pool, which is not fork-safe (a conv hangs if the parent already
    # ran one); Accelerator raises the thread count to 2, so go back to one thread after creating it.
    torch.set_num_threads(1)
    rank = accelerator.process_index
    assert accelerator.num_processes == 2
    model, batch = _dist_setup()
    rows = slice(0, 4) if rank == 0 else slice(4, 6)  # uneven shards; the duplicate pair spans both ranks
    out = model(**_rows(batch, rows), return_loss=True, warmup_alpha=0.5)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads[name] = g / 2  # DDP's gradient averaging
    losses = accelerator.gather(out.loss.detach().reshape(1))
    if rank == 0:
        torch.save({"losses": losses, "scores": out.clim_scores.detach(), "grads": grads}, result_path)


def test_two_processes_match_one_process(tmp_path):
    result = tmp_path / "finelip_dist.pt"
    spawn_distributed(_finelip_two_process_worker, args=(str(result),))
    dist = torch.load(result, weights_only=True)
    model, batch = _dist_setup()
    out = model(**batch, return_loss=True, warmup_alpha=0.5)
    out.loss.backward()
    # every rank holds the full global-batch loss
    torch.testing.assert_close(dist["losses"], out.loss.detach().repeat(2), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dist["scores"], out.clim_scores.detach(), rtol=1e-10, atol=1e-12)
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dist["grads"][name], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 20 and any(n.startswith("text_aggregation.") for n in dist["grads"])


# ---------------------------------------------------------------------------------------------- inference


def test_retrieval_scorings(fine_model, processor):
    batch = _batch(processor, CAPTIONS)
    assert fine_model.retrieval_scorings == ("global", "fused", "clim")
    with torch.no_grad():
        out = fine_model(**batch, return_loss=True)
        global_images = fine_model.retrieval_image_features(batch["pixel_values"])
        global_texts = fine_model.retrieval_text_features(batch["input_ids"], batch["attention_mask"])
        assert set(global_images) == {"image_embeds"} and set(global_texts) == {"text_embeds"}
        cosine = fine_model.retrieval_scores(global_images, global_texts)
        torch.testing.assert_close(cosine, out.image_embeds @ out.text_embeds.t(), rtol=0, atol=1e-6)
        images = fine_model.retrieval_image_features(batch["pixel_values"], "fused")
        # texts in two batches of different padded lengths, concatenated like an evaluation loop does
        parts = [fine_model.retrieval_text_features(**_text_rows(batch, r), scoring="fused") for r in (slice(0, 2), slice(2, 6))]
        texts = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        assert texts["text_tokens"].shape == (6, 4, 16) and texts["text_token_mask"].shape == (6, 4)
        clim = fine_model.retrieval_scores(images, texts, "clim")
        torch.testing.assert_close(clim, out.clim_scores, rtol=1e-5, atol=1e-6)
        fused = fine_model.retrieval_scores(images, texts, "fused", chunk_size=2)
        torch.testing.assert_close(fused, 0.8 * cosine + 0.2 * out.clim_scores, rtol=1e-5, atol=1e-6)
        fine_model.config.fused_clim_weight, fine_model.config.fused_global_weight = 0.5, 0.5
        torch.testing.assert_close(
            fine_model.retrieval_scores(images, texts, "fused"), 0.5 * cosine + 0.5 * clim, rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="supports scoring"):
        fine_model.retrieval_scores(images, texts, "tci")


def _text_rows(batch, rows):
    sub = _rows(batch, rows)
    return {"input_ids": sub["input_ids"], "attention_mask": sub["attention_mask"]}


# ---------------------------------------------------------------------------------------------- collator


def test_collator_long_caption_only_with_ids(processor):
    collator = FineLIPCollator(processor)
    examples = [
        {"pixel_values": torch.zeros(3, 32, 32), "caption": "a dog", "short_caption": "x", "id": 4},
        {"pixel_values": torch.zeros(3, 32, 32), "caption": "a cat sitting on a red chair", "id": "img/1.jpg"},
        {"pixel_values": torch.zeros(3, 32, 32), "caption": "a cat", "id": "img/1.jpg"},
    ]
    batch = collator(examples)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids"}
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(-1).max()) == 9  # SOT + 7 words + EOT
    ids = batch["image_ids"].tolist()
    assert ids[0] == 4 and ids[1] == ids[2] == stable_image_id("img/1.jpg") != 4 and ids[1] >= 0
    assert stable_image_id("img/1.jpg") == stable_image_id("img/1.jpg")  # no per-process hash seed
    no_ids = collator([{"pixel_values": torch.zeros(3, 32, 32), "caption": "a dog"}])
    assert "image_ids" not in no_ids
    with pytest.raises(ValueError):
        collator([])


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_finite_outputs(fine_model, processor):
    captions = ["", "a", "a dog", "a large red circle next to a blue square " * 40]
    batch = _batch(processor, captions)
    assert batch["input_ids"].shape[1] == 248  # the over-long caption is truncated to the context
    with torch.no_grad():
        out = fine_model(**batch, return_loss=True)
    for name in ("loss", "clim_scores", "image_tokens", "text_tokens", "text_embeds"):
        assert torch.isfinite(out[name]).all(), name
    assert out.text_token_mask.all()  # the start token alone is a valid span for the empty caption
    # without the start token the empty caption has nothing to aggregate: its mixtures are masked, still finite
    no_start = FineLIPModel.from_clip(tiny_clip(processor=processor), text_aggregation_include_start=False)
    with torch.no_grad():
        out2 = no_start(**batch, return_loss=True)
    assert out2.text_token_mask[0].tolist() == [False] * 3 + [True] and out2.text_token_mask[1:].all()
    assert torch.isfinite(out2.loss) and torch.isfinite(out2.clim_scores).all()
    # a batch of one pair has no negative: the hinge loss is exactly zero (documented)
    single = _batch(processor, ["a dog"])
    out1 = fine_model(**single, return_loss=True)
    assert out1.loss.item() == 0.0 and out1.clim_scores.shape == (1, 1)
    with pytest.raises(ValueError, match="pairs image i"):
        fine_model(pixel_values=batch["pixel_values"][:2], input_ids=batch["input_ids"], return_loss=True)
    with pytest.raises(ValueError, match="at most"):
        fine_model(pixel_values=batch["pixel_values"], input_ids=torch.zeros(4, 249, dtype=torch.long))


def test_misspelt_image_ids_raise_instead_of_changing_the_loss(fine_model, processor):
    """Two pairs of the same image: with `image_ids` neither is the other's negative and the hinge loss is 0; the
    same batch with the key misspelt used to run silently with the duplicate mask lost (loss about 1)."""
    batch = _batch(processor, [CAPTIONS[0], CAPTIONS[0]], ids=[5, 5])
    batch["pixel_values"][1] = batch["pixel_values"][0]
    assert fine_model(**batch, return_loss=True).loss_hinge.item() == 0.0
    misspelt = {**{k: v for k, v in batch.items() if k != "image_ids"}, "image_id": batch["image_ids"]}
    with pytest.raises(TypeError, match="image_id"):
        fine_model(**misspelt, return_loss=True)
    with pytest.raises(TypeError, match="image_id"):
        fine_model.loss_features(**misspelt)
