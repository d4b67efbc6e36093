"""MulCLIP (Truong et al., arXiv 2512.07128): Long-CLIP plus token calibration heads trained with global, word-level and
subcaption-level alignment. See docs/mulclip.md."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_mulclip import MulCLIPConfig
from .losses_common import local_contrastive_loss
from .losses_mulclip import aggregate_by_subcaption, subcaption_contrastive_loss, word_reconstruction_loss
from .modeling_longclip import CLIPVariantOutput, LongCLIPModel
from .token_aggregation import TokenAggregation


@dataclass
class MulCLIPOutput(CLIPVariantOutput):
    """
    Output of [`MulCLIPModel.forward`]: the fields of [`CLIPVariantOutput`] (``loss`` is
    ``global_loss_weight · loss_global + word_loss_weight · loss_word + sub_loss_weight · loss_sub``), then

    Args:
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
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            normalised summary-caption embeddings.
        calibrated_image_tokens (`torch.FloatTensor` of shape `(batch_size, N_v, projection_dim)`): ``v'``.
        calibrated_text_tokens (`torch.FloatTensor` of shape `(batch_size, N_t, projection_dim)`): ``t'``.
        subcaption_embeds (`torch.FloatTensor` of shape `(batch_size, M, projection_dim)`, *optional*):
            normalised subcaption embeddings (zero rows at padded slots).
        subcaption_image_embeds (`torch.FloatTensor` of shape `(batch_size, M, projection_dim)`, *optional*):
            normalised subcaption-aggregated patches ``v̄``.
    """

    loss_global: torch.FloatTensor | None = None
    loss_long: torch.FloatTensor | None = None
    loss_summary: torch.FloatTensor | None = None
    loss_word: torch.FloatTensor | None = None
    loss_word_image: torch.FloatTensor | None = None
    loss_word_text: torch.FloatTensor | None = None
    loss_sub: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None
    calibrated_image_tokens: torch.FloatTensor | None = None
    calibrated_text_tokens: torch.FloatTensor | None = None
    subcaption_embeds: torch.FloatTensor | None = None
    subcaption_image_embeds: torch.FloatTensor | None = None


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
    head_modules: ClassVar[tuple[str, ...]] = ("visual_calibration", "text_calibration")
    # the summary term uses the CLS embedding itself: no PCA
    unused_config_fields: ClassVar[frozenset[str]] = frozenset({"pca_components", "pca_scope"})

    def __init__(self, config: MulCLIPConfig):
        super().__init__(config)
        problem = config.word_loss_problem()
        if problem:  # built, loaded or from_clip: say so once, where the configuration is chosen
            warnings.warn(f"MulCLIP word-level loss: {problem}", UserWarning, stacklevel=2)
        dim = config.projection_dim
        self.visual_calibration = TokenAggregation(dim, config.visual_calibration_size, config.calibration_hidden_ratio)
        self.text_calibration = TokenAggregation(dim, config.text_calibration_size, config.calibration_hidden_ratio)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent: this replaces the generic init for the heads' layers.
        if isinstance(module, TokenAggregation):
            module.reset_parameters(self.config.initializer_factor)

    # ------------------------------------------------------------------ token features
    def image_tokens(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **tower_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """Projected CLS embedding and projected patch tokens from one vision pass.

        Returns:
            `(cls_embeds (B, D), patch_tokens (B, P, D), vision_outputs)`; the CLS embedding equals
            `get_image_features(...).pooler_output`.
        """
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **tower_kwargs
        )
        tokens = self.visual_projection(self.vision_model.post_layernorm(outputs.last_hidden_state))
        return tokens[:, 0], tokens[:, 1:], outputs

    def text_tokens(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """Projected EOT embedding, projected token features and the mask of tokens the text calibration sees.

        The mask keeps the word tokens: positions after the start token and before the pooled end-of-text token,
        inside the attention mask (with ``config.calibration_text_special_tokens``, the start and end tokens too).

        Returns:
            `(eot_embeds (B, D), token_features (B, L, D), calibration_mask (B, L) bool, text_outputs)`.
        """
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **tower_kwargs
        )
        tokens = self.text_projection(outputs.last_hidden_state)
        eot_embeds = self.text_projection(outputs.pooler_output)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        eot_index = self.text_eot_index(input_ids, attention_mask)
        if self.config.calibration_text_special_tokens:
            mask = positions[None, :] <= eot_index[:, None]
        else:
            mask = (positions[None, :] >= 1) & (positions[None, :] < eot_index[:, None])
        if attention_mask is not None:
            mask = mask & attention_mask.to(torch.bool)
        return eot_embeds, tokens, mask, outputs

    def sharding_conflicts(self) -> list[str]:
        """Base conflicts, plus: a micro-batch without valid subcaptions skips the text tower's subcaption call, so
        processes run the text tower a data-dependent number of times (`encode_subcaptions`)."""
        return [*super().sharding_conflicts(), ("MulCLIP encodes subcaptions only when a micro-batch has some, so "
                "the number of text-tower calls per step depends on each process's data")]

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
        mask, ids, attn = self._valid_subcaptions(subcaption_input_ids, subcaption_attention_mask, subcaption_mask)
        if ids.shape[0] == 0:
            return self._scatter_subcaptions(mask, None), mask
        if attn is not None:
            length = int(attn.to(torch.long).sum(-1).max().clamp(min=1))
            ids, attn = ids[:, :length], attn[:, :length]
        features = self.get_text_features(input_ids=ids, attention_mask=attn, return_dict=True).pooler_output
        return self._scatter_subcaptions(mask, features), mask

    @staticmethod
    def _valid_subcaptions(subcaption_input_ids, subcaption_attention_mask=None, subcaption_mask=None):
        """`(slot mask (B, M), valid rows' ids (n, Ls), their attention mask or None)`."""
        if subcaption_input_ids.dim() != 3:
            raise ValueError(f"subcaption_input_ids must be (B, M, L), got shape {tuple(subcaption_input_ids.shape)}")
        batch, slots, _ = subcaption_input_ids.shape
        device = subcaption_input_ids.device
        mask = (
            torch.ones(batch, slots, dtype=torch.bool, device=device)
            if subcaption_mask is None
            else subcaption_mask.to(device=device, dtype=torch.bool)
        )
        attn = subcaption_attention_mask[mask] if subcaption_attention_mask is not None else None
        return mask, subcaption_input_ids[mask], attn

    def _scatter_subcaptions(self, mask: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised `features` (n, D) of the valid slots in the `(B, M, D)` layout, zero rows elsewhere."""
        embeds = self.text_projection.weight.new_zeros(*mask.shape, self.config.projection_dim)
        if features is None or features.shape[0] == 0:
            return embeds
        return embeds.masked_scatter(mask[..., None], F.normalize(features, dim=-1).to(embeds.dtype))

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
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
            output_attentions, output_hidden_states, return_dict: as in [`LongCLIPModel.forward`].

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
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            calibrate=bool(return_loss),
            keep_outputs=True,
        )
        return self._return(self.loss_from_features(features, return_loss=bool(return_loss)), return_dict)

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        calibrate: bool = True,
        keep_outputs: bool = False,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised global embeddings, the
        calibrated token sets with the per-sample ``word_sample_mask``, and the subcaption embeddings with their
        aggregated image embeddings and slot mask. Everything here is computed inside each sample; the batch-wise
        terms are formed in `loss_from_features`."""
        self._require_inputs(input_ids, pixel_values, attention_mask)
        cfg = self.config
        towers = self.tower_kwargs(output_attentions, output_hidden_states)
        cls_embeds, patch_tokens, vision_outputs = self.image_tokens(pixel_values, interpolate_pos_encoding, **towers)
        eot_embeds, token_features, word_mask, text_outputs = self.text_tokens(
            input_ids, attention_mask, position_ids, **towers
        )
        features: dict[str, Any] = {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "text_embeds": F.normalize(eot_embeds, dim=-1),
        }
        packed_subcaptions = None
        if cfg.pack_texts and self.can_pack_text() and (short_input_ids is not None or subcaption_input_ids is not None):
            # short captions and subcaptions: one packed text-tower call over their real tokens
            groups = []
            if short_input_ids is not None:
                self.check_text_inputs(short_input_ids, short_attention_mask)
                groups.append((short_input_ids, short_attention_mask))
            if subcaption_input_ids is not None:
                sub_mask, sub_ids, sub_attn = self._valid_subcaptions(
                    subcaption_input_ids, subcaption_attention_mask, subcaption_mask
                )
                groups.append((sub_ids, sub_attn))
            encoded = self.encode_packed_text_rows(groups)
            if short_input_ids is not None:
                features["short_text_embeds"] = F.normalize(encoded.pop(0), dim=-1)
            if subcaption_input_ids is not None:
                packed_subcaptions = (self._scatter_subcaptions(sub_mask, encoded.pop(0)), sub_mask)
        elif short_input_ids is not None:
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
            sub_embeds, sub_mask = packed_subcaptions or self.encode_subcaptions(
                subcaption_input_ids, subcaption_attention_mask, subcaption_mask
            )
            source = features["calibrated_image_tokens"] if cfg.sub_aggregate_from == "calibrated" else patch_tokens
            features.update(
                subcaption_embeds=sub_embeds,
                subcaption_mask=sub_mask,
                subcaption_image_embeds=aggregate_by_subcaption(
                    source, sub_embeds, cfg.sub_attention_temperature, cfg.sub_top_k
                ),
            )
        if keep_outputs:
            vision_outputs.pooler_output = cls_embeds
            text_outputs.pooler_output = eot_embeds
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True) -> MulCLIPOutput:
        """Logits and (with `return_loss`) MulCLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        calibrated_image = features.get("calibrated_image_tokens")
        calibrated_text = features.get("calibrated_text_tokens")
        sub_embeds = features.get("subcaption_embeds")
        sub_image_embeds = features.get("subcaption_image_embeds")

        loss = loss_global = loss_long = loss_summary = None
        loss_word = loss_word_image = loss_word_text = loss_sub = None
        if return_loss:
            self._require_pairs(image_embeds, text_embeds)
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
            **self.clip_outputs(features),
            loss_global=loss_global,
            loss_long=loss_long,
            loss_summary=loss_summary,
            loss_word=loss_word,
            loss_word_image=loss_word_image,
            loss_word_text=loss_word_text,
            loss_sub=loss_sub,
            short_text_embeds=short_embeds,
            calibrated_image_tokens=calibrated_image,
            calibrated_text_tokens=calibrated_text,
            subcaption_embeds=sub_embeds,
            subcaption_image_embeds=sub_image_embeds,
        )


__all__ = ["MulCLIPModel", "MulCLIPOutput"]
