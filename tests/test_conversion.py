"""Conversion of the authors' released checkpoints: Long-CLIP (OpenAI layout), FineLIP (with its aggregation heads)
and beta-CLIP (timm image tower, pooling block). The authors' layouts are written here from random tensors, and the
converted models are checked against forwards computed straight from those tensors."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from hf_longclip import BetaCLIPModel, FineLIPModel, LongCLIPModel, stretch_position_embeddings
from hf_longclip.cli import main
from hf_longclip.conversion import convert_original_checkpoint, detect_original_variant
from hf_longclip.models.losses_finelip import clim_scores
from hf_longclip.testing_utils import tiny_clip, tiny_processor


# ---------------------------------------------------------------------------------------------- Long-CLIP
def _to_openai_layout(model: LongCLIPModel, keep: int) -> dict:
    """Write a LongCLIPModel's weights in the authors' OpenAI-style layout with two position tables."""
    sd = model.state_dict()
    out = {}
    for tower, src, dst in (("text", "text_model.encoder.layers.", "transformer.resblocks."),
                            ("vision", "vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        n = model.config.text_config.num_hidden_layers if tower == "text" else model.config.vision_config.num_hidden_layers
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for suffix in ("weight", "bias"):
                out[f"{d}attn.in_proj_{suffix}"] = torch.cat(
                    [sd[f"{s}self_attn.{x}_proj.{suffix}"] for x in ("q", "k", "v")]
                )
                out[f"{d}attn.out_proj.{suffix}"] = sd[f"{s}self_attn.out_proj.{suffix}"]
                out[f"{d}ln_1.{suffix}"] = sd[f"{s}layer_norm1.{suffix}"]
                out[f"{d}ln_2.{suffix}"] = sd[f"{s}layer_norm2.{suffix}"]
                out[f"{d}mlp.c_fc.{suffix}"] = sd[f"{s}mlp.fc1.{suffix}"]
                out[f"{d}mlp.c_proj.{suffix}"] = sd[f"{s}mlp.fc2.{suffix}"]
    table = sd["text_model.embeddings.position_embedding.weight"]
    res = table.clone()
    res[:keep] = 123.0  # dead rows of the trained table: must not leak into the merged table
    frozen = table.clone()
    frozen[keep:] = -55.0  # unused rows of the frozen table
    out.update(
        {
            "positional_embedding": frozen,
            "positional_embedding_res": res,
            "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "ln_final.weight": sd["text_model.final_layer_norm.weight"],
            "ln_final.bias": sd["text_model.final_layer_norm.bias"],
            "text_projection": sd["text_projection.weight"].t().contiguous(),
            "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
            "visual.proj": sd["visual_projection.weight"].t().contiguous(),
            "logit_scale": sd["logit_scale"],
            "mask1": torch.zeros(248, 1),
            "mask2": torch.ones(248, 1),
        }
    )
    return out


def _reference_text_features(state, ids, heads):
    """OpenAI-CLIP text forward written with torch's MultiheadAttention straight from the original layout."""
    x = state["token_embedding.weight"][ids]
    frozen, res = state["positional_embedding"], state["positional_embedding_res"]
    mask1 = torch.zeros(frozen.shape[0], 1)
    mask1[:20] = 1
    x = x + (frozen * mask1 + res * (1 - mask1))[: ids.shape[1]]
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"transformer.resblocks.{i}."
        width = x.shape[-1]
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.in_proj_weight.data = state[p + "attn.in_proj_weight"]
        attn.in_proj_bias.data = state[p + "attn.in_proj_bias"]
        attn.out_proj.weight.data = state[p + "attn.out_proj.weight"]
        attn.out_proj.bias.data = state[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x, (x.shape[-1],), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ state["text_projection"]


def test_convert_original_checkpoint(tmp_path):
    processor = tiny_processor()
    source = LongCLIPModel.from_clip(tiny_clip(seed=5, processor=processor))
    with torch.no_grad():  # make rows >= 20 differ from a plain stretch, as after training
        source.text_model.embeddings.position_embedding.weight[20:] += 0.05 * torch.randn(228, 32)
    state = _to_openai_layout(source, keep=20)
    path = tmp_path / "longclip-tiny.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="text_num_heads"):  # width 32: heads cannot be inferred as width // 64
        convert_original_checkpoint(path)
    model = convert_original_checkpoint(path, text_num_heads=4, vision_num_heads=4)
    assert model.config.text_config.max_position_embeddings == 248
    assert model.config.vision_config.image_size == 32 and model.config.vision_config.patch_size == 8
    merged = model.text_model.embeddings.position_embedding.weight
    assert torch.equal(merged[:20], state["positional_embedding"][:20])
    assert torch.equal(merged[20:], state["positional_embedding_res"][20:])
    ids = processor(text=["a large red circle next to a small blue square " * 8, "a cat"], return_tensors="pt")
    with torch.no_grad():
        ours = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        reference = _reference_text_features(state, ids["input_ids"], heads=4)
    # the reference pools with argmax(ids): EOT has the largest id in this vocabulary, as in CLIP's
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), source.encode_image(pixels), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").exists()


def test_convert_rejects_wrong_table_size(tmp_path):
    source = LongCLIPModel.from_clip(tiny_clip(seed=5))
    state = _to_openai_layout(source, keep=20)
    state["positional_embedding_res"] = state["positional_embedding_res"][:100]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="100"):
        convert_original_checkpoint(tmp_path / "bad.pt", text_num_heads=4, vision_num_heads=4)


def test_convert_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint carrying an arbitrary object is rejected, not executed."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        convert_original_checkpoint(tmp_path / "evil.pt")
    assert stretch_position_embeddings(torch.randn(77, 2)).shape == (248, 2)


# ---------------------------------------------------------------------------------------------- FineLIP
def _authors_aggregation(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    """The authors' TokenAggregation forward, straight from their tensors: LayerNorm, Linear, GELU, Linear, scale,
    softmax over the tokens, mixture of the raw tokens."""
    h = F.layer_norm(x, (x.shape[-1],), state[prefix + "weight.0.weight"], state[prefix + "weight.0.bias"])
    h = F.gelu(F.linear(h, state[prefix + "weight.1.weight"], state[prefix + "weight.1.bias"]))
    h = F.linear(h, state[prefix + "weight.3.weight"], state[prefix + "weight.3.bias"])
    weights = (h.transpose(2, 1) * state[prefix + "scale"]).softmax(dim=2)
    return torch.bmm(weights, x)


def _finelip_layout(seed: int = 6, tokens: int = 5) -> dict:
    """A FineLIP checkpoint in the authors' layout: the Long-CLIP keys plus random cross_net heads."""
    source = LongCLIPModel.from_clip(tiny_clip(seed=seed, processor=tiny_processor()))
    state = _to_openai_layout(source, keep=20)
    generator = torch.Generator().manual_seed(seed)
    dim, hidden = 16, int(16 * 0.2)
    for head in ("aggr_net", "cap_aggr_net"):
        p = f"cross_net.{head}."
        state.update({
            p + "weight.0.weight": 1 + 0.1 * torch.randn(dim, generator=generator),
            p + "weight.0.bias": 0.1 * torch.randn(dim, generator=generator),
            p + "weight.1.weight": torch.randn(hidden, dim, generator=generator) / dim**0.5,
            p + "weight.1.bias": 0.1 * torch.randn(hidden, generator=generator),
            p + "weight.3.weight": torch.randn(tokens, hidden, generator=generator) / hidden**0.5,
            p + "weight.3.bias": 0.1 * torch.randn(tokens, generator=generator),
            p + "scale": torch.full((1, 1, 1), 1.7),
        })
    return state


def test_convert_finelip_checkpoint_keeps_the_aggregation_heads(tmp_path):
    state = _finelip_layout()
    torch.save(state, tmp_path / "exp_128_epoch_6_finelip-B.pt")
    assert detect_original_variant(state) == "finelip"
    model = convert_original_checkpoint(tmp_path / "exp_128_epoch_6_finelip-B.pt", text_num_heads=4, vision_num_heads=4)
    assert type(model) is FineLIPModel
    assert model.config.image_aggregation_size == 5 and model.config.text_aggregation_size == 5
    torch.testing.assert_close(model.logit_scale, state["logit_scale"].reshape(()))  # the authors' value, kept
    processor = tiny_processor()
    ids = processor(text=["a large red circle next to a small blue square", "a cat on a chair"], return_tensors="pt",
                    padding=True)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls, image_tokens, _ = model.image_token_set(pixels)
        patches = model.visual_projection(model.vision_model.post_layernorm(model.vision_model(pixels).last_hidden_state))
        expected = F.normalize(torch.cat([patches[:, :1], _authors_aggregation(patches[:, 1:], state,
                                                                                  "cross_net.aggr_net.")], 1), dim=-1)
        torch.testing.assert_close(image_tokens, expected, rtol=1e-5, atol=1e-6)
        _, text_tokens, mask, _ = model.text_token_set(ids["input_ids"], ids["attention_mask"])
        words = model.text_projection(model.text_model(**ids).last_hidden_state)
        eot = ids["attention_mask"].sum(-1) - 1
        rows = torch.arange(2)
        for row in rows:  # the authors aggregate each caption's [0, EOT) tokens
            span = words[row : row + 1, : eot[row]]
            aggregated = _authors_aggregation(span, state, "cross_net.cap_aggr_net.")
            reference = F.normalize(torch.cat([aggregated, words[row : row + 1, eot[row]][:, None]], 1), dim=-1)
            torch.testing.assert_close(text_tokens[row : row + 1], reference, rtol=1e-5, atol=1e-6)
        fused = model.retrieval_scores(model.retrieval_image_features(pixels, "fused"),
                                       model.retrieval_text_features(ids["input_ids"], ids["attention_mask"], "fused"),
                                       "fused")
        text_refs = torch.cat([F.normalize(torch.cat([_authors_aggregation(words[r : r + 1, : eot[r]], state,
                                                                           "cross_net.cap_aggr_net."),
                                                      words[r : r + 1, eot[r]][:, None]], 1), dim=-1) for r in rows])
        cosine = F.normalize(cls, dim=-1) @ F.normalize(model.get_text_features(**ids).pooler_output, dim=-1).t()
        expected_fused = 0.8 * cosine + 0.2 * clim_scores(text_refs, expected, negative_slope=0.1)
        torch.testing.assert_close(fused, expected_fused, rtol=1e-5, atol=1e-6)


def test_convert_finelip_with_missing_head_tensors_names_them(tmp_path):
    state = _finelip_layout()
    del state["cross_net.cap_aggr_net.scale"], state["cross_net.aggr_net.weight.3.bias"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks token-aggregation head tensors: .*aggr_net\.weight\.3\.bias.*scale"):
        convert_original_checkpoint(tmp_path / "partial.pt", text_num_heads=4, vision_num_heads=4)


# ---------------------------------------------------------------------------------------------- beta-CLIP
def _betaclip_layout(seed: int = 9, vocab: int = 64) -> dict:
    """A beta-CLIP checkpoint in the authors' layout, all random: a timm ViT image tower (fused qkv, no patch bias,
    norm_pre / norm), an OpenAI text tower with q/k/v already split, two position tables, the pooling block and both
    temperatures, saved as the authors save it (with the training args)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=g)

    width, layers, dim = 16, 2, 16
    state = {
        "visual.cls_token": r(1, 1, width), "visual.pos_embed": r(1, 17, width),
        "visual.patch_embed.proj.weight": r(width, 3, 8, 8, scale=0.2),
        "visual.norm_pre.weight": 1 + r(width), "visual.norm_pre.bias": r(width),
        "visual.norm.weight": 1 + r(width), "visual.norm.bias": r(width),
        "image_projection": r(width, dim, scale=0.3), "text_projection": r(width, dim, scale=0.3),
        "token_embedding.weight": r(vocab, width, scale=0.5), "positional_embedding": r(248, width),
        "positional_embedding_res": r(248, width), "ln_final.weight": 1 + r(width), "ln_final.bias": r(width),
        "logit_scale": torch.tensor(4.3), "text_conditioned_patches_block.logit_scale": torch.tensor(3.1),
        "logit_scale_tci_diversity": torch.tensor(1.6),  # an unused option's temperature: left out
    }
    for i in range(layers):
        v, t = f"visual.blocks.{i}.", f"transformer.resblocks.{i}."
        state.update({v + "norm1.weight": 1 + r(width), v + "norm1.bias": r(width),
                      v + "attn.qkv.weight": r(3 * width, width, scale=0.3), v + "attn.qkv.bias": r(3 * width),
                      v + "attn.proj.weight": r(width, width, scale=0.3), v + "attn.proj.bias": r(width),
                      v + "norm2.weight": 1 + r(width), v + "norm2.bias": r(width),
                      v + "mlp.fc1.weight": r(4 * width, width, scale=0.3), v + "mlp.fc1.bias": r(4 * width),
                      v + "mlp.fc2.weight": r(width, 4 * width, scale=0.3), v + "mlp.fc2.bias": r(width)})
        for x in ("q", "k", "v", "out"):
            state.update({t + f"attn.{x}_proj.weight": r(width, width, scale=0.3), t + f"attn.{x}_proj.bias": r(width)})
        state.update({t + "ln_1.weight": 1 + r(width), t + "ln_1.bias": r(width), t + "ln_2.weight": 1 + r(width),
                      t + "ln_2.bias": r(width), t + "mlp.c_fc.weight": r(4 * width, width, scale=0.3),
                      t + "mlp.c_fc.bias": r(4 * width), t + "mlp.c_proj.weight": r(width, 4 * width, scale=0.3),
                      t + "mlp.c_proj.bias": r(width)})
    p = "text_conditioned_patches_block."
    state.update({p + "attn.in_proj_weight": r(3 * dim, dim, scale=0.3), p + "attn.in_proj_bias": r(3 * dim),
                  p + "attn.out_proj.weight": r(dim, dim, scale=0.3), p + "attn.out_proj.bias": r(dim),
                  p + "ln_2.weight": 1 + r(dim), p + "ln_2.bias": r(dim),
                  p + "mlp.c_fc.weight": r(4 * dim, dim, scale=0.3), p + "mlp.c_fc.bias": r(4 * dim),
                  p + "mlp.c_proj.weight": r(dim, 4 * dim, scale=0.3), p + "mlp.c_proj.bias": r(dim)})
    return state


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _reference_timm_cls(state: dict, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """A timm ``vit_*_clip_*.openai`` forward (global_pool='') from the raw tensors: the projected CLS."""
    x = F.conv2d(pixels, state["visual.patch_embed.proj.weight"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.cls_token"].expand(x.shape[0], -1, -1), x], 1) + state["visual.pos_embed"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), state["visual.norm_pre.weight"], state["visual.norm_pre.bias"])
    i = 0
    while f"visual.blocks.{i}.norm1.weight" in state:
        p = f"visual.blocks.{i}."
        h = F.layer_norm(x, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        q, k, v = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda z: z.view(z.shape[0], z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        attn = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(attn, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        x = x + F.linear(_quick_gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                         state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        i += 1
    x = F.layer_norm(x, (width,), state["visual.norm.weight"], state["visual.norm.bias"])
    return x[:, 0] @ state["image_projection"]


def _reference_split_text(state: dict, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """beta-CLIP's text forward (split q/k/v) from the raw tensors, through the OpenAI-layout reference."""
    fused = dict(state)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"transformer.resblocks.{i}.attn."
        for suffix in ("weight", "bias"):
            fused[p + f"in_proj_{suffix}"] = torch.cat([state[p + f"{x}_proj.{suffix}"] for x in ("q", "k", "v")])
        i += 1
    return _reference_text_features(fused, ids, heads)


def _reference_pooler(state: dict, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The authors' AttentionPoolingMLPBlock from the raw tensors (L2-normalised inputs, no pre-norm)."""
    p = "text_conditioned_patches_block."
    dim = queries.shape[-1]
    attention = torch.nn.MultiheadAttention(dim, 8, batch_first=True)
    with torch.no_grad():
        attention.in_proj_weight.copy_(state[p + "attn.in_proj_weight"])
        attention.in_proj_bias.copy_(state[p + "attn.in_proj_bias"])
        attention.out_proj.weight.copy_(state[p + "attn.out_proj.weight"])
        attention.out_proj.bias.copy_(state[p + "attn.out_proj.bias"])
    kv = F.normalize(keys, dim=-1)
    out = attention(F.normalize(queries, dim=-1), kv, kv, need_weights=False)[0]
    h = F.layer_norm(out, (dim,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
    return out + F.linear(_quick_gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])),
                          state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])


def test_convert_betaclip_checkpoint_from_the_authors_layout(tmp_path):
    state = _betaclip_layout()
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"epoch": 10, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc1": 0.5,
                "args": argparse.Namespace(model="CLIP_VITB16_OPENAI", beta=0.5)}, path)  # as their trainer saves it
    model = convert_original_checkpoint(path, text_num_heads=4, vision_num_heads=4, beta_cal_mode="bce")
    assert type(model) is BetaCLIPModel and model.config.beta_cal_mode == "bce"
    assert model.config.vision_config.image_size == 32 and model.config.vision_config.patch_size == 8
    torch.testing.assert_close(model.logit_scale, torch.tensor(4.3))  # both temperatures are the authors'
    torch.testing.assert_close(model.text_conditioned_pooler.logit_scale, torch.tensor(3.1))
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[62, 5, 9, 17, 63, 0, 0], [62, 40, 3, 22, 8, 30, 63]])  # EOT = the largest id, as OpenAI's
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   _reference_timm_cls(state, pixels, heads=4), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output,
                                   _reference_split_text(state, ids, heads=4), rtol=1e-5, atol=1e-6)
        queries, keys = torch.randn(2, 5, 16), torch.randn(2, 16, 16)
        torch.testing.assert_close(model.text_conditioned_pooler(queries, keys), _reference_pooler(state, queries, keys),
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_unrecognised_layout_names_keys_and_the_known_variants(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"unrecognised checkpoint layout \(keys such as decoder\.bias, encoder\.weight\)"
                                         r".*longclip.*finelip.*betaclip"):
        convert_original_checkpoint(tmp_path / "other.pt")


def test_wrong_variant_truncated_file_and_non_state_dicts_are_clear_errors(tmp_path):
    state = _finelip_layout()
    torch.save(state, tmp_path / "finelip.pt")
    with pytest.raises(ValueError, match="holds a finelip checkpoint .* not a betaclip one"):
        convert_original_checkpoint(tmp_path / "finelip.pt", variant="betaclip")
    data = (tmp_path / "finelip.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        convert_original_checkpoint(tmp_path / "truncated.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        convert_original_checkpoint(tmp_path / "list.pt")
    # the CLI writes nothing when the conversion fails
    processor_dir = tmp_path / "processor"
    tiny_processor().save_pretrained(processor_dir)
    for bad, variant in (("truncated.pt", None), ("finelip.pt", "betaclip")):
        output = tmp_path / f"out-{bad}"
        argv = ["convert", "--checkpoint", str(tmp_path / bad), "--output", str(output), "--processor-dir",
                str(processor_dir), "--text-heads", "4", "--vision-heads", "4"]
        assert main(argv + (["--variant", variant] if variant else [])) == 1
        assert not output.exists()


def test_cli_converts_a_betaclip_checkpoint_with_config_fields(tmp_path):
    processor = tiny_processor(words=["a"])
    torch.save(_betaclip_layout(vocab=len(processor.tokenizer)), tmp_path / "checkpoint_10.pt")
    processor_dir = tmp_path / "processor"
    processor.save_pretrained(processor_dir)
    argv = ["convert", "--checkpoint", str(tmp_path / "checkpoint_10.pt"), "--output", str(tmp_path / "out"),
            "--processor-dir", str(processor_dir), "--text-heads", "4", "--vision-heads", "4"]
    assert main(argv + ["--set", "beta_cal_mod=bce"]) == 1 and not (tmp_path / "out").exists()  # misspelt field
    assert main(argv + ["--set", "beta_cal_mode=bce"]) == 0
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "out")
    assert type(model) is BetaCLIPModel and model.config.beta_cal_mode == "bce"


def test_conversion_progress_bar_and_half_precision_files(tmp_path, capsys):
    """progress=True shows a "converting" bar over the tensors on stderr, progress=False shows nothing; an fp16 file
    (cast only after renaming) converts to the same fp32 weights as the fp32 file."""
    source = LongCLIPModel.from_clip(tiny_clip(seed=7))
    state = _to_openai_layout(source, keep=20)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "half.pt")
    torch.save({k: v.half().float() for k, v in state.items()}, tmp_path / "full.pt")
    capsys.readouterr()
    half = convert_original_checkpoint(tmp_path / "half.pt", text_num_heads=4, vision_num_heads=4, progress=True)
    err = capsys.readouterr().err
    assert "converting" in err and "tensor" in err
    num_weights = len(half.state_dict())
    assert f"{num_weights}/{num_weights}" in err  # one step per converted tensor, all done
    full = convert_original_checkpoint(tmp_path / "full.pt", text_num_heads=4, vision_num_heads=4, progress=False)
    assert "converting" not in capsys.readouterr().err
    for key, value in full.state_dict().items():
        assert half.state_dict()[key].dtype == torch.float32, key
        assert half.state_dict()[key].is_contiguous(), key
        assert torch.equal(half.state_dict()[key], value), key
