"""Convert the authors' original Long-CLIP checkpoints (OpenAI-CLIP-style ``.pt`` files) to `LongCLIPModel`.

Files are read with ``torch.load(weights_only=True)`` and the two text position tables are merged into one.
See docs/longclip.md (Converting the authors' checkpoints).
"""

from __future__ import annotations

import math
import os
import re

import torch

from .models.configuration_longclip import CLIP_CONTEXT_LENGTH, LongCLIPConfig, validate_stretch
from .models.modeling_longclip import LongCLIPModel

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

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``; strips a DDP ``module.`` prefix.
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state for m in [pattern.match(k)] if m}
    return max(indices) + 1 if indices else 0


def config_from_original(
    state: dict[str, torch.Tensor],
    position_keep: int = 20,
    text_num_heads: int | None = None,
    vision_num_heads: int | None = None,
    **overrides,
) -> LongCLIPConfig:
    """Infer a `LongCLIPConfig` from the tensor shapes of an original checkpoint (ViT image towers only).

    The head counts are not stored in the file; OpenAI's CLIPs use one head per 64 channels (8 / 12 / 16 for widths
    512 / 768 / 1024), which is the default. Pass `text_num_heads` / `vision_num_heads` for other models.
    """
    if "visual.conv1.weight" not in state:
        raise ValueError("only ViT image towers are supported (no visual.conv1.weight in the checkpoint)")
    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = int(round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1)))
    text_width = state["ln_final.weight"].shape[0]
    text_num_heads = text_num_heads or text_width // 64
    vision_num_heads = vision_num_heads or vision_width // 64
    for tower, width, heads in (("text", text_width, text_num_heads), ("vision", vision_width, vision_num_heads)):
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
    return LongCLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            # OpenAI's BPE puts <|startoftext|> and <|endoftext|> last (49406, 49407); pooling looks for the latter.
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            hidden_size=text_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_blocks(state, "transformer.resblocks."),
            num_attention_heads=text_num_heads,
            max_position_embeddings=rows,
            projection_dim=state["text_projection"].shape[1],
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_count_blocks(state, "visual.transformer.resblocks."),
            num_attention_heads=vision_num_heads,
            image_size=grid * patch,
            patch_size=patch,
            projection_dim=state["text_projection"].shape[1],
        ),
        projection_dim=state["text_projection"].shape[1],
        source_max_position_embeddings=source,
        position_keep=position_keep,
        position_ratio=ratio,
        **overrides,
    )


def _convert_block(src: dict, dst: dict, src_prefix: str, dst_prefix: str, blocks: int) -> None:
    for i in range(blocks):
        s, d = f"{src_prefix}{i}.", f"{dst_prefix}{i}."
        for suffix in ("weight", "bias"):
            q, k, v = src[f"{s}attn.in_proj_{suffix}"].chunk(3, dim=0)
            dst[f"{d}self_attn.q_proj.{suffix}"] = q
            dst[f"{d}self_attn.k_proj.{suffix}"] = k
            dst[f"{d}self_attn.v_proj.{suffix}"] = v
            for old, new in _BLOCK_RENAMES.items():
                dst[f"{d}{new}.{suffix}"] = src[f"{s}{old}.{suffix}"]


def convert_original_state_dict(state: dict[str, torch.Tensor], config: LongCLIPConfig) -> dict[str, torch.Tensor]:
    """Rename an original Long-CLIP state dict to `LongCLIPModel` keys, merging the two position tables."""
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
    out: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": merged,
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    _convert_block(state, out, "transformer.resblocks.", "text_model.encoder.layers.", config.text_config.num_hidden_layers)
    _convert_block(
        state, out, "visual.transformer.resblocks.", "vision_model.encoder.layers.", config.vision_config.num_hidden_layers
    )
    return {k: v.contiguous() for k, v in out.items()}


def convert_original_checkpoint(
    path: str | os.PathLike,
    position_keep: int = 20,
    text_num_heads: int | None = None,
    vision_num_heads: int | None = None,
    **config_overrides,
) -> LongCLIPModel:
    """Load an original Long-CLIP ``.pt`` file as a `LongCLIPModel` (fp32), ready for `save_pretrained`.

    Example:

    ```python
    >>> from hf_longclip.conversion import convert_original_checkpoint
    >>> model = convert_original_checkpoint("checkpoints/longclip-B.pt")
    >>> model.save_pretrained("longclip-base-patch16")
    ```
    """
    state = load_original_state_dict(path)
    known = {k for k in state if k.split(".")[0] not in _IGNORED and k not in _IGNORED}
    config = config_from_original(
        state, position_keep, text_num_heads=text_num_heads, vision_num_heads=vision_num_heads, **config_overrides
    )
    converted = convert_original_state_dict({k: state[k].float() for k in known}, config)
    model = LongCLIPModel(config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


__all__ = [
    "config_from_original",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "load_original_state_dict",
]
