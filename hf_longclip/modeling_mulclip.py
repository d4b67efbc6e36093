"""MulCLIP: multi-level alignment for fine-grained long-context CLIP (Truong et al., arXiv 2512.07128).

Training-time extras on a Long-CLIP backbone:

* **global**: ``L_global = w_long · InfoNCE(CLS, long caption) + w_short · InfoNCE(CLS, summary caption)``;
* **local token calibration**: calibrated visual tokens ``v'`` (from the projected patch tokens) and text tokens
  ``t'`` (from the projected word tokens), one `TokenAggregation` head (FineLIP's ATRM) per modality;
* **word level** ``L_word``: within each sample, every ``v'`` token rebuilt by attention over ``t'`` (and vice
  versa) must match its own reconstruction (token-level InfoNCE);
* **subcaption level** ``L_sub``: each sentence of the long caption aggregates its image's calibrated tokens by
  attention to its EOT embedding; the aggregate is contrasted with the sentence over the batch.

``L = global_loss_weight · L_global + word_loss_weight · L_word + sub_loss_weight · L_sub``. At inference only the
CLS / EOT embeddings are used, so a trained MulCLIP exports to a stock `CLIPModel` (248 text positions).

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch, transformers
and sibling files of this folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, CLIPModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_longclip import LongCLIPConfig
from .configuration_mulclip import MulCLIPConfig
from .losses import local_contrastive_loss
from .modeling_longclip import LongCLIPModel
from .mulclip_losses import aggregate_by_subcaption, subcaption_contrastive_loss, word_reconstruction_loss
from .token_aggregation import TokenAggregation


@dataclass
class MulCLIPOutput(ModelOutput):
    """
    Output of [`MulCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            ``global_loss_weight · loss_global + word_loss_weight · loss_word + sub_loss_weight · loss_sub``.
        loss_global (`torch.FloatTensor` of shape `()`, *optional*):
            ``long_loss_weight · loss_long + short_loss_weight · loss_summary``.
        loss_long (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE(CLS, long caption EOT).
        loss_summary (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE(CLS, summary caption EOT); present
            when summary captions were given.
        loss_word (`torch.FloatTensor` of shape `()`, *optional*): ``loss_word_image + loss_word_text``.
        loss_word_image (`torch.FloatTensor` of shape `()`, *optional*): reconstruction loss of the visual tokens.
        loss_word_text (`torch.FloatTensor` of shape `()`, *optional*): reconstruction loss of the text tokens.
        loss_sub (`torch.FloatTensor` of shape `()`, *optional*): subcaption-aggregated patch loss; present when
            subcaptions were given.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of images and long captions.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised long-caption EOT embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised CLS embeddings.
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            normalised summary-caption embeddings.
        calibrated_image_tokens (`torch.FloatTensor` of shape `(batch_size, N_v, projection_dim)`): ``v'``.
        calibrated_text_tokens (`torch.FloatTensor` of shape `(batch_size, N_t, projection_dim)`): ``t'``.
        subcaption_embeds (`torch.FloatTensor` of shape `(batch_size, M, projection_dim)`, *optional*):
            normalised subcaption embeddings (zero rows at padded slots).
        subcaption_image_embeds (`torch.FloatTensor` of shape `(batch_size, M, projection_dim)`, *optional*):
            normalised subcaption-aggregated patches ``v̄``.
        text_model_output (`BaseModelOutputWithPooling`): text encoder output for the long captions.
        vision_model_output (`BaseModelOutputWithPooling`): image encoder output.
    """

    loss: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    loss_long: torch.FloatTensor | None = None
    loss_summary: torch.FloatTensor | None = None
    loss_word: torch.FloatTensor | None = None
    loss_word_image: torch.FloatTensor | None = None
    loss_word_text: torch.FloatTensor | None = None
    loss_sub: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None
    calibrated_image_tokens: torch.FloatTensor | None = None
    calibrated_text_tokens: torch.FloatTensor | None = None
    subcaption_embeds: torch.FloatTensor | None = None
    subcaption_image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))


class MulCLIPModel(LongCLIPModel):
    r"""
    MulCLIP: a Long-CLIP with two token-calibration heads trained with global, word-level and subcaption-level
    alignment. The heads are training-time extras; inference (``get_text_features`` / ``get_image_features``, the
    "global" retrieval scoring, `to_clip_model`) uses the CLS and EOT embeddings only.

    Training inputs (build them with `MulCLIPCollator`): images, long captions, summary captions
    (``short_input_ids``) and up to ``M`` subcaptions per image (``subcaption_input_ids`` `(B, M, Ls)` with
    ``subcaption_mask`` `(B, M)`). Only valid subcaptions are encoded, packed into one text-tower call at their own
    longest length.

    Example:

    ```python
    >>> import hf_longclip
    >>> model = hf_longclip.MulCLIPModel.from_clip("openai/clip-vit-base-patch16")
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> collator = hf_longclip.data.MulCLIPCollator(processor)
    >>> batch = collator([{"image": image, "caption": "A dog on a sofa. The sofa is red. A lamp stands left."}])
    >>> out = model(**batch, return_loss=True)
    >>> out.loss.backward()  # out.loss_long, out.loss_summary, out.loss_word, out.loss_sub are logged separately
    ```
    """

    config_class = MulCLIPConfig
    config: MulCLIPConfig
    _no_split_modules = [*(getattr(LongCLIPModel, "_no_split_modules", None) or []), "TokenAggregation"]

    def __init__(self, config: MulCLIPConfig):
        super().__init__(config)
        dim = config.projection_dim
        self.visual_calibration = TokenAggregation(dim, config.visual_calibration_size, config.calibration_hidden_ratio)
        self.text_calibration = TokenAggregation(dim, config.text_calibration_size, config.calibration_hidden_ratio)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent: this replaces the generic init for the heads' layers.
        if isinstance(module, TokenAggregation):
            for layer in (module.norm, module.fc1, module.fc2):
                layer.reset_parameters()
            module.scale.fill_(1.0)

    # ------------------------------------------------------------------ token features
    def image_tokens(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """Projected CLS embedding and projected patch tokens from one vision pass.

        Returns:
            `(cls_embeds (B, D), patch_tokens (B, P, D), vision_outputs)`; the CLS embedding equals
            `get_image_features(...).pooler_output`.
        """
        outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        tokens = self.visual_projection(self.vision_model.post_layernorm(outputs.last_hidden_state))
        return tokens[:, 0], tokens[:, 1:], outputs

    def text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """Projected EOT embedding, projected token features and the mask of tokens the text calibration sees.

        The mask keeps the word tokens: positions after the start token and before the pooled end-of-text token,
        inside the attention mask (with ``config.calibration_text_special_tokens``, the start and end tokens too).

        Returns:
            `(eot_embeds (B, D), token_features (B, L, D), calibration_mask (B, L) bool, text_outputs)`.
        """
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        tokens = self.text_projection(outputs.last_hidden_state)
        eot_embeds = self.text_projection(outputs.pooler_output)
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        eot_index = self._eot_index(input_ids, attention_mask)
        if self.config.calibration_text_special_tokens:
            mask = positions[None, :] <= eot_index[:, None]
        else:
            mask = (positions[None, :] >= 1) & (positions[None, :] < eot_index[:, None])
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)
        return eot_embeds, tokens, mask, outputs

    def _eot_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Position of each row's end-of-text token (the last real token of a right-padded row)."""
        if attention_mask is not None:
            return attention_mask.to(torch.long).sum(-1).clamp(min=1) - 1
        eos = self.config.text_config.eos_token_id
        # Legacy OpenAI configs say 2 and pool at argmax(ids); their real end-of-text id is the largest one.
        if eos in (None, 2):
            return input_ids.argmax(-1)
        is_eos = input_ids == eos
        return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), input_ids.shape[1] - 1)

    def encode_subcaptions(
        self,
        subcaption_input_ids: torch.Tensor,
        subcaption_attention_mask: torch.Tensor | None = None,
        subcaption_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode only the valid subcaptions, packed into one call cut to their longest real length.

        Args:
            subcaption_input_ids (`torch.LongTensor` of shape `(B, M, Ls)`).
            subcaption_attention_mask (`torch.Tensor` of shape `(B, M, Ls)`, *optional*).
            subcaption_mask (`torch.Tensor` of shape `(B, M)`, *optional*): valid slots (all when None).

        Returns:
            `(embeds, mask)`: L2-normalised EOT embeddings `(B, M, D)` with zero rows at padded slots, and the bool
            slot mask `(B, M)`.
        """
        if subcaption_input_ids.dim() != 3:
            raise ValueError(f"subcaption_input_ids must be (B, M, L), got shape {tuple(subcaption_input_ids.shape)}")
        batch, slots, _ = subcaption_input_ids.shape
        device = subcaption_input_ids.device
        mask = (
            torch.ones(batch, slots, dtype=torch.bool, device=device)
            if subcaption_mask is None
            else subcaption_mask.to(device=device, dtype=torch.bool)
        )
        weight = self.text_projection.weight
        embeds = weight.new_zeros(batch, slots, self.config.projection_dim)
        if not bool(mask.any()):
            return embeds, mask
        ids = subcaption_input_ids[mask]
        attn = subcaption_attention_mask[mask] if subcaption_attention_mask is not None else None
        if attn is not None:
            length = int(attn.to(torch.long).sum(-1).max().clamp(min=1))
            ids, attn = ids[:, :length], attn[:, :length]
        features = self.get_text_features(input_ids=ids, attention_mask=attn).pooler_output
        embeds = embeds.masked_scatter(mask[..., None], F.normalize(features, dim=-1).to(embeds.dtype))
        return embeds, mask

    def calibrate(
        self, patch_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local token calibration: ``v' = TA_v(patches)`` `(B, N_v, D)` and ``t' = TA_t(words)`` `(B, N_t, D)`."""
        return self.visual_calibration(patch_tokens), self.text_calibration(text_tokens, text_mask)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        subcaption_input_ids: torch.LongTensor | None = None,
        subcaption_attention_mask: torch.Tensor | None = None,
        subcaption_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MulCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): long captions (<= 248 tokens).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): padding mask (right padding).
            short_input_ids (`torch.LongTensor` of shape `(batch_size, short_len)`, *optional*): summary captions,
                encoded at their own length; needed for the summary term of ``L_global``.
            short_attention_mask (`torch.Tensor`, *optional*): padding mask of `short_input_ids`.
            subcaption_input_ids (`torch.LongTensor` of shape `(batch_size, M, sub_len)`, *optional*): sentence
                subcaptions; needed for ``L_sub``.
            subcaption_attention_mask (`torch.Tensor` of shape `(batch_size, M, sub_len)`, *optional*).
            subcaption_mask (`torch.Tensor` of shape `(batch_size, M)`, *optional*): True for real subcaptions.
            return_loss (`bool`, *optional*): compute MulCLIP's loss.

        Returns:
            [`MulCLIPOutput`]
        """
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            short_input_ids=short_input_ids,
            short_attention_mask=short_attention_mask,
            subcaption_input_ids=subcaption_input_ids,
            subcaption_attention_mask=subcaption_attention_mask,
            subcaption_mask=subcaption_mask,
            position_ids=position_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
            calibrate=bool(return_loss),
            keep_outputs=True,
        )
        output = self.loss_from_features(features, return_loss=bool(return_loss))
        if return_dict is False:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------ two-stage training interface
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        subcaption_input_ids: torch.LongTensor | None = None,
        subcaption_attention_mask: torch.Tensor | None = None,
        subcaption_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        calibrate: bool = True,
        keep_outputs: bool = False,
        **kwargs,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised global embeddings, the
        calibrated token sets with the per-sample ``word_sample_mask``, and the subcaption embeddings with their
        aggregated image embeddings and slot mask. Everything here is computed inside each sample; the batch-wise
        terms are formed in `loss_from_features`."""
        if input_ids is None or pixel_values is None:
            raise ValueError("MulCLIPModel.forward needs both input_ids and pixel_values")
        if input_ids.shape[-1] > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"captions have {input_ids.shape[-1]} tokens but the text encoder reads at most "
                f"{self.config.text_config.max_position_embeddings}; tokenise with truncation"
            )
        cfg = self.config
        cls_embeds, patch_tokens, vision_outputs = self.image_tokens(pixel_values, interpolate_pos_encoding)
        eot_embeds, token_features, word_mask, text_outputs = self.text_tokens(input_ids, attention_mask, position_ids)
        features: dict[str, Any] = {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "text_embeds": F.normalize(eot_embeds, dim=-1),
        }
        if short_input_ids is not None:
            features["short_text_embeds"] = self.encode_text(short_input_ids, short_attention_mask)
        if calibrate or subcaption_input_ids is not None:
            calibrated_image, calibrated_text = self.calibrate(patch_tokens, token_features, word_mask)
            features.update(
                calibrated_image_tokens=calibrated_image,
                calibrated_text_tokens=calibrated_text,
                # A caption without any word token (empty caption) has all-zero calibrated text tokens: left out.
                word_sample_mask=word_mask.any(-1),
            )
        if subcaption_input_ids is not None:
            sub_embeds, sub_mask = self.encode_subcaptions(subcaption_input_ids, subcaption_attention_mask, subcaption_mask)
            source = features["calibrated_image_tokens"] if cfg.sub_aggregate_from == "calibrated" else patch_tokens
            features.update(
                subcaption_embeds=sub_embeds,
                subcaption_mask=sub_mask,
                subcaption_image_embeds=aggregate_by_subcaption(
                    source, sub_embeds, cfg.sub_attention_temperature, cfg.sub_top_k
                ),
            )
        if keep_outputs:
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True, **kwargs) -> MulCLIPOutput:
        """Logits and (with `return_loss`) MulCLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        calibrated_image = features.get("calibrated_image_tokens")
        calibrated_text = features.get("calibrated_text_tokens")
        sub_embeds = features.get("subcaption_embeds")
        sub_image_embeds = features.get("subcaption_image_embeds")
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()

        loss = loss_global = loss_long = loss_summary = None
        loss_word = loss_word_image = loss_word_text = loss_sub = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"the loss pairs image i with caption i: got {image_embeds.shape[0]} images and "
                    f"{text_embeds.shape[0]} captions"
                )
            if calibrated_image is None:
                raise ValueError("the MulCLIP loss needs the calibrated tokens (loss_features(..., calibrate=True))")
            loss_long = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, cfg.label_smoothing)
            loss_global = cfg.long_loss_weight * loss_long
            if short_embeds is not None:
                loss_summary = local_contrastive_loss(image_embeds, short_embeds, self.logit_scale, cfg.label_smoothing)
                loss_global = loss_global + cfg.short_loss_weight * loss_summary
            loss_word, loss_word_image, loss_word_text = word_reconstruction_loss(
                calibrated_image,
                calibrated_text,
                sample_mask=features["word_sample_mask"],
                attention_temperature=cfg.word_attention_temperature,
                contrastive_temperature=cfg.word_contrastive_temperature,
                symmetric=cfg.word_loss_symmetric,
            )
            loss = cfg.global_loss_weight * loss_global + cfg.word_loss_weight * loss_word
            if sub_embeds is not None:
                loss_sub = subcaption_contrastive_loss(
                    sub_image_embeds,
                    sub_embeds,
                    features["subcaption_mask"],
                    self.logit_scale,
                    cfg.label_smoothing,
                    gather=cfg.sub_gather,
                )
                loss = loss + cfg.sub_loss_weight * loss_sub

        return MulCLIPOutput(
            loss=loss,
            loss_global=loss_global,
            loss_long=loss_long,
            loss_summary=loss_summary,
            loss_word=loss_word,
            loss_word_image=loss_word_image,
            loss_word_text=loss_word_text,
            loss_sub=loss_sub,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            short_text_embeds=short_embeds,
            calibrated_image_tokens=calibrated_image,
            calibrated_text_tokens=calibrated_text,
            subcaption_embeds=sub_embeds,
            subcaption_image_embeds=sub_image_embeds,
            text_model_output=features.get("text_model_output"),
            vision_model_output=features.get("vision_model_output"),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_clip(cls, clip_config, **overrides) -> MulCLIPConfig:
        """A `MulCLIPConfig` with the towers of a stock `CLIPConfig`; `overrides` set Long-CLIP / MulCLIP fields."""
        own = {k: overrides.pop(k) for k in list(overrides) if k in _MULCLIP_FIELDS}
        base = LongCLIPModel.config_from_clip(clip_config, **overrides)
        return _mulclip_config_from(base, **own)

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int = 20,
        position_ratio: int = 4,
        reset_logit_scale: bool = True,
        **kwargs,
    ) -> MulCLIPModel:
        """Build a MulCLIP from a stock CLIP (Hub id, folder or `CLIPModel`): stretch the text positions as Long-CLIP
        does and add freshly initialised calibration heads. A folder holding a saved MulCLIP is loaded as it is.
        MulCLIP config fields (e.g. ``sub_top_k=8``, ``short_loss_weight=0.5``) may be passed as keyword arguments;
        MulCLIP's own defaults replace Long-CLIP's for ``short_loss_weight`` and ``label_smoothing``."""
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _MULCLIP_FIELDS}
        if isinstance(clip, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            source_config = AutoConfig.from_pretrained(clip, **hub_kwargs)
            if getattr(source_config, "model_type", None) == MulCLIPConfig.model_type:
                return cls.from_pretrained(clip, **kwargs, **own)
        backbone = LongCLIPModel.from_clip(clip, position_keep, position_ratio, reset_logit_scale, **kwargs)
        model = cls(_mulclip_config_from(backbone.config, **own)).to(dtype=backbone.dtype)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or any(not key.startswith(("visual_calibration.", "text_calibration.")) for key in missing):
            raise RuntimeError(f"unexpected backbone keys {unexpected} / missing {missing}")
        return model.eval()


# Fields a MulCLIP config sets beyond the towers and the stretch geometry (includes the re-defaulted loss fields).
_MULCLIP_FIELDS = (frozenset(MulCLIPConfig.__dataclass_fields__) - frozenset(LongCLIPConfig.__dataclass_fields__)) | {
    "long_loss_weight",
    "short_loss_weight",
    "label_smoothing",
}


def _mulclip_config_from(config: LongCLIPConfig, **fields) -> MulCLIPConfig:
    """A `MulCLIPConfig` with the towers and stretch geometry of a Long-CLIP config (MulCLIP defaults elsewhere)."""
    return MulCLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
        source_max_position_embeddings=config.source_max_position_embeddings,
        position_keep=config.position_keep,
        position_ratio=config.position_ratio,
        freeze_kept_positions=config.freeze_kept_positions,
        **fields,
    )


__all__ = ["MulCLIPModel", "MulCLIPOutput"]
