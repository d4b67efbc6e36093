"""Configuration of beta-CLIP (Long-CLIP backbone + text-conditioned pooling + beta-CAL)."""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict

from .configuration_longclip import LongCLIPConfig

BETA_CAL_MODES = ("ce", "bce")
#: Which features of the global InfoNCE carry gradient across processes (see `BetaCLIPConfig.global_loss_gradient`).
GLOBAL_LOSS_GRADIENTS = ("local_rows", "local_rows_and_columns", "all")


@strict
class BetaCLIPConfig(LongCLIPConfig):
    r"""
    Configuration of a [`BetaCLIPModel`]: a Long-CLIP configuration plus the text-conditioned pooling block and the
    beta-CAL loss settings (Zohra et al., "beta-CLIP", CVPR 2026).

    Inherited fields are those of [`LongCLIPConfig`] (towers, 248-token stretch). Long-CLIP's own loss fields
    (``long_loss_weight``, ``short_loss_weight``, ``pca_components``, ``label_smoothing``) are unused by beta-CLIP,
    whose global loss has no label smoothing.

    Args:
        pooler_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the text-conditioned pooling block; must divide ``projection_dim``.
        pooler_mlp_ratio (`float`, *optional*, defaults to 4.0):
            Hidden width of the block's MLP as a multiple of ``projection_dim``.
        pooler_hidden_act (`str`, *optional*, defaults to `"quick_gelu"`):
            Activation of the block's MLP (any transformers ``ACT2FN`` name).
        pooler_logit_scale_init_value (`float`, *optional*, defaults to ln(1/0.07) = 2.6593):
            Initial log temperature of beta-CAL (the block's own ``logit_scale``).
        pooler_use_cls_token (`bool`, *optional*, defaults to `False`):
            Let the queries attend to the CLS token as well as the patches (the authors' code leaves it out).
        value_path_last_block (`bool`, *optional*, defaults to `True`):
            Patch tokens for the pooling block come from a last vision block whose patch outputs are value-only
            (no query-key mixing; residual and MLP kept); the CLS output is unchanged. False uses the ordinary last
            block for the patches too.
        beta_cal_mode (`str`, *optional*, defaults to `"ce"`):
            ``"ce"`` (soft targets) or ``"bce"`` (beta-weighted binary cross-entropy).
        beta_cal_alpha (`float`, *optional*, defaults to 1.0):
            CE target weight of a slot's own text.
        beta_cal_beta (`float`, *optional*, defaults to 0.5):
            Target (CE) or loss (BCE) weight of the same image's other texts; must be >= 0.
        global_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the CLS <-> caption InfoNCE term (the authors' ``cls_alpha``).
        beta_cal_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the beta-CAL term (the authors' ``tcil_alpha``).
        ce_mask_invalid_columns (`bool`, *optional*, defaults to `True`):
            CE form: remove padded query slots from the softmax denominators. The authors' code keeps them as
            negatives (set False to reproduce it; the model then also encodes the padded query rows the way the
            authors' collate builds them).
        bce_mean_over_all_pairs (`bool`, *optional*, defaults to `False`):
            BCE form: divide by all ``(B*K)^2`` entries as the authors' ``mean`` does (True), or by the number of
            valid pairs (False).
        global_loss_gradient (`str`, *optional*, defaults to `"local_rows"`):
            Which features of the global CLS <-> caption InfoNCE carry gradient under torch.distributed (one process:
            all of them, whatever the setting). ``"local_rows"``: only this process's rows; every gathered column,
            this process's own included, is a constant (the authors' SLIP-style gather). ``"local_rows_and_columns"``:
            this process's features also carry gradient where they stand among the gathered columns.
            ``"all"``: gather with gradient, so each process's loss also sends gradient to the other processes' rows
            (open_clip's ``gather_with_grad``).
        text_length_buckets (`int`, *optional*, defaults to 1):
            Sentences and phrases are encoded one granularity at a time, each at the length of its own longest
            valid row; with ``n > 1`` the valid rows of a granularity are sorted by length and encoded in ``n``
            chunks, each at its own longest length (less padding, more calls). Used when `pack_query_texts` is off.
        pack_query_texts (`bool`, *optional*, defaults to `True`):
            Encode the valid sentence and phrase rows packed: several rows end to end in one text-tower row, each
            with its own position ids and a block-diagonal causal mask, pooled at its own end-of-text token. Only
            real tokens are encoded (the padded layout is about 40% padding on ShareGPT4V-like captions); the
            embeddings equal the unpacked ones up to float rounding. Needs an ``eager`` or ``sdpa`` text attention
            (others fall back to the padded layout).
        query_pack_length (`int`, *optional*, defaults to 64):
            Tokens per packed text row (raised to the longest query row when smaller). Attention inside a packed
            row is dense, so longer rows pack tighter but attend over more masked positions.
        tci_chunk_size (`int`, *optional*, defaults to 64):
            Images and texts per chunk when scoring text-conditioned image embeddings for retrieval (memory bound
            ``chunk^2 * projection_dim`` floats).

    Example:

    ```python
    >>> from hf_longclip import BetaCLIPConfig, BetaCLIPModel
    >>> config = BetaCLIPConfig(beta_cal_mode="bce")
    >>> model = BetaCLIPModel(config)
    ```
    """

    model_type = "betaclip"

    pooler_num_heads: int = 8
    pooler_mlp_ratio: float | int = 4.0
    pooler_hidden_act: str = "quick_gelu"
    pooler_logit_scale_init_value: float | int = math.log(1 / 0.07)
    pooler_use_cls_token: bool = False
    value_path_last_block: bool = True
    beta_cal_mode: str = "ce"
    beta_cal_alpha: float | int = 1.0
    beta_cal_beta: float | int = 0.5
    global_loss_weight: float | int = 1.0
    beta_cal_loss_weight: float | int = 1.0
    ce_mask_invalid_columns: bool = True
    bce_mean_over_all_pairs: bool = False
    global_loss_gradient: str = "local_rows"
    text_length_buckets: int = 1
    pack_query_texts: bool = True
    query_pack_length: int = 64
    tci_chunk_size: int = 64

    def __post_init__(self, **kwargs):
        # The boolean this field replaces: False was documented as the authors' gather (now "local_rows").
        legacy = kwargs.pop("global_loss_gather_with_grad", None)
        if legacy is not None:
            self.global_loss_gradient = "all" if legacy else "local_rows"
        if self.global_loss_gradient not in GLOBAL_LOSS_GRADIENTS:
            raise ValueError(
                f"global_loss_gradient must be one of {GLOBAL_LOSS_GRADIENTS}, got {self.global_loss_gradient!r}"
            )
        if self.beta_cal_mode not in BETA_CAL_MODES:
            raise ValueError(f"beta_cal_mode must be one of {BETA_CAL_MODES}, got {self.beta_cal_mode!r}")
        if self.beta_cal_beta < 0 or self.beta_cal_alpha < 0:
            raise ValueError(
                f"beta_cal_alpha and beta_cal_beta must be >= 0, got {self.beta_cal_alpha}, {self.beta_cal_beta}"
            )
        if self.beta_cal_mode == "ce" and self.beta_cal_alpha == 0 and self.beta_cal_beta == 0:
            raise ValueError("beta_cal_alpha and beta_cal_beta cannot both be 0: the CE targets would be empty")
        if self.pooler_num_heads < 1:
            raise ValueError(f"pooler_num_heads must be >= 1, got {self.pooler_num_heads}")
        if self.pooler_mlp_ratio <= 0:
            raise ValueError(f"pooler_mlp_ratio must be > 0, got {self.pooler_mlp_ratio}")
        if self.text_length_buckets < 1:
            raise ValueError(f"text_length_buckets must be >= 1, got {self.text_length_buckets}")
        if self.query_pack_length < 1:
            raise ValueError(f"query_pack_length must be >= 1, got {self.query_pack_length}")
        if self.tci_chunk_size < 1:
            raise ValueError(f"tci_chunk_size must be >= 1, got {self.tci_chunk_size}")
        super().__post_init__(**kwargs)
        if self.projection_dim % self.pooler_num_heads:
            raise ValueError(
                f"pooler_num_heads ({self.pooler_num_heads}) must divide projection_dim ({self.projection_dim})"
            )


__all__ = ["BetaCLIPConfig", "GLOBAL_LOSS_GRADIENTS"]
