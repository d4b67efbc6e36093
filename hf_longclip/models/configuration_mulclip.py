"""Configuration of MulCLIP (Long-CLIP backbone + token calibration + word- and subcaption-level losses)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_longclip import LongCLIPConfig

SUB_AGGREGATE_SOURCES = ("calibrated", "patches")


@strict
class MulCLIPConfig(LongCLIPConfig):
    r"""
    Configuration of a [`MulCLIPModel`] (Truong et al., "MulCLIP", arXiv 2512.07128): a Long-CLIP configuration plus
    the two token-calibration heads and the settings of MulCLIP's three loss levels.

    No code of the authors exists; only the loss structure is known from public text. Every value below that the
    public text does not state is marked UNKNOWN and has the default we judged most sensible.

    Inherited fields are those of [`LongCLIPConfig`] (towers, 248-token stretch). ``long_loss_weight`` and
    ``short_loss_weight`` weigh the two global terms ``L_batch(CLS, long)`` and ``L_batch(CLS, summary)`` (here the
    summary term uses the CLS embedding itself, not Long-CLIP's PCA reconstruction, so ``pca_components`` is
    unused).

    Args:
        short_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the CLS <-> summary-caption InfoNCE (½ in the authors' project page; arXiv v1 may differ).
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of the batch-wise InfoNCE terms (global and subcaption). UNKNOWN; plain CLIP InfoNCE is
            the default (Long-CLIP's code uses 0.1).
        calibration_visual_tokens (`int`, *optional*):
            Calibrated visual tokens ``N_v`` produced from the patch tokens. UNKNOWN; when None,
            ``int(num_patches * calibration_token_ratio)`` (39 for ViT-B/16 at 224 px, FineLIP's value), but at least
            2 when the image has 2 patches or more: ``L_word`` is a token-level InfoNCE over the ``N_v`` tokens,
            identically 0 for one token (see `word_loss_problem`).
        calibration_text_tokens (`int`, *optional*):
            Calibrated text tokens ``N_t`` produced from the word tokens. UNKNOWN; when None, equal to the visual
            count (FineLIP uses one size for both aggregators).
        calibration_token_ratio (`float`, *optional*, defaults to 0.2):
            Fraction of the patch count used when ``calibration_visual_tokens`` is None (FineLIP's 0.4 * 0.5).
        calibration_hidden_ratio (`float`, *optional*, defaults to 0.2):
            Hidden width of the calibration scoring MLP as a fraction of ``projection_dim`` (FineLIP's ATRM).
        calibration_text_special_tokens (`bool`, *optional*, defaults to `False`):
            Let the text calibration see the start- and end-of-text tokens too. By default it sees only the word
            tokens between them (FineLIP leaves the EOT token out of its text aggregator).
        word_attention_temperature (`float`, *optional*, defaults to 0.07):
            Temperature of the cross-modal reconstruction attention in ``L_word`` (cosine similarities / τ). UNKNOWN.
        word_contrastive_temperature (`float`, *optional*, defaults to 0.07):
            Temperature of the token-level InfoNCE matching each token with its own reconstruction. UNKNOWN.
        word_loss_symmetric (`bool`, *optional*, defaults to `False`):
            Also score each reconstruction against every original token (both directions, averaged). By default only
            "token -> reconstructions" is scored, the form the public text describes.
        sub_attention_temperature (`float`, *optional*, defaults to 0.07):
            Temperature of the attention that aggregates visual tokens by a subcaption embedding. UNKNOWN.
        sub_top_k (`int`, *optional*):
            Aggregate only the ``k`` visual tokens most similar to the subcaption (None or 0: all tokens). UNKNOWN.
        sub_aggregate_from (`str`, *optional*, defaults to `"calibrated"`):
            ``"calibrated"`` aggregates the calibrated visual tokens ``v'`` (a reviewer says SAP supervises ``v'``);
            ``"patches"`` aggregates the projected patch tokens directly.
        pack_texts (`bool`, *optional*, defaults to `True`):
            Encode the short captions and the valid subcaptions in one packed text-tower call (several rows per
            tower row, each with its own position ids and a block-diagonal causal mask; only real tokens encoded).
            The embeddings equal the padded encoding up to float rounding. Needs an ``eager`` or ``sdpa`` text
            attention (others use the padded encoding).
        sub_gather (`bool`, *optional*, defaults to `True`):
            Under torch.distributed, use every rank's aggregated patches and subcaptions as negatives (all-gathered
            with gradient, local-loss form), like the global loss. False scores each rank's batch alone.
        global_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of ``L_global`` in the total.
        word_loss_weight (`float`, *optional*, defaults to 1.0):
            ``λ_W``, weight of ``L_word``.
        sub_loss_weight (`float`, *optional*, defaults to 1.0):
            ``λ_S``, weight of ``L_sub``.

    Example:

    ```python
    >>> from hf_longclip import MulCLIPConfig, MulCLIPModel
    >>> config = MulCLIPConfig(sub_top_k=8)
    >>> model = MulCLIPModel(config)
    ```
    """

    model_type = "mulclip"

    short_loss_weight: float | int = 0.5
    label_smoothing: float | int = 0.0
    calibration_visual_tokens: int | None = None
    calibration_text_tokens: int | None = None
    calibration_token_ratio: float | int = 0.2
    calibration_hidden_ratio: float | int = 0.2
    calibration_text_special_tokens: bool = False
    word_attention_temperature: float | int = 0.07
    word_contrastive_temperature: float | int = 0.07
    word_loss_symmetric: bool = False
    sub_attention_temperature: float | int = 0.07
    sub_top_k: int | None = None
    sub_aggregate_from: str = "calibrated"
    sub_gather: bool = True
    pack_texts: bool = True
    global_loss_weight: float | int = 1.0
    word_loss_weight: float | int = 1.0
    sub_loss_weight: float | int = 1.0

    def __post_init__(self, **kwargs):
        for name in ("calibration_visual_tokens", "calibration_text_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the default), got {value}")
        if not 0 < self.calibration_token_ratio <= 1:
            raise ValueError(f"calibration_token_ratio must be in (0, 1], got {self.calibration_token_ratio}")
        if self.calibration_hidden_ratio <= 0:
            raise ValueError(f"calibration_hidden_ratio must be > 0, got {self.calibration_hidden_ratio}")
        for name in ("word_attention_temperature", "word_contrastive_temperature", "sub_attention_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.sub_top_k is not None and self.sub_top_k < 0:
            raise ValueError(f"sub_top_k must be >= 0 (or None for all tokens), got {self.sub_top_k}")
        if self.sub_aggregate_from not in SUB_AGGREGATE_SOURCES:
            raise ValueError(
                f"sub_aggregate_from must be one of {SUB_AGGREGATE_SOURCES}, got {self.sub_aggregate_from!r}"
            )
        for name in ("global_loss_weight", "word_loss_weight", "sub_loss_weight", "long_loss_weight", "short_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        super().__post_init__(**kwargs)

    @property
    def visual_calibration_size(self) -> int:
        """Calibrated visual tokens the model produces (``calibration_visual_tokens`` or the ratio default, at least
        2 where the image has 2 patches, so that ``L_word`` has a token to contrast with)."""
        if self.calibration_visual_tokens is not None:
            return self.calibration_visual_tokens
        return max(min(2, self.num_patches), int(self.num_patches * self.calibration_token_ratio))

    def word_loss_problem(self) -> str | None:
        """Why ``L_word`` cannot train with this configuration (a message naming the fields to change), or None.

        Each term of ``L_word`` is a token-level InfoNCE among a sample's calibrated tokens: with one visual
        (text) token the image (text) term is exactly 0; with one image patch every calibrated visual token is that
        patch, so both terms are constant. Either way the loss gives the heads no gradient.
        """
        if not self.word_loss_weight:
            return None
        if self.num_patches < 2:
            return (
                f"the image tower sees a single patch (vision_config.image_size {self.vision_config.image_size}, "
                f"patch_size {self.vision_config.patch_size}), so every calibrated visual token is that patch and "
                "L_word is constant; use a smaller vision_config.patch_size or set word_loss_weight=0"
            )
        single = [
            f"{name} resolves to 1"
            for name, size in (("calibration_visual_tokens", self.visual_calibration_size),
                               ("calibration_text_tokens", self.text_calibration_size))
            if size < 2
        ]
        if single:
            return (
                f"{' and '.join(single)}: a token-level InfoNCE over one token is exactly 0, so L_word cannot train; "
                "set calibration_visual_tokens / calibration_text_tokens >= 2 (or leave them None), or "
                "word_loss_weight=0"
            )
        return None

    @property
    def text_calibration_size(self) -> int:
        """Calibrated text tokens the model produces (``calibration_text_tokens`` or the visual count)."""
        if self.calibration_text_tokens is not None:
            return self.calibration_text_tokens
        return self.visual_calibration_size


__all__ = ["MulCLIPConfig", "SUB_AGGREGATE_SOURCES"]
