"""beta-CLIP: beta-CAL losses against hand computation, the pooling block, the value-path block, packed
multi-granular text encoding, save/load/export, retrieval scoring and bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_longclip import BetaCLIPConfig, BetaCLIPModel, TextConditionedPooler
from hf_longclip.models.losses_betaclip import BetaCALoss, beta_cal_bce_loss, beta_cal_ce_loss
from hf_longclip.models.packing import pack_rows, packed_layout
from hf_longclip.data import BetaCLIPCollator
from hf_longclip.testing_utils import spawn_distributed
from hf_longclip.text import parse_hierarchies

# ---------------------------------------------------------------------------------------------- beta-CAL by hand

# 2 images x 3 query slots, D = 2; slot (1, 2) is padding (its embeddings are arbitrary and must only matter in the
# authors' unmasked-column CE).
ANGLES_Z = [[0.0, 0.4, 1.1], [2.0, 2.9, -1.3]]
ANGLES_U = [[0.2, 0.9, 1.5], [2.4, -2.6, 0.7]]
MASK = [[True, True, True], [True, True, False]]
LOG_SCALE = math.log(3.0)


def _vectors(angles):
    return torch.tensor([[[math.cos(a), math.sin(a)] for a in row] for row in angles], dtype=torch.float64)


def _flat(angles):
    return [(math.cos(a), math.sin(a)) for row in angles for a in row]


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1]


def _hand_ce(alpha, beta, mask_columns):
    z, u, valid, s, k = _flat(ANGLES_Z), _flat(ANGLES_U), [m for row in MASK for m in row], 3.0, 3
    n_all = len(z)
    columns = [m for m in range(n_all) if valid[m] or not mask_columns]
    per_direction = []
    for query, keys in ((z, u), (u, z)):
        losses = []
        for n in range(n_all):
            if not valid[n]:
                continue
            weights = {}
            for m in columns:
                w = alpha if m == n else (beta if m // k == n // k else 0.0)
                weights[m] = w if (valid[n] and valid[m]) else 0.0
            total = sum(weights.values())
            logits = {m: s * _dot(query[n], keys[m]) for m in columns}
            log_norm = math.log(sum(math.exp(v) for v in logits.values()))
            losses.append(-sum(weights[m] / total * (logits[m] - log_norm) for m in columns))
        per_direction.append(sum(losses) / len(losses))
    return 0.5 * sum(per_direction)


def _hand_bce(beta, mean_all):
    z, u, valid, s, k = _flat(ANGLES_Z), _flat(ANGLES_U), [m for row in MASK for m in row], 3.0, 3
    n_all = len(z)
    total = 0.0
    for query, keys in ((z, u), (u, z)):
        for n in range(n_all):
            for m in range(n_all):
                if not (valid[n] and valid[m]):
                    continue  # weight 0
                same = n // k == m // k
                y = 1.0 if same else 0.0
                w = 1.0 if (n == m or not same) else beta
                x = s * _dot(query[n], keys[m])
                total += w * (math.log(1 + math.exp(x)) - y * x)
    count = sum(valid)
    return 0.5 * total / (n_all**2 if mean_all else count**2)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mask_columns", [True, False])
def test_beta_cal_ce_matches_hand_computation(beta, mask_columns):
    loss = beta_cal_ce_loss(
        _vectors(ANGLES_Z), _vectors(ANGLES_U), torch.tensor(MASK), torch.tensor(LOG_SCALE, dtype=torch.float64),
        alpha=1.0, beta=beta, mask_invalid_columns=mask_columns,
    )
    assert loss.item() == pytest.approx(_hand_ce(1.0, beta, mask_columns), rel=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mean_all", [True, False])
def test_beta_cal_bce_matches_hand_computation(beta, mean_all):
    loss = beta_cal_bce_loss(
        _vectors(ANGLES_Z), _vectors(ANGLES_U), torch.tensor(MASK), torch.tensor(LOG_SCALE, dtype=torch.float64),
        beta=beta, mean_over_all_pairs=mean_all,
    )
    assert loss.item() == pytest.approx(_hand_bce(beta, mean_all), rel=1e-10)


def test_quirk_settings_actually_differ():
    args = (_vectors(ANGLES_Z), _vectors(ANGLES_U), torch.tensor(MASK), torch.tensor(LOG_SCALE, dtype=torch.float64))
    assert beta_cal_ce_loss(*args, mask_invalid_columns=True) != beta_cal_ce_loss(*args, mask_invalid_columns=False)
    assert beta_cal_bce_loss(*args, mean_over_all_pairs=True) < beta_cal_bce_loss(*args, mean_over_all_pairs=False)


def test_ce_with_beta_zero_is_per_slot_infonce():
    torch.manual_seed(0)
    z, u = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    scale = torch.tensor(2.0)
    loss = beta_cal_ce_loss(z, u, None, scale, alpha=1.0, beta=0.0)
    zf, uf = F.normalize(z.reshape(12, 8), dim=-1), F.normalize(u.reshape(12, 8), dim=-1)
    logits = scale.exp() * zf @ uf.t()
    target = torch.arange(12)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_clean_mode_padded_slots_change_nothing(mode):
    torch.manual_seed(1)
    z = torch.randn(2, 3, 8, requires_grad=True)
    u = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss_fn = BetaCALoss(mode, beta=0.5)
    loss = loss_fn(z, u, mask, torch.tensor(1.5))
    grads = torch.autograd.grad(loss, (z, u))
    # two more padded slots per image with arbitrary embeddings
    z2 = torch.cat([z.detach(), torch.randn(2, 2, 8)], dim=1).requires_grad_()
    u2 = torch.cat([u.detach(), torch.randn(2, 2, 8)], dim=1).requires_grad_()
    mask2 = torch.cat([mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    loss2 = loss_fn(z2, u2, mask2, torch.tensor(1.5))
    grads2 = torch.autograd.grad(loss2, (z2, u2))
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2[:, :3], g)
        assert torch.all(g2[:, 3:] == 0)
    assert torch.all(grads[0][0, 2] == 0)  # the originally padded slot gets nothing either


@pytest.mark.parametrize("mode", ["ce", "bce"])
def test_image_without_valid_queries_drops_out(mode):
    torch.manual_seed(2)
    z, u = torch.randn(3, 3, 8), torch.randn(3, 3, 8)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    loss_fn = BetaCALoss(mode, beta=0.5)
    loss = loss_fn(z, u, mask, torch.tensor(1.0))
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(loss, loss_fn(z[keep], u[keep], mask[keep], torch.tensor(1.0)))
    # nothing valid at all: zero, finite, differentiable
    zg = z.clone().requires_grad_()
    empty = loss_fn(zg, u, torch.zeros(3, 3, dtype=torch.bool), torch.tensor(1.0))
    empty.backward()
    assert empty.item() == 0 and torch.all(zg.grad == 0)


# ---------------------------------------------------------------------------------------------- model pieces


@pytest.fixture
def beta_model(clip_model):
    return BetaCLIPModel.from_clip(clip_model)


def test_pooler_matches_nn_multihead_attention():
    torch.manual_seed(3)
    pooler = TextConditionedPooler(16, num_heads=4)
    queries, tokens = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    q, k = F.normalize(queries, dim=-1), F.normalize(tokens, dim=-1)
    attended, _ = pooler.attn(q, k, k, need_weights=False)
    expected = attended + pooler.fc2(pooler.activation(pooler.fc1(pooler.layer_norm(attended))))
    torch.testing.assert_close(pooler(queries, tokens), expected, rtol=1e-5, atol=1e-6)
    # no residual from the query: scaling a query (same direction) changes nothing, thanks to the L2 normalisation
    torch.testing.assert_close(pooler(3 * queries, tokens), pooler(queries, tokens), rtol=1e-5, atol=1e-6)


def test_pooler_initialisation_is_pytorch_default(beta_model):
    pooler = beta_model.text_conditioned_pooler
    assert pooler.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    bound = math.sqrt(6 / (16 + 48))  # xavier-uniform of the (3D, D) in-projection
    assert pooler.attn.in_proj_weight.abs().max() <= bound
    assert pooler.attn.in_proj_weight.std() > 0.5 * bound / math.sqrt(3)
    assert torch.all(pooler.attn.in_proj_bias == 0)
    assert torch.all(pooler.layer_norm.weight == 1)
    assert pooler.fc1.weight.abs().max() <= 1 / math.sqrt(16)


def test_cls_equals_stock_clip_and_patches_use_the_value_path(clip_model, beta_model):
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stock = clip_model.get_image_features(pixel_values=pixels).pooler_output
        cls, patches = beta_model.get_image_tokens(pixels)
        torch.testing.assert_close(cls, stock, rtol=0, atol=1e-5)
        assert patches.shape == (2, 16, 16)
        # value path: the last block's query/key weights cannot affect the patch outputs, only the CLS one
        last = beta_model.vision_model.encoder.layers[-1].self_attn
        last.q_proj.weight.mul_(3.0)
        last.k_proj.weight.add_(0.1)
        cls2, patches2 = beta_model.get_image_tokens(pixels)
        torch.testing.assert_close(patches2, patches, rtol=0, atol=0)
        assert (cls2 - cls).abs().max() > 1e-4
        # and the ordinary last block differs from the value path for the patches
        beta_model.config.value_path_last_block = False
        _, plain = beta_model.get_image_tokens(pixels)
        assert (plain - patches2).abs().max() > 1e-4


def _batch(processor, captions, seed=0):
    collator = BetaCLIPCollator(processor, seed=seed)
    torch.manual_seed(seed)
    examples = [{"pixel_values": torch.randn(3, 32, 32), **h} for h in parse_hierarchies(captions)]
    return collator(examples)


CAPTIONS = [
    "A large red circle is on the left. It is next to a blue square. A cat is sitting on a chair. "
    "The sky is blue. A dog is leaning against the tree. A small house stands in front of the tree.",
    "A man standing near a white car",
    "A purple square at the bottom. An orange circle in the middle of the image.",
]


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_query_encoding_equals_one_by_one_and_skips_absent_rows(beta_model, processor, pack):
    beta_model.config.pack_query_texts = pack
    batch = _batch(processor, CAPTIONS)
    calls = []
    hook = beta_model.text_model.embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            caption, queries, mask = beta_model.encode_queries(
                batch["input_ids"], batch["attention_mask"],
                batch["sentence_input_ids"], batch["sentence_attention_mask"], batch["sentence_mask"],
                batch["phrase_input_ids"], batch["phrase_attention_mask"], batch["phrase_mask"],
            )
    finally:
        hook.remove()
    n_sent, n_phrase = int(batch["sentence_mask"].sum()), int(batch["phrase_mask"].sum())
    assert batch["sentence_mask"].numel() > n_sent and batch["phrase_mask"].numel() > n_phrase  # padding exists
    sentence_tokens = batch["sentence_attention_mask"][batch["sentence_mask"]].sum(-1)
    phrase_tokens = batch["phrase_attention_mask"][batch["phrase_mask"]].sum(-1)
    if pack:
        # captions alone, then every valid sentence and phrase row in one packed call: fewer rows than queries, and
        # fewer positions than the padded layout, but room for every real token
        assert calls[0] == tuple(batch["input_ids"].shape) and len(calls) == 2
        bins, width = calls[1]
        assert bins < n_sent + n_phrase
        assert int(sentence_tokens.sum() + phrase_tokens.sum()) <= bins * width
        assert bins * width < n_sent * int(sentence_tokens.max()) + n_phrase * int(phrase_tokens.max())
    else:
        # one call per granularity, exactly the valid rows, each at its own longest real length
        assert [c[0] for c in calls] == [3, n_sent, n_phrase]
        assert calls[1][1] == int(sentence_tokens.max())
        assert calls[2][1] == int(phrase_tokens.max())
    assert mask.shape == queries.shape[:2] == (3, 1 + batch["sentence_mask"].shape[1] + batch["phrase_mask"].shape[1])
    assert torch.all(queries[~mask] == 0)

    def alone(ids, att):
        with torch.no_grad():
            return beta_model.get_text_features(input_ids=ids[att.bool()][None]).pooler_output[0]

    ks = batch["sentence_mask"].shape[1]
    for b in range(3):
        torch.testing.assert_close(queries[b, 0], alone(batch["input_ids"][b], batch["attention_mask"][b]), atol=1e-5, rtol=0)
        for k in batch["sentence_mask"][b].nonzero().flatten().tolist():
            expected = alone(batch["sentence_input_ids"][b, k], batch["sentence_attention_mask"][b, k])
            torch.testing.assert_close(queries[b, 1 + k], expected, atol=1e-5, rtol=0)
        for k in batch["phrase_mask"][b].nonzero().flatten().tolist():
            expected = alone(batch["phrase_input_ids"][b, k], batch["phrase_attention_mask"][b, k])
            torch.testing.assert_close(queries[b, 1 + ks + k], expected, atol=1e-5, rtol=0)
    # length buckets (the padded layout) and a small packing capacity give the same embeddings
    beta_model.config.text_length_buckets = 3
    beta_model.config.pack_query_texts = not pack
    beta_model.config.query_pack_length = 4
    with torch.no_grad():
        _, bucketed, _ = beta_model.encode_queries(
            batch["input_ids"], batch["attention_mask"],
            batch["sentence_input_ids"], batch["sentence_attention_mask"], batch["sentence_mask"],
            batch["phrase_input_ids"], batch["phrase_attention_mask"], batch["phrase_mask"],
        )
    torch.testing.assert_close(bucketed, queries, atol=1e-5, rtol=0)


def test_pack_rows_places_every_row_once_within_capacity():
    lengths = [7, 3, 9, 1, 4, 4, 2, 8, 5]
    bins = pack_rows(lengths, capacity=10)
    assert sorted(r for b in bins for r in b) == list(range(len(lengths)))
    assert all(sum(lengths[r] for r in b) <= 10 for b in bins)
    assert len(bins) == math.ceil(sum(lengths) / 10)  # first-fit decreasing is tight here
    assert pack_rows([12, 3], capacity=10) == [[0], [1]]  # a row longer than a bin gets its own
    layout = packed_layout(torch.tensor([5, 5, 12]), capacity=10)  # capacity raised to the longest row
    assert int(layout["num_bins"]) == 2 and int(layout["width"]) == 12
    with pytest.raises(ValueError, match="capacity"):
        pack_rows([1], capacity=0)


def test_packed_queries_give_the_padded_losses_and_gradients(clip_model, processor):
    """Packing changes the text tower's shapes only: losses and every gradient equal the padded layout's (fp64)."""
    batch = _batch(processor, CAPTIONS)
    results = []
    for pack in (False, True):
        torch.manual_seed(0)  # the same pooling block
        model = BetaCLIPModel.from_clip(clip_model, pack_query_texts=pack).double()
        output = model(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()}, return_loss=True)
        output.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((output, grads))
    (padded, padded_grads), (packed, packed_grads) = results
    for term in ("loss", "loss_global", "loss_beta_cal"):
        torch.testing.assert_close(getattr(packed, term), getattr(padded, term), rtol=1e-10, atol=0)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        # rtol 1e-10 of the parameter's largest gradient (k_proj biases get float noise, mathematically zero)
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-10 * float(grad.abs().max()) + 1e-14)


def test_packing_falls_back_for_attention_without_masks(beta_model):
    assert beta_model.packs_query_texts()
    beta_model.config.text_config._attn_implementation = "flash_attention_2"
    assert not beta_model.packs_query_texts()
    beta_model.config.text_config._attn_implementation = "sdpa"
    beta_model.config.pack_query_texts = False
    assert not beta_model.packs_query_texts()
    with pytest.raises(ValueError, match="query_pack_length"):
        BetaCLIPConfig(query_pack_length=0)


def test_authors_padding_rows_are_reproducible(clip_model, processor):
    model = BetaCLIPModel.from_clip(clip_model, ce_mask_invalid_columns=False)
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        _, queries, mask = model.encode_queries(
            batch["input_ids"], batch["attention_mask"],
            batch["sentence_input_ids"], batch["sentence_attention_mask"], batch["sentence_mask"],
            batch["phrase_input_ids"], batch["phrase_attention_mask"], batch["phrase_mask"],
        )
        eos = model.config.text_config.eos_token_id
        sentence_pad = torch.zeros(1, batch["input_ids"].shape[1], dtype=torch.long)
        sentence_pad[0, -1] = eos
        phrase_pad = torch.zeros(1, batch["phrase_input_ids"].shape[2], dtype=torch.long)  # pools at position 0
        expected_s = model.get_text_features(input_ids=sentence_pad).pooler_output[0]
        expected_p = model.get_text_features(input_ids=phrase_pad).pooler_output[0]
    ks = batch["sentence_mask"].shape[1]
    padded_sentence = (~batch["sentence_mask"]).nonzero()[0]
    padded_phrase = (~batch["phrase_mask"]).nonzero()[0]
    torch.testing.assert_close(queries[padded_sentence[0], 1 + padded_sentence[1]], expected_s, atol=1e-5, rtol=0)
    torch.testing.assert_close(queries[padded_phrase[0], 1 + ks + padded_phrase[1]], expected_p, atol=1e-5, rtol=0)
    assert not mask[padded_sentence[0], 1 + padded_sentence[1]]


def test_gradients_reach_pooler_and_backbone_but_not_frozen_positions(beta_model, processor):
    beta_model.train()
    out = beta_model(**_batch(processor, CAPTIONS), return_loss=True)
    assert torch.isfinite(out.loss) and out.loss_global is not None and out.loss_beta_cal is not None
    out.loss.backward()
    for name, p in beta_model.text_conditioned_pooler.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in (
        beta_model.vision_model.encoder.layers[0].self_attn.q_proj.weight,
        beta_model.vision_model.encoder.layers[-1].mlp.fc1.weight,
        beta_model.text_model.encoder.layers[0].mlp.fc1.weight,
        beta_model.visual_projection.weight,
        beta_model.text_projection.weight,
        beta_model.logit_scale,
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0
    positions = beta_model.text_model.embeddings.position_embedding.weight
    assert torch.all(positions.grad[:20] == 0)
    assert positions.grad[20:40].abs().sum() > 0  # the first caption is longer than 40 tokens


def test_beta_cal_term_uses_the_model_masks(beta_model, processor):
    batch = _batch(processor, CAPTIONS)
    with torch.no_grad():
        out = beta_model(**batch, return_loss=True)
        expected = beta_cal_ce_loss(
            out.conditioned_image_embeds, out.query_text_embeds, out.query_mask,
            beta_model.text_conditioned_pooler.logit_scale, 1.0, 0.5,
        )
        image_embeds = F.normalize(beta_model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
    torch.testing.assert_close(out.loss_beta_cal, expected)
    torch.testing.assert_close(out.image_embeds, image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, out.loss_global + out.loss_beta_cal)


def test_clamp_logit_scales(beta_model):
    with torch.no_grad():
        beta_model.logit_scale.fill_(7.0)
        beta_model.text_conditioned_pooler.logit_scale.fill_(-1.0)
    beta_model.clamp_logit_scales()
    assert beta_model.logit_scale.item() == pytest.approx(4.6052)  # the authors' bound (ln 100, rounded)
    assert beta_model.text_conditioned_pooler.logit_scale.item() == 0.0


def test_retrieval_global_and_tci(beta_model, processor):
    torch.manual_seed(5)
    pixels = torch.randn(3, 32, 32 * 1).new_empty(3, 3, 32, 32).normal_()
    text = processor(text=["a red circle on the left", "a cat", "a dog near a tree", "blue sky"], return_tensors="pt")
    with torch.no_grad():
        img_g = beta_model.retrieval_image_features(pixels, "global")
        txt = beta_model.retrieval_text_features(text["input_ids"], text["attention_mask"], "tci")
        scores_g = beta_model.retrieval_scores(img_g, txt, "global")
        img_t = beta_model.retrieval_image_features(pixels, "tci")
        torch.testing.assert_close(img_t["image_embeds"], img_g["image_embeds"], atol=1e-5, rtol=0)
        scores = beta_model.retrieval_scores(img_t, txt, "tci")
        small_chunks = beta_model.retrieval_scores(img_t, txt, "tci", chunk_size=1)
        _, patches = beta_model.get_image_tokens(pixels)
        expected = torch.empty(3, 4)
        for i in range(3):
            for t in range(4):
                cond = beta_model.text_conditioned_pooler(txt["text_embeds"][t][None, None], patches[i][None])
                expected[i, t] = F.cosine_similarity(cond[0, 0], txt["text_embeds"][t], dim=0)
    assert scores_g.shape == scores.shape == (3, 4)
    torch.testing.assert_close(scores_g, img_g["image_embeds"] @ txt["text_embeds"].t())
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(small_chunks, scores, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="supports scoring"):
        beta_model.retrieval_scores(img_t, txt, "late_interaction")


def test_bad_inputs_give_finite_losses(beta_model, processor):
    long_caption = " ".join(f"{c} {s}" for c, s in zip(["red", "blue", "green", "white"] * 40, ["circle", "square", "car", "tree"] * 40))
    captions = [
        "",
        "no sentence boundary and no phrases here maybe",
        long_caption + ". " + long_caption[::-1],
        "Ein großer Hund läuft über die Wiese. 一只猫坐在椅子上。",
        "😀🐶 <b>bold</b> <a href='x'>link</a>. &amp; &lt;div&gt;",
        "the image",
    ]
    batch = _batch(processor, captions)
    assert batch["input_ids"].shape[1] == 248  # the long caption is cut to 248 tokens ...
    long_row = batch["attention_mask"].sum(-1).argmax()
    assert batch["input_ids"][long_row, -1] == processor.tokenizer.eos_token_id  # ... with end-of-text kept last
    assert not batch["caption_query_mask"][0]  # empty caption: no caption query, still in the global loss
    for mode in ("ce", "bce"):
        beta_model.beta_cal.mode = mode
        out = beta_model(**batch, return_loss=True)
        assert torch.isfinite(out.loss) and torch.isfinite(out.loss_beta_cal), mode
        assert not out.query_mask[0].any()  # image 0 has zero valid queries
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in beta_model.parameters() if p.grad is not None)
        beta_model.zero_grad()
    # the image without queries drops out of beta-CAL but still counts in the global loss
    with torch.no_grad():
        full = beta_model(**batch, return_loss=True)
        assert full.logits_per_image.shape == (6, 6)


def test_config_validation():
    with pytest.raises(ValueError, match="beta_cal_mode"):
        BetaCLIPConfig(beta_cal_mode="sigmoid")
    with pytest.raises(ValueError, match=">= 0"):
        BetaCLIPConfig(beta_cal_beta=-0.1)
    with pytest.raises(ValueError, match="divide"):
        BetaCLIPConfig(projection_dim=20, pooler_num_heads=8)
    with pytest.raises(ValueError, match="text_length_buckets"):
        BetaCLIPConfig(text_length_buckets=0)


# ---------------------------------------------------------------------------------------------- two processes


def _global_loss_worker(result_path):
    import torch.distributed as dist
    from accelerate import Accelerator

    from hf_longclip.models.configuration_betaclip import GLOBAL_LOSS_GRADIENTS
    from hf_longclip.models.losses_betaclip import global_contrastive_loss

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    images, texts = _global_batch()
    rows = SHARDS[rank]
    out = {}
    for mode in GLOBAL_LOSS_GRADIENTS:
        img = images[rows].clone().requires_grad_()
        txt = texts[rows].clone().requires_grad_()
        loss = global_contrastive_loss(img, txt, torch.tensor(2.0, dtype=torch.float64), gradient=mode)
        loss.backward()
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
        dist.all_gather(losses, loss.detach())
        # each rank's gradient with respect to its own embeddings (no DDP averaging), padded to 4 rows to gather
        padded = torch.zeros(4, 16, dtype=torch.float64)
        padded[: rows.stop - rows.start] = torch.cat([img.grad, txt.grad], dim=1)
        grads = [torch.zeros(4, 16, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(grads, padded)
        out[mode] = {"losses": torch.stack(losses), "grads": torch.cat([grads[0][:4], grads[1][:2]])}
    if rank == 0:
        torch.save(out, result_path)


SHARDS = (slice(0, 4), slice(4, 6))  # uneven shards of the 6-pair global batch


def _global_batch():
    generator = torch.Generator().manual_seed(11)
    images = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(6, 8, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts


def _hand_built_gradients(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each process's loss and the gradient every process receives for its own rows, built in one process."""
    images, texts = _global_batch()
    scale = torch.tensor(2.0, dtype=torch.float64).exp()
    img_all, txt_all = images.clone().requires_grad_(), texts.clone().requires_grad_()
    losses = []
    for rows in SHARDS:
        targets = torch.arange(rows.start, rows.stop)
        if mode == "local_rows":  # every column a constant
            image_cols, text_cols = img_all.detach(), txt_all.detach()
        elif mode == "local_rows_and_columns":  # this process's columns carry gradient, the others' do not
            keep = torch.zeros(6, 1, dtype=torch.float64)
            keep[rows] = 1
            image_cols = keep * img_all + (1 - keep) * img_all.detach()
            text_cols = keep * txt_all + (1 - keep) * txt_all.detach()
        else:  # "all": gathered with gradient
            image_cols, text_cols = img_all, txt_all
        losses.append(0.5 * (F.cross_entropy(scale * img_all[rows] @ text_cols.t(), targets)
                             + F.cross_entropy(scale * txt_all[rows] @ image_cols.t(), targets)))
    # with "all" the gather's backward sums every process's loss into each row; otherwise only the own loss reaches it
    sum(losses).backward()
    return torch.stack(losses).detach(), torch.cat([img_all.grad, txt_all.grad], dim=1)


def test_global_loss_gradient_across_two_processes_is_the_authors_by_default(tmp_path):
    """The authors gather the other processes' features into fresh tensors: each process's loss sends gradient to its
    local rows only, none through the gathered columns (its own included). The default reproduces that gradient;
    each setting matches its hand-built reference, the other settings differ from the authors', and all give the
    same loss values. In one process every setting is the plain InfoNCE (the authors gather nothing there)."""
    from hf_longclip.models.configuration_betaclip import GLOBAL_LOSS_GRADIENTS
    from hf_longclip.models.losses_betaclip import global_contrastive_loss

    assert BetaCLIPConfig().global_loss_gradient == "local_rows"
    result = tmp_path / "result.pt"
    spawn_distributed(_global_loss_worker, args=(str(result),))
    out = torch.load(result, weights_only=True)
    authors_losses, authors = _hand_built_gradients("local_rows")
    for mode in GLOBAL_LOSS_GRADIENTS:
        losses, reference = _hand_built_gradients(mode)
        torch.testing.assert_close(out[mode]["losses"], authors_losses, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[mode]["grads"], reference, rtol=1e-10, atol=1e-12, msg=lambda m: f"{mode}: {m}")
        if mode != "local_rows":
            assert (out[mode]["grads"] - authors).norm() / authors.norm() > 0.1, mode
    images, texts = _global_batch()
    single = []
    for mode in GLOBAL_LOSS_GRADIENTS:
        img, txt = images.clone().requires_grad_(), texts.clone().requires_grad_()
        global_contrastive_loss(img, txt, torch.tensor(2.0, dtype=torch.float64), gradient=mode).backward()
        single.append(torch.cat([img.grad, txt.grad], 1))
    torch.testing.assert_close(single[0], single[1], rtol=0, atol=0)
    torch.testing.assert_close(single[0], single[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_loss_gradient must be one of"):
        BetaCLIPConfig(global_loss_gradient="rows")
    assert BetaCLIPConfig(global_loss_gather_with_grad=True).global_loss_gradient == "all"  # the old boolean
