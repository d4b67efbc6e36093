"""FineLIP (Asokan, Wu, Albreiki, CVPR 2025): Long-CLIP plus token aggregation (ATRM) and cross-modal late interaction
(CLIM) trained with a bidirectional hinge loss. See docs/finelip.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_finelip import FineLIPConfig
from .losses_common import gather_no_grad, gather_with_grad, local_contrastive_loss
from .losses_finelip import bidirectional_hinge_loss, clim_scores, hinge_warmup_alpha
from .modeling_longclip import CLIPVariantOutput, LongCLIPModel
from .token_aggregation import TokenAggregation


@dataclass
class FineLIPOutput(CLIPVariantOutput):
    """
    Output of [`FineLIPModel.forward`]: the fields of [`CLIPVariantOutput`] (``loss`` is
    ``fine_loss_weight * warmup_alpha * loss_hinge + global_loss_weight * loss_global``; under torch.distributed every
    rank holds the loss of the whole global batch), then

    Args:
        loss_hinge (`torch.FloatTensor` of shape `()`, *optional*):
            The bidirectional hinge loss on the CLIM scores (a sum over the global batch), before ``warmup_alpha``.
        loss_hinge_image_anchor (`torch.FloatTensor` of shape `()`, *optional*):
            Its image-anchored half (captions as negatives).
        loss_hinge_text_anchor (`torch.FloatTensor` of shape `()`, *optional*):
            Its caption-anchored half (images as negatives).
        loss_global (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE on the CLS / EOT embeddings; computed only when ``config.global_loss_weight > 0``.
        clim_scores (`torch.FloatTensor` of shape `(global_batch, global_batch)`, *optional*):
            CLIM scores of every image (rows) with every caption (columns) of the global batch.
        image_tokens (`torch.FloatTensor` of shape `(batch_size, 1 + N_v, projection_dim)`):
            L2-normalised CLS token followed by the aggregated image tokens.
        text_tokens (`torch.FloatTensor` of shape `(batch_size, N_t + 1, projection_dim)`):
            L2-normalised aggregated text tokens followed by the EOT token.

    Attributes (not outputs):
        text_token_mask (`torch.BoolTensor` of shape `(batch_size, N_t + 1)`): True for valid text tokens (all of them
            unless a caption has an empty aggregation span).
    """

    loss_hinge: torch.FloatTensor | None = None
    loss_hinge_image_anchor: torch.FloatTensor | None = None
    loss_hinge_text_anchor: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    clim_scores: torch.FloatTensor | None = None
    image_tokens: torch.FloatTensor | None = None
    text_tokens: torch.FloatTensor | None = None

    text_token_mask: ClassVar[torch.BoolTensor | None] = None


class FineLIPModel(LongCLIPModel):
    r"""
    FineLIP: a Long-CLIP whose training aligns aggregated image and text tokens by late interaction.

    Heads: ``image_aggregation`` and ``text_aggregation`` (the authors' ``cross_net.aggr_net`` and
    ``cross_net.cap_aggr_net``), each a [`TokenAggregation`] with ``~57k`` parameters at B/16. They are used only by the
    loss and by the "fused" / "clim" retrieval scorings; `get_text_features`, `get_image_features`, the "global"
    scoring and `to_clip_model` are plain Long-CLIP.

    Retrieval scorings: ``"global"`` (cosine of CLS and EOT), ``"clim"`` (the CLIM score alone) and ``"fused"``
    (``config.fused_global_weight * global + config.fused_clim_weight * CLIM``, 0.8 / 0.2 as the authors' test.py).

    Training (inputs from [`FineLIPCollator`]): images, long captions, optional image ids (for the duplicate mask),
    and ``warmup_alpha``, the ramp weight of the hinge loss (`training_loss_kwargs` gives it per step, from
    [`FineLIPModel.hinge_warmup_alpha`]). ``logit_scale`` takes no part in the default loss
    (``global_loss_weight=0``), so it is created with ``requires_grad=False``; it trains when the global term is on.

    Example:

    ```python
    >>> import hf_longclip
    >>> model = hf_longclip.FineLIPModel.from_clip("openai/clip-vit-base-patch16")
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> collator = hf_longclip.data.FineLIPCollator(processor)
    >>> batch = collator([{"image": img, "caption": long_caption, "id": 17} for img, long_caption in pairs])
    >>> alpha = model.hinge_warmup_alpha(step, steps_per_epoch)
    >>> out = model(**batch, return_loss=True, warmup_alpha=alpha)
    >>> out.loss.backward()
    ```
    """

    config_class = FineLIPConfig
    config: FineLIPConfig
    _no_split_modules = [*(getattr(LongCLIPModel, "_no_split_modules", None) or []), "TokenAggregation"]
    head_modules: ClassVar[tuple[str, ...]] = ("image_aggregation", "text_aggregation")
    retrieval_scorings: ClassVar[tuple[str, ...]] = ("global", "fused", "clim")
    # the hinge loss and the optional global term have their own weights; no short caption, no PCA
    unused_config_fields: ClassVar[frozenset[str]] = frozenset(
        {"long_loss_weight", "short_loss_weight", "pca_components", "pca_scope"}
    )

    def __init__(self, config: FineLIPConfig):
        super().__init__(config)
        dim = config.projection_dim
        self.image_aggregation = TokenAggregation(dim, config.image_aggregation_size, config.aggregation_hidden_ratio)
        self.text_aggregation = TokenAggregation(dim, config.text_aggregation_size, config.aggregation_hidden_ratio)
        self.post_init()
        # Without the global term nothing in the loss reads logit_scale: leave it out of training explicitly (in the
        # authors' code it gets no gradient, so AdamW never moves it), so no step has a parameter without a gradient.
        self.logit_scale.requires_grad_(config.global_loss_weight > 0)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent, so this replaces the generic init of the heads' layers.
        if isinstance(module, TokenAggregation):
            module.reset_parameters(self.config.initializer_factor)

    # ------------------------------------------------------------------ token sets
    def image_token_set(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **tower_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """CLS embedding and the image token set from one vision pass.

        Every token goes through ``post_layernorm`` and ``visual_projection``; the image head aggregates the
        (unnormalised) projected patches; the projected CLS is put in front and every token is L2-normalised.

        Returns:
            `(cls_embeds (B, D) unnormalised, image_tokens (B, 1 + N_v, D) normalised, vision_outputs)`;
            ``cls_embeds`` equals `get_image_features(...).pooler_output`. `tower_kwargs` (output flags) go to the
            image tower.
        """
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **tower_kwargs
        )
        tokens = self.visual_projection(self.vision_model.post_layernorm(outputs.last_hidden_state))
        aggregated = self.image_aggregation(tokens[:, 1:])
        image_tokens = F.normalize(torch.cat([tokens[:, :1], aggregated], dim=1), dim=-1)
        return tokens[:, 0], image_tokens, outputs

    def text_spans(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """End-of-text position of each caption and the mask of the tokens the text head aggregates.

        The EOT position is the last attended token (right padding), or without a mask the first ``eos_token_id``
        (the largest id for legacy configs). With ``config.text_span_from_nonzero_ids`` it is the authors'
        ``count(ids != 0) - 1`` instead. The span is ``[0, eot)`` (start + word tokens), or ``[1, eot)`` without
        ``config.text_aggregation_include_start``.

        Returns:
            `(eot_index (B,) long, span_mask (B, L) bool)`.
        """
        length = input_ids.shape[1]
        attended = attention_mask.to(torch.bool) if attention_mask is not None else None
        if self.config.text_span_from_nonzero_ids:
            nonzero = input_ids != 0
            if attended is not None:
                nonzero = nonzero & attended
            eot = nonzero.to(torch.long).sum(-1).clamp(min=1) - 1
        else:
            eot = self.text_eot_index(input_ids, attention_mask)
        positions = torch.arange(length, device=input_ids.device)
        first = 0 if self.config.text_aggregation_include_start else 1
        span = (positions[None, :] >= first) & (positions[None, :] < eot[:, None])
        if attended is not None:
            span = span & attended
        return eot, span

    def text_token_set(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **tower_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """EOT embedding and the text token set from one text pass (`tower_kwargs`: output flags of the text tower).

        The text head aggregates the projected tokens of each caption's span (softmax over its real tokens only, so
        padding changes nothing); the EOT token is appended and every token is L2-normalised.

        Returns:
            `(eot_embeds (B, D) unnormalised, text_tokens (B, N_t + 1, D) normalised, text_token_mask (B, N_t + 1)
            bool, text_outputs)`; ``eot_embeds`` equals `get_text_features(...).pooler_output`. The mask is False for
            the aggregated tokens of a caption whose span is empty (possible only without the start token).
        """
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **tower_kwargs
        )
        tokens = self.text_projection(outputs.last_hidden_state)
        eot_embeds = self.text_projection(outputs.pooler_output)
        eot, span = self.text_spans(input_ids, attention_mask)
        aggregated = self.text_aggregation(tokens, span)
        eot_tokens = tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]
        text_tokens = F.normalize(torch.cat([aggregated, eot_tokens[:, None]], dim=1), dim=-1)
        has_span = span.any(-1)
        mask = torch.cat(
            [has_span[:, None].expand(-1, aggregated.shape[1]), torch.ones_like(has_span)[:, None]], dim=1
        )
        return eot_embeds, text_tokens, mask, outputs

    def clim(
        self,
        text_tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        text_token_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """CLIM scores `(num_images, num_texts)` of token sets, in blocks of ``chunk_size`` (default from config)."""
        return clim_scores(
            text_tokens,
            image_tokens,
            text_token_mask,
            negative_slope=self.config.clim_negative_slope,
            chunk_size=chunk_size or self.config.clim_chunk_size,
        )

    def hinge_warmup_alpha(self, step: int, steps_per_epoch: int) -> float:
        """Weight of the hinge loss at data-loader iteration ``step`` (the authors' one-epoch linear ramp).

        Pass the result as ``forward(..., warmup_alpha=...)``. Returns 1.0 when ``config.hinge_warmup`` is off.
        """
        if not self.config.hinge_warmup:
            return 1.0
        return hinge_warmup_alpha(step, steps_per_epoch, self.config.hinge_warmup_epochs)

    def training_loss_kwargs(self, step: int, steps_per_epoch: int) -> dict[str, Any]:
        """The hinge warm-up weight of this step (``warmup_alpha``)."""
        return {"warmup_alpha": self.hinge_warmup_alpha(step, steps_per_epoch)}

    # ------------------------------------------------------------------ retrieval scoring interface
    def retrieval_image_features(self, pixel_values: torch.Tensor, scoring: str = "global") -> dict[str, torch.Tensor]:
        """"global": `{"image_embeds": (B, D)}`; "fused" / "clim" add `"image_tokens": (B, 1 + N_v, D)` (normalised
        CLS + aggregated tokens), both from one vision pass."""
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_image_features(pixel_values, scoring)
        self.check_image_inputs(pixel_values)
        cls_embeds, image_tokens, _ = self.image_token_set(pixel_values)
        return {"image_embeds": F.normalize(cls_embeds, dim=-1), "image_tokens": image_tokens}

    def retrieval_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, scoring: str = "global"
    ) -> dict[str, torch.Tensor]:
        """"global": `{"text_embeds": (T, D)}`; "fused" / "clim" add `"text_tokens": (T, N_t + 1, D)` and
        `"text_token_mask": (T, N_t + 1)`. Token sets have a fixed size, so batches concatenate along dim 0."""
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_text_features(input_ids, attention_mask, scoring)
        self.check_text_inputs(input_ids, attention_mask)
        eot_embeds, text_tokens, mask, _ = self.text_token_set(input_ids, attention_mask)
        return {"text_embeds": F.normalize(eot_embeds, dim=-1), "text_tokens": text_tokens, "text_token_mask": mask}

    def retrieval_scores(
        self,
        image_features: dict[str, torch.Tensor],
        text_features: dict[str, torch.Tensor],
        scoring: str = "global",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """`(num_images, num_texts)` scores. "global": cosine; "clim": CLIM; "fused":
        ``fused_global_weight * cosine + fused_clim_weight * CLIM``. CLIM runs in blocks of ``chunk_size`` images x
        ``chunk_size`` texts (default ``config.clim_chunk_size``), so memory does not grow with the product."""
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_scores(image_features, text_features, scoring)
        fine = self.clim(
            text_features["text_tokens"],
            image_features["image_tokens"],
            text_features.get("text_token_mask"),
            chunk_size,
        )
        if scoring == "clim":
            return fine
        cosine = image_features["image_embeds"] @ text_features["text_embeds"].t()
        return self.config.fused_global_weight * cosine + self.config.fused_clim_weight * fine

    # ------------------------------------------------------------------ training
    def global_clim_scores(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_token_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIM scores of the global batch and its image ids, assembled across processes as the authors do.

        Image token sets are all-gathered with gradient; this rank scores every image against its own captions;
        those columns are all-gathered with gradient into the full matrix; image ids are gathered without gradient.
        Every rank then holds the same `(B_all, B_all)` matrix, so its loss is the loss of the whole global batch
        (and DDP's gradient averaging gives exactly the one-process gradient, since the gathers' backward sums the
        row gradients over ranks). Ranks may hold different batch sizes.

        Args:
            image_ids (`torch.Tensor` of shape `(B,)`, *optional*): this rank's image ids; None gives each pair its
                global position (no duplicates).

        Returns:
            `(scores (B_all, B_all) images x captions, image_ids (B_all,))`.
        """
        all_images, offset = gather_with_grad(image_tokens)
        local = self.clim(text_tokens, all_images, text_token_mask)  # (B_all images, B_local captions)
        columns, _ = gather_with_grad(local.t().contiguous())  # (B_all captions, B_all images)
        if image_ids is None:
            image_ids = torch.arange(offset, offset + image_tokens.shape[0], device=image_tokens.device)
        all_ids = gather_no_grad(image_ids.to(device=image_tokens.device, dtype=torch.long))
        return columns.t(), all_ids

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        warmup_alpha: float | torch.Tensor = 1.0,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
    ) -> FineLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): long captions (<= 248 tokens), right
                padded.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*): padding mask.
            image_ids (`torch.LongTensor` of shape `(batch_size,)`, *optional*): image identifiers; pairs sharing an
                id are not each other's negatives. None: every pair is a different image.
            return_loss (`bool`, *optional*): compute FineLIP's loss.
            warmup_alpha (`float`, *optional*, defaults to 1.0): weight of the hinge term for this step (the
                authors' warm-up ramp; see [`FineLIPModel.hinge_warmup_alpha`]).
            output_attentions, output_hidden_states, return_dict: as in [`LongCLIPModel.forward`].

        Returns:
            [`FineLIPOutput`]. With a batch of one pair (over all processes) the hinge loss is exactly 0: there is no
            negative.
        """
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            image_ids=image_ids,
            position_ids=position_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            keep_outputs=True,
        )
        output = self.loss_from_features(features, return_loss=bool(return_loss), warmup_alpha=warmup_alpha)
        return self._return(output, return_dict)

    # ------------------------------------------------------------------ two-stage training interface
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        keep_outputs: bool = False,
    ) -> dict[str, Any]:
        """Per-sample features of the loss: normalised global embeddings, the aggregated token sets
        (``image_tokens`` / ``text_tokens`` with ``text_token_mask``) and ``image_ids`` when given (see
        `LongCLIPModel.loss_features` for the two-stage interface)."""
        self._require_inputs(input_ids, pixel_values, attention_mask)
        towers = self.tower_kwargs(output_attentions, output_hidden_states)
        cls_embeds, image_tokens, vision_outputs = self.image_token_set(pixel_values, interpolate_pos_encoding, **towers)
        eot_embeds, text_tokens, text_mask, text_outputs = self.text_token_set(
            input_ids, attention_mask, position_ids, **towers
        )
        features: dict[str, Any] = {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "text_embeds": F.normalize(eot_embeds, dim=-1),
            "image_tokens": image_tokens,
            "text_tokens": text_tokens,
            "text_token_mask": text_mask,
        }
        if image_ids is not None:
            if image_ids.shape != (cls_embeds.shape[0],):
                raise ValueError(f"image_ids must have shape ({cls_embeds.shape[0]},), got {tuple(image_ids.shape)}")
            features["image_ids"] = image_ids.to(device=cls_embeds.device, dtype=torch.long)
        if keep_outputs:
            vision_outputs.pooler_output = cls_embeds
            text_outputs.pooler_output = eot_embeds
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(
        self, features: dict[str, Any], return_loss: bool = True, warmup_alpha: float | torch.Tensor = 1.0
    ) -> FineLIPOutput:
        """Logits and (with `return_loss`) FineLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches). `warmup_alpha` weights the hinge term (the authors' warm-up ramp)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        image_tokens, text_tokens = features["image_tokens"], features["text_tokens"]
        text_mask = features["text_token_mask"]
        loss = loss_hinge = loss_s = loss_im = loss_global = scores = None
        if return_loss:
            self._require_pairs(image_embeds, text_embeds)
            scores, all_ids = self.global_clim_scores(image_tokens, text_tokens, text_mask, features.get("image_ids"))
            loss_hinge, loss_s, loss_im = bidirectional_hinge_loss(
                scores, all_ids, margin=cfg.hinge_margin, max_violation=cfg.hinge_max_violation
            )
            loss = (cfg.fine_loss_weight * warmup_alpha) * loss_hinge
            if cfg.global_loss_weight > 0:
                loss_global = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, cfg.label_smoothing)
                loss = loss + cfg.global_loss_weight * loss_global
        output = FineLIPOutput(
            loss=loss,
            **self.clip_outputs(features),
            loss_hinge=loss_hinge,
            loss_hinge_image_anchor=loss_s,
            loss_hinge_text_anchor=loss_im,
            loss_global=loss_global,
            clim_scores=scores,
            image_tokens=image_tokens,
            text_tokens=text_tokens,
        )
        output.text_token_mask = text_mask
        return output


__all__ = ["FineLIPModel", "FineLIPOutput"]
