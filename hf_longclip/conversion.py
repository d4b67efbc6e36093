"""Convert the authors' released checkpoints (``.pt`` files) to hf_longclip models: Long-CLIP, FineLIP (with its
token-aggregation heads) and beta-CLIP (timm image tower, pooling block). Files are read with
``torch.load(weights_only=True)``; the two text position tables are merged into one. See docs/longclip.md
(Converting the authors' checkpoints)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import zipfile

import torch

from .models.configuration_longclip import CLIP_CONTEXT_LENGTH, LongCLIPConfig, validate_stretch
from .models.modeling_longclip import LongCLIPModel
from .variants import get_variant

#: The authors' checkpoint layouts this module reads, by variant.
ORIGINAL_LAYOUTS = {
    "longclip": "OpenAI-CLIP keys with positional_embedding + positional_embedding_res (longclip-B.pt / -L.pt)",
    "finelip": "the Long-CLIP keys plus cross_net.aggr_net.* and cross_net.cap_aggr_net.* (*_finelip-B.pt)",
    "betaclip": "a timm ViT image tower (visual.blocks.*, fused qkv), a split-q/k/v text tower and "
    "text_conditioned_patches_block.* (the released checkpoint_*.pt)",
}

# OpenAI per-block names -> transformers CLIPEncoderLayer names (q/k/v are split separately).
_BLOCK_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# Tensors in some OpenAI-style files that are not weights (buffers, metadata) and are dropped.
_IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask", "mask1", "mask2"}


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original ``.pt`` checkpoint safely (``weights_only=True``) and return its flat state dict.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model`` (beta-CLIP's files also hold the
    training ``args``, an ``argparse.Namespace``, which is allowed as plain data); strips a DDP ``module.`` prefix.
    Anything else that is not a tensor, a number or a container of them is refused, never executed.
    """
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} was refused: it holds Python objects that safe (weights_only) loading does not allow, and "
            f"nothing in it was run. {str(error).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or not a .pt file): {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def detect_original_variant(state: dict[str, torch.Tensor]) -> str:
    """Which authors' layout a state dict has (see `ORIGINAL_LAYOUTS`); `ValueError` naming keys otherwise."""
    if any(k.startswith("text_conditioned_patches_block.") for k in state) or "visual.patch_embed.proj.weight" in state:
        return "betaclip"
    if "visual.conv1.weight" in state and "token_embedding.weight" in state:
        if any(k.startswith("cross_net.") for k in state):
            return "finelip"
        return "longclip"
    sample = ", ".join(sorted(state)[:6])
    raise ValueError(
        f"unrecognised checkpoint layout (keys such as {sample}); known layouts: "
        + "; ".join(f"{name}: {description}" for name, description in ORIGINAL_LAYOUTS.items())
    )


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def _vision_geometry(state: dict[str, torch.Tensor]) -> dict:
    """Width, patch, grid, layers and MLP width of the image tower (OpenAI CLIP or timm ViT keys)."""
    if "visual.conv1.weight" in state:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        positions = state["visual.positional_embedding"].shape[0]
        layers = _count_blocks(state, "visual.transformer.resblocks.")
        intermediate = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    elif "visual.patch_embed.proj.weight" in state:
        width, _, patch, _ = state["visual.patch_embed.proj.weight"].shape
        positions = state["visual.pos_embed"].shape[-2]
        layers = _count_blocks(state, "visual.blocks.")
        intermediate = state["visual.blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise ValueError("only ViT image towers are supported (no visual.conv1.weight / visual.patch_embed.proj.weight)")
    grid = int(round(math.sqrt(positions - 1)))
    return {"width": width, "patch": patch, "image_size": grid * patch, "layers": layers, "intermediate": intermediate}


def config_from_original(
    state: dict[str, torch.Tensor],
    position_keep: int = 20,
    text_num_heads: int | None = None,
    vision_num_heads: int | None = None,
    config_class: type[LongCLIPConfig] = LongCLIPConfig,
    **overrides,
) -> LongCLIPConfig:
    """Infer a config from the tensor shapes of an original checkpoint (ViT image towers only).

    The head counts are not stored in the file; OpenAI's CLIPs use one head per 64 channels (8 / 12 / 16 for widths
    512 / 768 / 1024), which is the default. Pass `text_num_heads` / `vision_num_heads` for other models.
    """
    vision = _vision_geometry(state)
    text_width = state["ln_final.weight"].shape[0]
    text_num_heads = text_num_heads or text_width // 64
    vision_num_heads = vision_num_heads or vision["width"] // 64
    for tower, width, heads in (("text", text_width, text_num_heads), ("vision", vision["width"], vision_num_heads)):
        if heads < 1 or width % heads:
            raise ValueError(
                f"cannot infer the {tower} tower's attention heads from width {width}; pass {tower}_num_heads"
            )
    vocab = state["token_embedding.weight"].shape[0]
    table = state.get("positional_embedding_res", state["positional_embedding"])
    rows = table.shape[0]
    source = overrides.pop("source_max_position_embeddings", CLIP_CONTEXT_LENGTH)
    ratio = overrides.pop("position_ratio", None)
    if ratio is None:
        if (rows - position_keep) % (source - position_keep):
            raise ValueError(
                f"a {rows}-row position table is not a stretch of {source} rows with keep={position_keep}"
            )
        ratio = (rows - position_keep) // (source - position_keep)
    validate_stretch(source, position_keep, ratio, target_length=rows)
    projection_dim = state["text_projection"].shape[1]
    text_block = "transformer.resblocks.0.mlp.c_fc.weight"
    return config_class(
        text_config=dict(
            vocab_size=vocab,
            # OpenAI's BPE puts <|startoftext|> and <|endoftext|> last (49406, 49407); pooling looks for the latter.
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            hidden_size=text_width,
            intermediate_size=state[text_block].shape[0],
            num_hidden_layers=_count_blocks(state, "transformer.resblocks."),
            num_attention_heads=text_num_heads,
            max_position_embeddings=rows,
            projection_dim=projection_dim,
        ),
        vision_config=dict(
            hidden_size=vision["width"],
            intermediate_size=vision["intermediate"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision_num_heads,
            image_size=vision["image_size"],
            patch_size=vision["patch"],
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
        source_max_position_embeddings=source,
        position_keep=position_keep,
        position_ratio=ratio,
        **overrides,
    )


def _convert_block(src: dict, dst: dict, src_prefix: str, dst_prefix: str, blocks: int) -> None:
    """OpenAI blocks -> CLIPEncoderLayer keys; attention either fused (``in_proj``) or already split (beta-CLIP)."""
    for i in range(blocks):
        s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
        for suffix in ("weight", "bias"):
            if f"{s}attn.in_proj_{suffix}" in src:
                q, k, v = src[f"{s}attn.in_proj_{suffix}"].chunk(3, dim=0)
            else:
                q, k, v = (src[f"{s}attn.{x}_proj.{suffix}"] for x in ("q", "k", "v"))
            dst[f"{d}self_attn.q_proj.{suffix}"] = q
            dst[f"{d}self_attn.k_proj.{suffix}"] = k
            dst[f"{d}self_attn.v_proj.{suffix}"] = v
            for old, new in _BLOCK_RENAMES.items():
                dst[f"{d}{new}.{suffix}"] = src[f"{s}{old}.{suffix}"]


def _text_state(state: dict[str, torch.Tensor], config: LongCLIPConfig) -> dict[str, torch.Tensor]:
    """The text tower (two position tables merged), the text projection and ``logit_scale``."""
    keep, rows = config.position_keep, config.text_config.max_position_embeddings
    frozen = state["positional_embedding"]
    trained = state.get("positional_embedding_res")
    for name, table in (("positional_embedding", frozen), ("positional_embedding_res", trained)):
        if table is not None and table.shape[0] != rows:
            raise ValueError(
                f"{name} has {table.shape[0]} rows; expected the configured {rows} "
                f"(a {config.source_max_position_embeddings}-row stock table must be stretched with from_clip)"
            )
    merged = frozen if trained is None else torch.cat([frozen[:keep], trained[keep:]], dim=0)
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": merged,
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    _convert_block(state, out, "transformer.resblocks.", "text_model.encoder.layers.", config.text_config.num_hidden_layers)
    return out


def _openai_vision_state(state: dict[str, torch.Tensor], config: LongCLIPConfig) -> dict[str, torch.Tensor]:
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
    }
    _convert_block(
        state, out, "visual.transformer.resblocks.", "vision_model.encoder.layers.", config.vision_config.num_hidden_layers
    )
    return out


# timm ViT block names -> transformers CLIPEncoderLayer names (the fused qkv is split separately).
_TIMM_BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                       "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _timm_vision_state(state: dict[str, torch.Tensor], config: LongCLIPConfig) -> dict[str, torch.Tensor]:
    """beta-CLIP's timm ``vit_*_clip_*.openai`` image tower (CLS pooled after ``norm``) and ``image_projection``."""
    if "visual.patch_embed.proj.bias" in state:
        raise ValueError("the timm image tower has a patch-embedding bias, which CLIP's image tower does not")
    out = {
        "vision_model.embeddings.class_embedding": state["visual.cls_token"].reshape(-1),
        "vision_model.embeddings.patch_embedding.weight": state["visual.patch_embed.proj.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.pos_embed"].reshape(
            -1, state["visual.pos_embed"].shape[-1]
        ),
        "vision_model.pre_layrnorm.weight": state["visual.norm_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.norm_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.norm.weight"],
        "vision_model.post_layernorm.bias": state["visual.norm.bias"],
        "visual_projection.weight": state["image_projection"].t(),
    }
    for i in range(config.vision_config.num_hidden_layers):
        s, d = f"visual.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        for suffix in ("weight", "bias"):
            q, k, v = state[f"{s}attn.qkv.{suffix}"].chunk(3, dim=0)
            out[f"{d}self_attn.q_proj.{suffix}"] = q
            out[f"{d}self_attn.k_proj.{suffix}"] = k
            out[f"{d}self_attn.v_proj.{suffix}"] = v
            for old, new in _TIMM_BLOCK_RENAMES.items():
                out[f"{d}{new}.{suffix}"] = state[f"{s}{old}.{suffix}"]
    return out


def convert_original_state_dict(state: dict[str, torch.Tensor], config: LongCLIPConfig) -> dict[str, torch.Tensor]:
    """Rename an original Long-CLIP state dict to `LongCLIPModel` keys, merging the two position tables."""
    out = {**_text_state(state, config), **_openai_vision_state(state, config)}
    return {k: v.contiguous() for k, v in out.items()}


# The authors' TokenAggregation is ``weight = Sequential(LayerNorm, Linear, GELU, Linear)`` plus ``scale``.
_AGGREGATION_RENAMES = {"weight.0": "norm", "weight.1": "fc1", "weight.3": "fc2"}
_FINELIP_HEADS = {"cross_net.aggr_net.": "image_aggregation.", "cross_net.cap_aggr_net.": "text_aggregation."}


def _finelip_head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, missing = {}, []
    for source, target in _FINELIP_HEADS.items():
        for old, new in _AGGREGATION_RENAMES.items():
            for suffix in ("weight", "bias"):
                key = f"{source}{old}.{suffix}"
                if key in state:
                    out[f"{target}{new}.{suffix}"] = state[key]
                else:
                    missing.append(key)
        if f"{source}scale" in state:
            out[f"{target}scale"] = state[f"{source}scale"]
        else:
            missing.append(f"{source}scale")
    if missing:
        raise ValueError(f"the FineLIP checkpoint lacks token-aggregation head tensors: {', '.join(missing)}")
    return out


def _finelip_fields(state: dict[str, torch.Tensor]) -> dict:
    """FineLIP head sizes read from the checkpoint (aggregated tokens per head, the scoring MLP's width)."""
    fc1 = state["cross_net.aggr_net.weight.1.weight"]
    hidden, dim = fc1.shape
    ratio = hidden / dim
    if max(1, int(dim * ratio)) != hidden:
        raise ValueError(f"cannot express a {dim} -> {hidden} aggregation MLP as a hidden ratio")
    if state["cross_net.cap_aggr_net.weight.1.weight"].shape != fc1.shape:
        raise ValueError("the image and caption aggregation heads have different widths, which FineLIPModel does not hold")
    return {
        "num_image_aggregated_tokens": state["cross_net.aggr_net.weight.3.weight"].shape[0],
        "num_text_aggregated_tokens": state["cross_net.cap_aggr_net.weight.3.weight"].shape[0],
        "aggregation_hidden_ratio": ratio,
    }


_POOLER_RENAMES = {"attn.in_proj_weight": "attn.in_proj_weight", "attn.in_proj_bias": "attn.in_proj_bias",
                   "attn.out_proj.weight": "attn.out_proj.weight", "attn.out_proj.bias": "attn.out_proj.bias",
                   "ln_2.weight": "layer_norm.weight", "ln_2.bias": "layer_norm.bias",
                   "mlp.c_fc.weight": "fc1.weight", "mlp.c_fc.bias": "fc1.bias",
                   "mlp.c_proj.weight": "fc2.weight", "mlp.c_proj.bias": "fc2.bias", "logit_scale": "logit_scale"}
#: beta-CLIP tensors of options the released models do not use (diversity temperatures): left out, and said so.
_BETA_UNUSED = ("logit_scale_tci_diversity",)


def _betaclip_head_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "text_conditioned_patches_block."
    if any(k.startswith(prefix + "ln_q") for k in state):
        raise ValueError("the checkpoint's pooling block normalises q/k/v (use_layer_norm), which the model does not")
    missing = [prefix + old for old in _POOLER_RENAMES if prefix + old not in state]
    if missing:
        raise ValueError(f"the beta-CLIP checkpoint lacks pooling-block tensors: {', '.join(missing)}")
    return {f"text_conditioned_pooler.{new}": state[prefix + old].reshape(()) if old == "logit_scale"
            else state[prefix + old] for old, new in _POOLER_RENAMES.items()}


def _betaclip_fields(state: dict[str, torch.Tensor]) -> dict:
    c_fc = state["text_conditioned_patches_block.mlp.c_fc.weight"]
    return {"pooler_mlp_ratio": c_fc.shape[0] / c_fc.shape[1]}


def convert_original_checkpoint(
    path: str | os.PathLike,
    variant: str | None = None,
    position_keep: int = 20,
    text_num_heads: int | None = None,
    vision_num_heads: int | None = None,
    progress: bool = True,
    **config_overrides,
) -> LongCLIPModel:
    """Load one of the authors' ``.pt`` files as the matching model (fp32), ready for `save_pretrained`.

    Args:
        path: the checkpoint (read with ``weights_only=True``).
        variant: a key of `ORIGINAL_LAYOUTS` (the variant whose released checkpoints the file is); inferred from the
            keys when None. A checkpoint of another layout raises `ValueError`.
        position_keep: leading position rows the authors kept frozen (20).
        text_num_heads, vision_num_heads: head counts, when ``width // 64`` (OpenAI's rule) does not give them.
        progress: show a tqdm bar (``converting``, one step per tensor) over the per-tensor work: each renamed
            tensor is cast to fp32 and made contiguous once (a large checkpoint takes a while).
        config_overrides: config fields of the variant (e.g. ``beta_cal_mode="bce"`` for beta-CLIP's BCE model).

    Every tensor of the file is used, except the position-table halves the authors never read and, for beta-CLIP,
    the temperatures of its unused diversity terms; anything else unexpected raises `ValueError` naming it.

    Example:

    ```python
    >>> from hf_longclip.conversion import convert_original_checkpoint
    >>> model = convert_original_checkpoint("checkpoints/longclip-B.pt")
    >>> model.save_pretrained("longclip-base-patch16")
    ```
    """
    state = load_original_state_dict(path)
    found = detect_original_variant(state)
    if variant is not None and variant != found:
        if variant not in ORIGINAL_LAYOUTS:
            raise ValueError(f"no converter for {variant!r}; known layouts: {', '.join(ORIGINAL_LAYOUTS)}")
        raise ValueError(f"{path} holds a {found} checkpoint ({ORIGINAL_LAYOUTS[found]}), not a {variant} one")
    # Only shapes are read until the renamed tensors are cast (below), so the file's dtype is kept until then.
    state = {k: v for k, v in state.items() if k.split(".")[0] not in _IGNORED and k not in _IGNORED}
    model_class = get_variant(found).model_class
    unknown = set(config_overrides) - model_class.variant_config_fields() - {"source_max_position_embeddings", "position_ratio"}
    if unknown:
        raise TypeError(f"{model_class.config_class.__name__} has no fields {sorted(unknown)}")
    if found == "finelip":
        config_overrides = {**_finelip_fields(state), **config_overrides}
    elif found == "betaclip":
        config_overrides = {**_betaclip_fields(state), **config_overrides}
    config = config_from_original(
        state, position_keep, text_num_heads=text_num_heads, vision_num_heads=vision_num_heads,
        config_class=model_class.config_class, **config_overrides,
    )
    converted = _text_state(state, config)
    if found == "betaclip":
        converted.update(_timm_vision_state(state, config), **_betaclip_head_state(state))
        used_prefixes = ("visual.", "text_conditioned_patches_block.", "image_projection")
    else:
        converted.update(_openai_vision_state(state, config))
        if found == "finelip":
            converted.update(_finelip_head_state(state))
        used_prefixes = ("visual.", "cross_net.")
    leftovers = sorted(
        k for k in state
        if not k.startswith(("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                             "logit_scale", *used_prefixes))
        and not k.startswith(_BETA_UNUSED)
    )
    if leftovers:
        raise ValueError(f"{path} holds tensors the {found} converter does not know: {', '.join(leftovers[:8])}")
    state.clear()  # `converted` now holds the only references to the file's tensors
    weights = _cast_tensors(converted, progress)
    model = model_class(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion to {model_class.__name__} left missing {missing[:8]} / unexpected {unexpected[:8]}")
    return model.eval()


def _cast_tensors(tensors: dict[str, torch.Tensor], progress: bool) -> dict[str, torch.Tensor]:
    """Every tensor as contiguous fp32, one at a time through a tqdm bar (when `progress`). The input dict is emptied
    as it goes, so each source tensor can be freed once cast (a half-precision file and its fp32 copy are not both
    held in full)."""
    from tqdm.auto import tqdm

    out = {}
    with tqdm(total=len(tensors), desc="converting", unit="tensor", disable=not progress) as bar:
        for key in list(tensors):
            out[key] = tensors.pop(key).float().contiguous()
            bar.update(1)
    return out


__all__ = [
    "ORIGINAL_LAYOUTS",
    "config_from_original",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "detect_original_variant",
    "load_original_state_dict",
]
