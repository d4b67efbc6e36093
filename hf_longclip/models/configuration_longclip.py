"""Configuration of the Long-CLIP model (248-token text encoder on a CLIP backbone)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPTextConfig

#: Text context length of a stock CLIP text encoder.
CLIP_CONTEXT_LENGTH = 77
#: Text context length Long-CLIP stretches to (77 -> 248 with keep 20, ratio 4).
LONGCLIP_CONTEXT_LENGTH = 248
#: ``logit_scale`` Long-CLIP sets before fine-tuning a stock CLIP (the authors' ``--log_scale`` default, ln 100 rounded
#: to 4 decimals); fresh configs keep CLIP's ln(1 / 0.07).
LONGCLIP_LOGIT_SCALE = 4.6052


def stretched_length(source_length: int, keep: int, ratio: int) -> int:
    """Length of a position table stretched by knowledge-preserving stretching.

    ``keep`` rows are copied and each of the remaining ``source_length - keep`` rows becomes ``ratio`` rows
    (interpolated towards the next source row, the last one extrapolated), so the length is
    ``keep + ratio * (source_length - keep)``; 77 rows with keep 20, ratio 4 give 248.
    """
    validate_stretch(source_length, keep, ratio)
    return keep + ratio * (source_length - keep)


def validate_stretch(source_length: int, keep: int, ratio: int, target_length: int | None = None) -> None:
    """Raise ``ValueError`` for stretch settings the formula cannot realise (checked before any work)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative integer, got {keep!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio must be an integer >= 1, got {ratio!r}")
    if not isinstance(source_length, int) or source_length < 2:
        raise ValueError(f"source position table must have at least 2 rows, got {source_length!r}")
    if keep >= source_length:
        raise ValueError(
            f"keep ({keep}) must be smaller than the source position table length ({source_length}); "
            "nothing would be left to stretch"
        )
    if target_length is not None:
        producible = keep + ratio * (source_length - keep)
        if target_length != producible:
            raise ValueError(
                f"a {source_length}-row table stretched with keep={keep}, ratio={ratio} has {producible} rows, "
                f"not the requested {target_length}; the formula can only produce keep + ratio * (source - keep) rows"
            )


#: Fields that fix the shape of each tower: all at CLIP's defaults means the tower was built from no section at all.
_TOWER_SHAPE_FIELDS = {
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "vision_config": (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"
    ),
}


def _has_default_tower(config, section: str) -> bool:
    tower = getattr(config, section, None)
    if tower is None:
        return True
    default = type(tower)()
    return all(getattr(tower, name, None) == getattr(default, name, None) for name in _TOWER_SHAPE_FIELDS[section])


def check_saved_config(config_dict: dict, source: str = "config.json", config=None) -> list[str]:
    """Check the ``config.json`` dict of a saved hf_longclip model for sections and fields whose absence would build
    a quietly wrong model, since the config class fills in CLIP's defaults.

    transformers writes every field of both towers, so a missing one means the file was damaged or hand-edited.
    With `config` (the config object the model is built from, read from that file), a problem the object no longer
    has (the caller set the field) is not reported.

    Raises:
        `ValueError` naming the field: no ``text_config`` or ``vision_config`` (the tower would be a default
        ViT-B/32-shaped one, not the checkpoint's), or no ``text_config.eos_token_id`` while the default (49407,
        OpenAI's end-of-text id) is not the last id of the configured vocabulary (every caption would be pooled at
        position 0: all captions alike).

    Returns:
        Warnings (strings) for fields that are missing but whose defaults fit: ``text_config.eos_token_id`` with
        OpenAI's 49408-token vocabulary.
    """
    for section in ("text_config", "vision_config"):
        if not isinstance(config_dict.get(section), dict) and (config is None or _has_default_tower(config, section)):
            raise ValueError(
                f"{source} has no `{section}` section: the {section.split('_')[0]} tower would be built with CLIP's "
                f"default sizes instead of the checkpoint's; restore `{section}` (e.g. from the config of the model "
                "this one was trained or stretched from)"
            )
    text = config_dict.get("text_config") or {}
    default = CLIPTextConfig().eos_token_id
    notes = []
    fixed = config is not None and getattr(config.text_config, "eos_token_id", default) != default
    if "eos_token_id" not in text and not fixed:
        vocab = text.get("vocab_size", CLIPTextConfig().vocab_size)
        message = (
            f"{source} has no `text_config.eos_token_id`: the text tower pools each caption at that token, and the "
            f"default ({default}) "
        )
        if default != vocab - 1:
            raise ValueError(
                message + f"is not the end-of-text id of this {vocab}-token vocabulary, so every caption would be "
                "pooled at position 0 (all captions alike). Set `text_config.eos_token_id` to the tokenizer's "
                "end-of-text id (tokenizer.eos_token_id)"
            )
        notes.append(
            message + f"is assumed (OpenAI's end-of-text id, the last of the {vocab}-token vocabulary); set "
            "`text_config.eos_token_id` to the tokenizer's end-of-text id to silence this warning"
        )
    return notes


@strict
class LongCLIPConfig(CLIPConfig):
    r"""
    Configuration of a [`LongCLIPModel`]: a CLIP configuration whose text encoder has a stretched position table
    (248 rows by default), plus the stretch geometry and Long-CLIP's loss settings.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            Text encoder settings. ``max_position_embeddings`` defaults to the stretched length (248).
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            Image encoder settings.
        projection_dim (`int`, *optional*, defaults to 512):
            Size of the joint embedding space.
        logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
            Initial ``logit_scale`` of a model built from this config (CLIP's ln(1 / 0.07)); `from_clip` records
            ln(100) here, the value Long-CLIP sets before fine-tuning a stock CLIP.
        source_max_position_embeddings (`int`, *optional*, defaults to 77):
            Rows of the source CLIP's position table (what the stretch started from).
        position_keep (`int`, *optional*, defaults to 20):
            Leading source rows copied unchanged; during training they stay frozen.
        position_ratio (`int`, *optional*, defaults to 4):
            Each remaining source row becomes this many rows.
        freeze_kept_positions (`bool`, *optional*, defaults to `True`):
            Keep rows ``< position_keep`` of the position table exactly fixed while training.
        long_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the long-caption InfoNCE term.
        short_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the short-caption InfoNCE term (against the PCA reconstruction of image features).
        pca_components (`int`, *optional*, defaults to 32):
            Number of principal components kept for the short-caption image features.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of every cross-entropy term.
        pca_scope (`str`, *optional*, defaults to `"local"`):
            Batch the principal components are computed over: `"local"` (each process's batch, the authors' code) or
            `"global"` (all processes' features, so the loss does not depend on the number of processes).

    Example:

    ```python
    >>> from hf_longclip import LongCLIPConfig, LongCLIPModel
    >>> config = LongCLIPConfig()  # ViT-B/32-shaped, 248 text positions
    >>> config.text_config.max_position_embeddings
    248
    >>> model = LongCLIPModel(config)
    ```
    """

    model_type = "longclip"

    logit_scale_init_value: float | int | None = 2.6592
    source_max_position_embeddings: int = CLIP_CONTEXT_LENGTH
    position_keep: int = 20
    position_ratio: int = 4
    freeze_kept_positions: bool = True
    long_loss_weight: float = 1.0
    short_loss_weight: float = 1.0
    pca_components: int = 32
    label_smoothing: float = 0.1
    pca_scope: str = "local"

    def __post_init__(self, **kwargs):
        # Reject the legacy `*_config_dict` keys: CLIPConfig would merge them over `text_config`, which silently
        # resets a 248-row table to 77 rows when such a key is present.
        for legacy in ("text_config_dict", "vision_config_dict"):
            if kwargs.pop(legacy, None) is not None:
                raise ValueError(f"`{legacy}` is not supported by LongCLIPConfig; pass `{legacy[:-5]}` instead")
        target = stretched_length(self.source_max_position_embeddings, self.position_keep, self.position_ratio)
        if self.text_config is None:
            self.text_config = CLIPTextConfig(max_position_embeddings=target)
        elif isinstance(self.text_config, dict) and "max_position_embeddings" not in self.text_config:
            self.text_config = {**self.text_config, "max_position_embeddings": target}
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.pca_scope not in ("local", "global"):
            raise ValueError(f"pca_scope must be 'local' or 'global', got {self.pca_scope!r}")
        if self.pca_components < 1:
            raise ValueError(f"pca_components must be >= 1, got {self.pca_components}")
        super().__post_init__(**kwargs)
        rows = self.text_config.max_position_embeddings
        if rows != target:
            raise ValueError(
                f"text_config.max_position_embeddings is {rows}, but stretching {self.source_max_position_embeddings} "
                f"rows with keep={self.position_keep}, ratio={self.position_ratio} gives {target}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side of the image tower at its configured image size."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens of the image tower at its configured image size."""
        return self.grid_size**2

    @property
    def stretched_max_position_embeddings(self) -> int:
        """Length the stretch formula gives for this config's source length, keep and ratio."""
        return stretched_length(self.source_max_position_embeddings, self.position_keep, self.position_ratio)


__all__ = [
    "CLIP_CONTEXT_LENGTH",
    "LONGCLIP_CONTEXT_LENGTH",
    "LONGCLIP_LOGIT_SCALE",
    "LongCLIPConfig",
    "check_saved_config",
    "stretched_length",
    "validate_stretch",
]
