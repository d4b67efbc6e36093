"""Configuration of FineLIP (Long-CLIP backbone + token aggregation heads + cross-modal late interaction)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_longclip import LongCLIPConfig


@strict
class FineLIPConfig(LongCLIPConfig):
    r"""
    Configuration of a [`FineLIPModel`] (Asokan, Wu, Albreiki, "FineLIP", CVPR 2025): a Long-CLIP configuration plus
    the two token-aggregation heads (ATRM), the cross-modal late interaction (CLIM) scorer and the hinge loss.

    Defaults follow the authors' code. Inherited fields are those of [`LongCLIPConfig`]; ``short_loss_weight`` and
    ``pca_components`` are unused (FineLIP trains on the long caption only) and ``label_smoothing`` (0.1) applies
    only to the optional global InfoNCE term.

    Args:
        aggregation_ratio (`float`, *optional*, defaults to 0.4):
            With ``sparse_ratio``, sets the default number of aggregated tokens:
            ``int(num_patches * aggregation_ratio * sparse_ratio)`` (196 * 0.4 * 0.5 -> 39 for ViT-B/16 at 224 px).
        sparse_ratio (`float`, *optional*, defaults to 0.5):
            See ``aggregation_ratio``.
        num_image_aggregated_tokens (`int`, *optional*):
            Aggregated image tokens; None derives them from the patch count and the two ratios.
        num_text_aggregated_tokens (`int`, *optional*):
            Aggregated text tokens; None uses the image count (the authors use one size for both heads).
        aggregation_hidden_ratio (`float`, *optional*, defaults to 0.2):
            Hidden width of each head's scoring MLP as a fraction of ``projection_dim`` (102 for 512).
        text_aggregation_include_start (`bool`, *optional*, defaults to `True`):
            The text head aggregates the start token and the word tokens (the authors' span ``[0, EOT)``); False
            aggregates the word tokens only.
        text_span_from_nonzero_ids (`bool`, *optional*, defaults to `False`):
            Reproduce the authors' span length, the count of non-zero ids: every id 0 (the BPE token "!") inside a
            caption shortens the span by one and moves the "EOT" token one position earlier. By default the span
            ends at the end-of-text token found from the attention mask.
        clim_negative_slope (`float`, *optional*, defaults to 0.1):
            Negative slope of the LeakyReLU applied to the token-token cosine similarities in CLIM.
        clim_chunk_size (`int`, *optional*, defaults to 64):
            Images and texts per block when CLIM scores are computed: a block holds
            ``chunk^2 * tokens^2`` similarities (64 -> 26 MB in fp32 with 40 tokens), whatever the batch size.
        hinge_margin (`float`, *optional*, defaults to 0.2):
            Margin of the bidirectional hinge (triplet) loss on the CLIM score matrix.
        hinge_max_violation (`bool`, *optional*, defaults to `False`):
            Keep only the hardest negative per anchor (VSE++); the authors sum over all negatives.
        hinge_warmup (`bool`, *optional*, defaults to `True`):
            Let [`FineLIPModel.hinge_warmup_alpha`] ramp the hinge loss linearly over one epoch (the authors' schedule).
        hinge_warmup_epochs (`int`, *optional*, defaults to 0):
            The epoch in which the ramp runs (the authors' ``embedding_warmup_epochs``).
        fine_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the hinge loss.
        global_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of an extra InfoNCE term on the CLS / EOT embeddings. The authors' code has none in FineLIP mode
            (the paper's text suggests one); set > 0 to add it.
        fused_global_weight (`float`, *optional*, defaults to 0.8):
            Weight of the global cosine in the "fused" retrieval score.
        fused_clim_weight (`float`, *optional*, defaults to 0.2):
            Weight of the CLIM score in the "fused" retrieval score.

    Example:

    ```python
    >>> from hf_longclip import FineLIPConfig, FineLIPModel
    >>> config = FineLIPConfig(vision_config={"image_size": 224, "patch_size": 16})
    >>> config.image_aggregation_size
    39
    >>> model = FineLIPModel(config)
    ```
    """

    model_type = "finelip"

    aggregation_ratio: float | int = 0.4
    sparse_ratio: float | int = 0.5
    num_image_aggregated_tokens: int | None = None
    num_text_aggregated_tokens: int | None = None
    aggregation_hidden_ratio: float | int = 0.2
    text_aggregation_include_start: bool = True
    text_span_from_nonzero_ids: bool = False
    clim_negative_slope: float | int = 0.1
    clim_chunk_size: int = 64
    hinge_margin: float | int = 0.2
    hinge_max_violation: bool = False
    hinge_warmup: bool = True
    hinge_warmup_epochs: int = 0
    fine_loss_weight: float | int = 1.0
    global_loss_weight: float | int = 0.0
    fused_global_weight: float | int = 0.8
    fused_clim_weight: float | int = 0.2

    def __post_init__(self, **kwargs):
        for name in ("num_image_aggregated_tokens", "num_text_aggregated_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the default), got {value}")
        for name in ("aggregation_ratio", "sparse_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.aggregation_hidden_ratio <= 0:
            raise ValueError(f"aggregation_hidden_ratio must be > 0, got {self.aggregation_hidden_ratio}")
        if self.clim_negative_slope < 0:
            raise ValueError(f"clim_negative_slope must be >= 0, got {self.clim_negative_slope}")
        if self.clim_chunk_size < 1:
            raise ValueError(f"clim_chunk_size must be >= 1, got {self.clim_chunk_size}")
        if self.hinge_margin < 0:
            raise ValueError(f"hinge_margin must be >= 0, got {self.hinge_margin}")
        if self.hinge_warmup_epochs < 0:
            raise ValueError(f"hinge_warmup_epochs must be >= 0, got {self.hinge_warmup_epochs}")
        for name in ("fine_loss_weight", "global_loss_weight", "fused_global_weight", "fused_clim_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fine_loss_weight == 0 and self.global_loss_weight == 0:
            raise ValueError("fine_loss_weight and global_loss_weight are both 0: the loss would be constant")
        super().__post_init__(**kwargs)

    @property
    def image_aggregation_size(self) -> int:
        """Aggregated image tokens (``num_image_aggregated_tokens`` or ``int(patches * ratio * sparse)``, >= 1)."""
        if self.num_image_aggregated_tokens is not None:
            return self.num_image_aggregated_tokens
        return max(1, int(self.num_patches * self.aggregation_ratio * self.sparse_ratio))

    @property
    def text_aggregation_size(self) -> int:
        """Aggregated text tokens (``num_text_aggregated_tokens`` or the image count)."""
        if self.num_text_aggregated_tokens is not None:
            return self.num_text_aggregated_tokens
        return self.image_aggregation_size


__all__ = ["FineLIPConfig"]
