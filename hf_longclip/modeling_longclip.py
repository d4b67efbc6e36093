"""Long-CLIP: a CLIP model whose text encoder reads 248 tokens.

The model is transformers' ``CLIPModel`` with two changes: the text position table is stretched by
knowledge-preserving stretching (:func:`stretch_position_embeddings`) and its first ``position_keep`` rows are held
fixed during training (:class:`FrozenPrefixEmbedding`). Module names and state-dict keys are CLIP's, so a saved
Long-CLIP is a stock CLIP checkpoint with a longer position table, and exports to ``CLIPModel`` /
``CLIPTextModel`` are key copies.

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch, transformers
and sibling files of this folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    PreTrainedConfig,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_longclip import LongCLIPConfig, validate_stretch
from .losses import gather_with_grad, local_contrastive_loss, pca_reconstruct

TEXT_POSITION_KEY = "text_model.embeddings.position_embedding.weight"


def stretch_position_embeddings(
    table: torch.Tensor, keep: int = 20, ratio: int = 4, target_length: int | None = None
) -> torch.Tensor:
    """Knowledge-preserving stretch of a position table (Long-CLIP).

    Rows ``0..keep-1`` are copied. Every later source row ``P[j]`` becomes ``ratio`` rows
    ``(1 - k/ratio) * P[j] + (k/ratio) * P[j+1]`` for ``k = 0..ratio-1``; for the last source row, ``P[j+1]`` is the
    linear extrapolation ``2 P[-1] - P[-2]``. A 77-row table with keep 20 and ratio 4 becomes 248 rows:
    rows 20..243 interpolated, 244..247 extrapolated past the last source row.

    The arithmetic runs in at least fp32 and the result has the input's dtype (the authors stretched after casting
    to fp16, which rounds even the copied rows; we do not).

    Args:
        table (`torch.Tensor` of shape `(source_length, dim)`): the source position table.
        keep (`int`): leading rows copied unchanged.
        ratio (`int`): rows produced from each remaining source row.
        target_length (`int`, *optional*): expected output length; a mismatch raises before any work.

    Returns:
        `torch.Tensor` of shape `(keep + ratio * (source_length - keep), dim)`.
    """
    if table.dim() != 2:
        raise ValueError(f"expected a (positions, dim) table, got shape {tuple(table.shape)}")
    source_length = table.shape[0]
    validate_stretch(source_length, keep, ratio, target_length)
    work = table.detach().float() if table.dtype in (torch.float16, torch.bfloat16) else table.detach()
    tail = work[keep:]
    following = torch.cat([tail[1:], (2 * work[-1] - work[-2]).unsqueeze(0)], dim=0)
    weights = torch.arange(ratio, dtype=work.dtype, device=work.device) / ratio
    mixed = tail.unsqueeze(1) * (1 - weights)[None, :, None] + following.unsqueeze(1) * weights[None, :, None]
    stretched = torch.cat([work[:keep], mixed.reshape(-1, work.shape[1])], dim=0)
    return stretched.to(table.dtype)


class FrozenPrefixEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose first ``keep`` rows never change during training.

    The forward reads rows ``< keep`` from a non-persistent snapshot buffer (``frozen_rows``), so they receive no
    gradient and optimiser side effects on ``weight[:keep]`` (e.g. decoupled weight decay) cannot reach the output.
    ``state_dict()`` writes the snapshot back into ``weight``, so checkpoints hold one merged table under the usual
    key; loading refreshes the snapshot.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, keep: int):
        super().__init__(num_embeddings, embedding_dim)
        if not 0 <= keep < num_embeddings:
            raise ValueError(f"keep ({keep}) must be in [0, {num_embeddings})")
        self.keep = keep
        self.register_buffer("frozen_rows", torch.zeros(keep, embedding_dim), persistent=False)
        # Loaders may materialise the (non-persistent) snapshot after the weights, or leave it uninitialised:
        # until `sync_frozen_rows` runs, the weight itself is the truth and the first forward takes the snapshot.
        self._needs_sync = True
        self._register_state_dict_hook(FrozenPrefixEmbedding._merge_into_state_dict)
        self.register_load_state_dict_post_hook(FrozenPrefixEmbedding._after_load)

    @torch.no_grad()
    def sync_frozen_rows(self) -> None:
        """Take ``weight[:keep]`` as the frozen rows (after loading or editing the table)."""
        if self.weight.device.type != "meta":
            self.frozen_rows = self.weight[: self.keep].detach().clone()
            self._needs_sync = False

    def effective_weight(self) -> torch.Tensor:
        """The table the forward uses: frozen rows, then the trainable rows."""
        if not self.keep:
            return self.weight
        if self._needs_sync:
            self.sync_frozen_rows()
        return torch.cat([self.frozen_rows.to(self.weight.dtype), self.weight[self.keep :]], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.effective_weight())

    @staticmethod
    def _merge_into_state_dict(module, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        if module.keep and key in state_dict and not module._needs_sync:
            weight = state_dict[key]
            state_dict[key] = torch.cat([module.frozen_rows.to(weight.dtype), weight[module.keep :].detach()], dim=0)
        return state_dict

    @staticmethod
    def _after_load(module, incompatible_keys):
        module.sync_frozen_rows()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen_rows={self.keep}"


@dataclass
class LongCLIPOutput(ModelOutput):
    """
    Output of [`LongCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            ``long_loss_weight * loss_long + short_loss_weight * loss_short``.
        loss_long (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE between images and long captions (label smoothing from the config).
        loss_short (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE between the PCA reconstruction of the image features and the short captions; present when short
            captions were given.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of images (rows) and long captions (columns).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised long-caption embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised image embeddings.
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            L2-normalised short-caption embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            Output of the text encoder for the long captions.
        vision_model_output (`BaseModelOutputWithPooling`):
            Output of the image encoder.
    """

    loss: torch.FloatTensor | None = None
    loss_long: torch.FloatTensor | None = None
    loss_short: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys())
        )


def _clip_config_from(config: PreTrainedConfig) -> CLIPConfig:
    """A stock ``CLIPConfig`` with the same towers (and the stretched text length) as ``config``."""
    return CLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


class LongCLIPModel(CLIPModel):
    r"""
    CLIP with a 248-token text encoder (Long-CLIP, Zhang et al., ECCV 2024).

    The module layout and state-dict keys are transformers' [`CLIPModel`]; the text position table has
    `config.text_config.max_position_embeddings` rows (248 by default) and its first `config.position_keep` rows
    are frozen. `forward(..., return_loss=True)` computes Long-CLIP's loss: InfoNCE between images and long
    captions plus InfoNCE between the 32-component PCA reconstruction of the batch's image features and the short
    captions, both with label smoothing 0.1. Under `torch.distributed` the features are gathered with gradient and
    every rank scores its own rows (local loss).

    Example:

    ```python
    >>> import torch
    >>> from transformers import AutoModel, AutoProcessor
    >>> import hf_longclip  # registers the model with the Auto classes
    >>> model = hf_longclip.LongCLIPModel.from_clip("openai/clip-vit-base-patch16")  # stretch a stock CLIP
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> inputs = processor(text=["a long caption ..."], return_tensors="pt")
    >>> with torch.inference_mode():
    ...     text_features = model.get_text_features(**inputs).pooler_output
    ```
    """

    config_class = LongCLIPConfig
    config: LongCLIPConfig

    def __init__(self, config: LongCLIPConfig):
        super().__init__(config)
        embeddings = self.text_model.embeddings
        old = embeddings.position_embedding
        keep = config.position_keep if config.freeze_kept_positions else 0
        frozen = FrozenPrefixEmbedding(old.num_embeddings, old.embedding_dim, keep)
        frozen.weight = old.weight  # keep the initialised parameter; only the forward changes
        frozen.frozen_rows = frozen.frozen_rows.to(device=old.weight.device, dtype=old.weight.dtype)
        embeddings.position_embedding = frozen
        frozen.sync_frozen_rows()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FrozenPrefixEmbedding):
            module.sync_frozen_rows()

    # ------------------------------------------------------------------ features
    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Projected pooled (EOT) text embeddings, L2-normalised unless ``normalize=False``."""
        features = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Projected CLS image embeddings, L2-normalised unless ``normalize=False``."""
        features = self.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(features, dim=-1) if normalize else features

    def get_text_token_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every text token after the final LayerNorm and the text projection: `(batch, seq_len, projection_dim)`."""
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(hidden)

    def get_image_token_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every image token (CLS first) after the post-LayerNorm and the visual projection.

        transformers' ``last_hidden_state`` is taken *before* ``post_layernorm`` (only the pooled CLS is normalised),
        so the LayerNorm is applied here to all tokens. Shape `(batch, 1 + num_patches, projection_dim)`.
        """
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    # ------------------------------------------------------------------ retrieval scoring interface
    # Evaluation talks to every variant through these three methods: features are computed per batch, concatenated
    # along dim 0 by the caller, then scored. Variants with fine-grained scores override them and accept more
    # `scoring` modes; the base model supports "global" (cosine of CLS and EOT embeddings).
    retrieval_scorings: tuple[str, ...] = ("global",)

    def _check_scoring(self, scoring: str) -> None:
        if scoring not in self.retrieval_scorings:
            raise ValueError(
                f"{type(self).__name__} supports scoring {self.retrieval_scorings}, not {scoring!r}"
            )

    def retrieval_image_features(self, pixel_values: torch.Tensor, scoring: str = "global") -> dict[str, torch.Tensor]:
        """Per-image features needed by `retrieval_scores` (a dict of tensors with the images on dim 0)."""
        self._check_scoring(scoring)
        return {"image_embeds": self.encode_image(pixel_values)}

    def retrieval_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, scoring: str = "global"
    ) -> dict[str, torch.Tensor]:
        """Per-text features needed by `retrieval_scores` (a dict of tensors with the texts on dim 0)."""
        self._check_scoring(scoring)
        return {"text_embeds": self.encode_text(input_ids, attention_mask)}

    def retrieval_scores(
        self, image_features: dict[str, torch.Tensor], text_features: dict[str, torch.Tensor], scoring: str = "global"
    ) -> torch.Tensor:
        """Similarity matrix `(num_images, num_texts)`; higher is more similar."""
        self._check_scoring(scoring)
        return image_features["image_embeds"] @ text_features["text_embeds"].t()

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LongCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): long-caption token ids (<= 248).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor`, *optional*): padding mask of `input_ids`.
            short_input_ids (`torch.LongTensor` of shape `(batch_size, short_len)`, *optional*):
                short-caption ids, encoded at their own length. Needed for the short-caption loss term.
            short_attention_mask (`torch.Tensor`, *optional*): padding mask of `short_input_ids`.
            return_loss (`bool`, *optional*): compute Long-CLIP's loss.

        Returns:
            [`LongCLIPOutput`]
        """
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            short_input_ids=short_input_ids,
            short_attention_mask=short_attention_mask,
            position_ids=position_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
            keep_outputs=True,
        )
        output = self.loss_from_features(features, return_loss=bool(return_loss))
        if return_dict is False:
            return output.to_tuple()
        return output

    # ------------------------------------------------------------------ two-stage training interface
    # `forward` = `loss_from_features(loss_features(...))`. The split lets the trainer cache the features of many
    # micro-batches and compute one loss over all of them (hf_longclip.training.accumulation): `loss_features` works
    # per sample (samples on dim 0), `loss_from_features` is where samples meet.
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        keep_outputs: bool = False,
        **kwargs,
    ) -> dict[str, Any]:
        """Per-sample features the loss needs: normalised ``image_embeds``, ``text_embeds`` and (when short captions
        are given) ``short_text_embeds``, each `(batch, projection_dim)`. With `keep_outputs` the towers' outputs
        are included too (``vision_model_output``, ``text_model_output``)."""
        if input_ids is None or pixel_values is None:
            raise ValueError(f"{type(self).__name__}.forward needs both input_ids and pixel_values")
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        )
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        features: dict[str, Any] = {
            "image_embeds": F.normalize(vision_outputs.pooler_output, dim=-1),
            "text_embeds": F.normalize(text_outputs.pooler_output, dim=-1),
        }
        if short_input_ids is not None:
            features["short_text_embeds"] = self.encode_text(short_input_ids, short_attention_mask)
        if keep_outputs:
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True, **kwargs) -> LongCLIPOutput:
        """Logits and (with `return_loss`) Long-CLIP's loss from `loss_features` output (possibly concatenated
        over micro-batches)."""
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        loss = loss_long = loss_short = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"the loss pairs image i with caption i: got {image_embeds.shape[0]} images and "
                    f"{text_embeds.shape[0]} captions"
                )
            cfg = self.config
            loss_long = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, cfg.label_smoothing)
            loss = cfg.long_loss_weight * loss_long
            if short_embeds is not None:
                image_primary = self._primary_components(image_embeds)
                loss_short = local_contrastive_loss(image_primary, short_embeds, self.logit_scale, cfg.label_smoothing)
                loss = loss + cfg.short_loss_weight * loss_short
        return LongCLIPOutput(
            loss=loss,
            loss_long=loss_long,
            loss_short=loss_short,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            short_text_embeds=short_embeds,
            text_model_output=features.get("text_model_output"),
            vision_model_output=features.get("vision_model_output"),
        )

    def _primary_components(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """PCA reconstruction of the image features for the short-caption term (not re-normalised).

        ``pca_scope="local"`` (the authors'): over this process's batch. ``"global"``: over the batch of all
        processes (gathered with gradient), so the loss no longer depends on how the batch is split.
        """
        components = self.config.pca_components
        if self.config.pca_scope == "global":
            gathered, offset = gather_with_grad(image_embeds)
            if gathered.shape[0] != image_embeds.shape[0]:
                return pca_reconstruct(gathered, components)[offset : offset + image_embeds.shape[0]]
        return pca_reconstruct(image_embeds, components)

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_clip(cls, clip_config: CLIPConfig, **overrides) -> LongCLIPConfig:
        """A `LongCLIPConfig` with the towers of a stock `CLIPConfig`; `overrides` set Long-CLIP fields."""
        source_rows = overrides.pop("source_max_position_embeddings", clip_config.text_config.max_position_embeddings)
        keep = overrides.pop("position_keep", 20)
        ratio = overrides.pop("position_ratio", 4)
        validate_stretch(source_rows, keep, ratio)
        text = clip_config.text_config.to_dict()
        text["max_position_embeddings"] = keep + ratio * (source_rows - keep)
        return LongCLIPConfig(
            text_config=text,
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            logit_scale_init_value=overrides.pop("logit_scale_init_value", 4.6052),
            source_max_position_embeddings=source_rows,
            position_keep=keep,
            position_ratio=ratio,
            **overrides,
        )

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int = 20,
        position_ratio: int = 4,
        reset_logit_scale: bool = True,
        **kwargs,
    ) -> LongCLIPModel:
        """Build a Long-CLIP from a stock CLIP by stretching its text position table.

        Args:
            clip: a Hub id (e.g. ``"openai/clip-vit-base-patch16"``), a local folder, or a loaded `CLIPModel`.
                A folder or id holding a saved Long-CLIP is loaded as it is.
            position_keep, position_ratio: the stretch geometry (77 rows -> 248 with 20, 4).
            reset_logit_scale: set ``logit_scale`` to ln(100), as Long-CLIP does before fine-tuning.
            kwargs: Long-CLIP config fields (loss weights, ...); for a Hub id or folder, `from_pretrained` options
                such as ``revision``, ``cache_dir``, ``local_files_only``, ``torch_dtype`` are passed on.
        """
        config_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in LongCLIPConfig.__dataclass_fields__}
        if isinstance(clip, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            source_config = AutoConfig.from_pretrained(clip, **hub_kwargs)
            if getattr(source_config, "model_type", None) == LongCLIPConfig.model_type:
                return cls.from_pretrained(clip, **kwargs)
            clip = CLIPModel.from_pretrained(clip, **kwargs)
        elif kwargs:  # loading options mean nothing for a model object: most likely a misspelt config field
            raise TypeError(
                f"from_clip got unexpected keyword arguments {sorted(kwargs)} (not {cls.config_class.__name__} fields)"
            )
        if not isinstance(clip, CLIPModel):
            raise TypeError(f"from_clip expects a CLIPModel, a Hub id or a folder, got {type(clip).__name__}")
        source_state = clip.state_dict()
        source_table = source_state[TEXT_POSITION_KEY]
        config = cls.config_from_clip(
            clip.config,
            source_max_position_embeddings=source_table.shape[0],
            position_keep=position_keep,
            position_ratio=position_ratio,
            **config_fields,
        )
        source_state[TEXT_POSITION_KEY] = stretch_position_embeddings(
            source_table, position_keep, position_ratio, config.text_config.max_position_embeddings
        )
        model = cls(config).to(dtype=source_table.dtype)
        model.load_state_dict(source_state, strict=True)
        if reset_logit_scale:
            with torch.no_grad():
                model.logit_scale.fill_(config.logit_scale_init_value)
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved Long-CLIP; a stock CLIP checkpoint (model_type ``clip``) is stretched via `from_clip`."""
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            hub_kwargs = {
                k: kwargs[k]
                for k in ("revision", "cache_dir", "local_files_only", "token", "subfolder")
                if k in kwargs
            }
            try:
                config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
            except (OSError, ValueError):
                config_dict = {}
            if config_dict.get("model_type") == "clip":
                return cls.from_clip(pretrained_model_name_or_path, **kwargs)
        # Load with mismatches allowed so that a wrong position table gets an error naming both sizes
        # (transformers' own error only points at a log report); other mismatches still raise unless asked.
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        mismatched = list(info.get("mismatched_keys", []))
        for key, checkpoint_shape, model_shape in mismatched:
            if key.endswith(TEXT_POSITION_KEY):
                raise ValueError(
                    f"the checkpoint's text position table has {checkpoint_shape[0]} rows, but this configuration "
                    f"expects {model_shape[0]} (stretched from {model.config.source_max_position_embeddings} with "
                    f"keep={model.config.position_keep}, ratio={model.config.position_ratio}); a stock "
                    f"{model.config.source_max_position_embeddings}-row CLIP is stretched with LongCLIPModel.from_clip"
                )
        if mismatched and not allow_mismatch:
            details = ", ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
            raise ValueError(f"checkpoint shapes do not match the configuration: {details}")
        for module in model.modules():
            if isinstance(module, FrozenPrefixEmbedding):
                module.sync_frozen_rows()
        return (model, info) if want_info else model

    # ------------------------------------------------------------------ export
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The CLIP-keyed state dict with the frozen rows merged into the single position table."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def to_clip_model(self) -> CLIPModel:
        """A stock transformers `CLIPModel` (248 text positions) with this model's weights and outputs."""
        clip = CLIPModel(_clip_config_from(self.config)).to(dtype=self.dtype)
        clip.load_state_dict(self._shared_state(), strict=True)
        return clip.eval()

    def to_text_model(self, with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
        """A stock `CLIPTextModel` (or `CLIPTextModelWithProjection`) with 248 positions, e.g. for diffusers."""
        text_config = CLIPTextConfig(**{**self.config.text_config.to_dict(), "projection_dim": self.config.projection_dim})
        state = {k: v for k, v in self._shared_state().items() if k.startswith("text_model.")}
        if with_projection:
            model = CLIPTextModelWithProjection(text_config)
            state["text_projection.weight"] = self.text_projection.weight.detach()
        else:  # CLIPTextModel holds the text tower at its root, without the `text_model.` prefix
            model = CLIPTextModel(text_config)
            state = {k[len("text_model.") :]: v for k, v in state.items()}
        model = model.to(dtype=self.dtype)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def to_vision_model(self) -> CLIPVisionModel:
        """A stock `CLIPVisionModel` with this model's image tower."""
        model = CLIPVisionModel(self.config.vision_config).to(dtype=self.dtype)
        state = {k[len("vision_model.") :]: v for k, v in self._shared_state().items() if k.startswith("vision_model.")}
        model.load_state_dict(state, strict=True)
        return model.eval()

    def _shared_state(self) -> dict[str, torch.Tensor]:
        """State entries that belong to the stock CLIP layout (variants add head modules beside them)."""
        stock = ("text_model.", "vision_model.", "text_projection.", "visual_projection.", "logit_scale")
        return {k: v for k, v in self.merged_state_dict().items() if k.startswith(stock)}


__all__ = [
    "FrozenPrefixEmbedding",
    "LongCLIPModel",
    "LongCLIPOutput",
    "stretch_position_embeddings",
    "TEXT_POSITION_KEY",
]
