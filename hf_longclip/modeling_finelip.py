"""FineLIP: Long-CLIP with token aggregation (ATRM) and cross-modal late interaction (CLIM).

Training-time extras on a Long-CLIP backbone (Asokan, Wu, Albreiki, CVPR 2025):

* every image token after the post-LayerNorm and the visual projection, every text token after the final LayerNorm
  and the text projection;
* two `TokenAggregation` heads (FineLIP's ATRM) turn the projected patches and the projected start + word tokens into
  ``N_s`` mixtures each (39 for ViT-B/16); the CLS token is put in front of the image mixtures and the EOT token
  after the text mixtures, and every token is L2-normalised: two sets of ``N_s + 1`` tokens;
* CLIM scores every caption against every image of the (global) batch, and a bidirectional hinge loss on those
  scores is the whole training loss by default (the authors' code has no InfoNCE term in FineLIP mode).

At inference the model is a Long-CLIP (global CLS / EOT cosine); the "fused" retrieval score
``0.8 * global + 0.2 * CLIM`` is available through the retrieval interface.

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

from .configuration_finelip import FineLIPConfig
from .configuration_longclip import LongCLIPConfig
from .late_interaction import bidirectional_hinge_loss, clim_scores, hinge_warmup_alpha
from .losses import gather_no_grad, gather_with_grad, local_contrastive_loss
from .modeling_longclip import LongCLIPModel
from .token_aggregation import TokenAggregation


@dataclass
class FineLIPOutput(ModelOutput):
    """
    Output of [`FineLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            ``fine_loss_weight * warmup_alpha * loss_hinge + global_loss_weight * loss_global``. Under
            torch.distributed every rank holds the same hinge term (the loss of the whole global batch).
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
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled global cosine similarities (local batch), as in CLIP.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised EOT embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised CLS embeddings.
        image_tokens (`torch.FloatTensor` of shape `(batch_size, 1 + N_v, projection_dim)`):
            L2-normalised CLS token followed by the aggregated image tokens.
        text_tokens (`torch.FloatTensor` of shape `(batch_size, N_t + 1, projection_dim)`):
            L2-normalised aggregated text tokens followed by the EOT token.
        text_token_mask (`torch.BoolTensor` of shape `(batch_size, N_t + 1)`):
            True for valid text tokens (all of them unless a caption has an empty aggregation span).
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the text encoder.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the image encoder.
    """

    loss: torch.FloatTensor | None = None
    loss_hinge: torch.FloatTensor | None = None
    loss_hinge_image_anchor: torch.FloatTensor | None = None
    loss_hinge_text_anchor: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    clim_scores: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_tokens: torch.FloatTensor | None = None
    text_tokens: torch.FloatTensor | None = None
    text_token_mask: torch.BoolTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))


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
    and ``warmup_alpha``, the ramp weight of the hinge loss; compute it with [`FineLIPModel.hinge_warmup_alpha`]
    from the training step.

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
    retrieval_scorings: tuple[str, ...] = ("global", "fused", "clim")

    def __init__(self, config: FineLIPConfig):
        super().__init__(config)
        dim = config.projection_dim
        self.image_aggregation = TokenAggregation(dim, config.image_aggregation_size, config.aggregation_hidden_ratio)
        self.text_aggregation = TokenAggregation(dim, config.text_aggregation_size, config.aggregation_hidden_ratio)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # PyTorch's default init (the authors'): children are initialised before their parent, so this replaces the
        # generic init of the heads' LayerNorm / Linear layers.
        if isinstance(module, TokenAggregation):
            for layer in (module.norm, module.fc1, module.fc2):
                layer.reset_parameters()
            module.scale.fill_(1.0)

    # ------------------------------------------------------------------ token sets
    def image_token_set(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """CLS embedding and the image token set from one vision pass.

        Every token goes through ``post_layernorm`` and ``visual_projection``; the image head aggregates the
        (unnormalised) projected patches; the projected CLS is put in front and every token is L2-normalised.

        Returns:
            `(cls_embeds (B, D) unnormalised, image_tokens (B, 1 + N_v, D) normalised, vision_outputs)`;
            ``cls_embeds`` equals `get_image_features(...).pooler_output`.
        """
        outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
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
        batch, length = input_ids.shape
        attended = attention_mask.to(torch.bool) if attention_mask is not None else None
        if self.config.text_span_from_nonzero_ids:
            nonzero = input_ids != 0
            if attended is not None:
                nonzero = nonzero & attended
            eot = nonzero.to(torch.long).sum(-1).clamp(min=1) - 1
        elif attended is not None:
            eot = attended.to(torch.long).sum(-1).clamp(min=1) - 1
        else:
            eos = self.config.text_config.eos_token_id
            if eos in (None, 2):  # legacy OpenAI configs: the end-of-text id is the largest id
                eot = input_ids.argmax(-1)
            else:
                is_eos = input_ids == eos
                eot = torch.where(is_eos.any(-1), is_eos.to(torch.long).argmax(-1), length - 1)
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BaseModelOutputWithPooling]:
        """EOT embedding and the text token set from one text pass.

        The text head aggregates the projected tokens of each caption's span (softmax over its real tokens only, so
        padding changes nothing); the EOT token is appended and every token is L2-normalised.

        Returns:
            `(eot_embeds (B, D) unnormalised, text_tokens (B, N_t + 1, D) normalised, text_token_mask (B, N_t + 1)
            bool, text_outputs)`; ``eot_embeds`` equals `get_text_features(...).pooler_output`. The mask is False for
            the aggregated tokens of a caption whose span is empty (possible only without the start token).
        """
        if input_ids.shape[-1] > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"captions have {input_ids.shape[-1]} tokens but the text encoder reads at most "
                f"{self.config.text_config.max_position_embeddings}; tokenise with truncation"
            )
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
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

    # ------------------------------------------------------------------ retrieval scoring interface
    def retrieval_image_features(self, pixel_values: torch.Tensor, scoring: str = "global") -> dict[str, torch.Tensor]:
        """"global": `{"image_embeds": (B, D)}`; "fused" / "clim" add `"image_tokens": (B, 1 + N_v, D)` (normalised
        CLS + aggregated tokens), both from one vision pass."""
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_image_features(pixel_values, scoring)
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
        return_dict: bool | None = None,
        **kwargs,
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
            keep_outputs=True,
        )
        output = self.loss_from_features(features, return_loss=bool(return_loss), warmup_alpha=warmup_alpha)
        if return_dict is False:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------ two-stage training interface
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        keep_outputs: bool = False,
        **kwargs,
    ) -> dict[str, Any]:
        """Per-sample features of the loss: normalised global embeddings, the aggregated token sets
        (``image_tokens`` / ``text_tokens`` with ``text_token_mask``) and ``image_ids`` when given (see
        `LongCLIPModel.loss_features` for the two-stage interface)."""
        if input_ids is None or pixel_values is None:
            raise ValueError("FineLIPModel.forward needs both input_ids and pixel_values")
        cls_embeds, image_tokens, vision_outputs = self.image_token_set(pixel_values, interpolate_pos_encoding)
        eot_embeds, text_tokens, text_mask, text_outputs = self.text_token_set(input_ids, attention_mask, position_ids)
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
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(
        self, features: dict[str, Any], return_loss: bool = True, warmup_alpha: float | torch.Tensor = 1.0, **kwargs
    ) -> FineLIPOutput:
        """Logits and (with `return_loss`) FineLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches). `warmup_alpha` weights the hinge term (the authors' warm-up ramp)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        image_tokens, text_tokens = features["image_tokens"], features["text_tokens"]
        text_mask = features["text_token_mask"]
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()

        loss = loss_hinge = loss_s = loss_im = loss_global = scores = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"the loss pairs image i with caption i: got {image_embeds.shape[0]} images and "
                    f"{text_embeds.shape[0]} captions"
                )
            scores, all_ids = self.global_clim_scores(image_tokens, text_tokens, text_mask, features.get("image_ids"))
            loss_hinge, loss_s, loss_im = bidirectional_hinge_loss(
                scores, all_ids, margin=cfg.hinge_margin, max_violation=cfg.hinge_max_violation
            )
            loss = (cfg.fine_loss_weight * warmup_alpha) * loss_hinge
            if cfg.global_loss_weight > 0:
                loss_global = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, cfg.label_smoothing)
                loss = loss + cfg.global_loss_weight * loss_global

        return FineLIPOutput(
            loss=loss,
            loss_hinge=loss_hinge,
            loss_hinge_image_anchor=loss_s,
            loss_hinge_text_anchor=loss_im,
            loss_global=loss_global,
            clim_scores=scores,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            image_tokens=image_tokens,
            text_tokens=text_tokens,
            text_token_mask=text_mask,
            text_model_output=features.get("text_model_output"),
            vision_model_output=features.get("vision_model_output"),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_clip(cls, clip_config, **overrides) -> FineLIPConfig:
        """A `FineLIPConfig` with the towers of a stock `CLIPConfig`; `overrides` set Long-CLIP / FineLIP fields."""
        own = {k: overrides.pop(k) for k in list(overrides) if k in _FINELIP_FIELDS}
        base = LongCLIPModel.config_from_clip(clip_config, **overrides)
        return _finelip_config_from(base, **own)

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int = 20,
        position_ratio: int = 4,
        reset_logit_scale: bool = True,
        **kwargs,
    ) -> FineLIPModel:
        """Build a FineLIP from a stock CLIP (Hub id, folder or `CLIPModel`): stretch the text positions as Long-CLIP
        does and add freshly initialised aggregation heads. A folder holding a saved FineLIP is loaded as it is.
        FineLIP config fields (e.g. ``hinge_margin=0.2``, ``global_loss_weight=1.0``) may be passed as keywords."""
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _FINELIP_FIELDS}
        if isinstance(clip, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            source_config = AutoConfig.from_pretrained(clip, **hub_kwargs)
            if getattr(source_config, "model_type", None) == FineLIPConfig.model_type:
                return cls.from_pretrained(clip, **kwargs, **own)
        backbone = LongCLIPModel.from_clip(clip, position_keep, position_ratio, reset_logit_scale, **kwargs)
        model = cls(_finelip_config_from(backbone.config, **own)).to(dtype=backbone.dtype)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or any(not key.startswith(("image_aggregation.", "text_aggregation.")) for key in missing):
            raise RuntimeError(f"unexpected backbone keys {unexpected} / missing {missing}")
        return model.eval()


# Fields a FineLIP config sets beyond Long-CLIP's.
_FINELIP_FIELDS = frozenset(FineLIPConfig.__dataclass_fields__) - frozenset(LongCLIPConfig.__dataclass_fields__)


def _finelip_config_from(config: LongCLIPConfig, **fields) -> FineLIPConfig:
    """A `FineLIPConfig` with the towers, stretch geometry and loss fields of a Long-CLIP config."""
    inherited = {
        k: getattr(config, k)
        for k in ("logit_scale_init_value", "source_max_position_embeddings", "position_keep", "position_ratio",
                  "freeze_kept_positions", "label_smoothing")
    }
    return FineLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
        **inherited,
        **fields,
    )


__all__ = ["FineLIPModel", "FineLIPOutput"]
