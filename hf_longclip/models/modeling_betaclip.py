"""beta-CLIP (Zohra et al., CVPR 2026): Long-CLIP plus a text-conditioned pooling block over the image patches, trained
with beta-CAL over the caption, its sentences and its phrases. See docs/betaclip.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_betaclip import BetaCLIPConfig
from .losses_betaclip import BetaCALoss, global_contrastive_loss
from .modeling_longclip import CLIPVariantOutput, EncoderRecorder, LongCLIPModel, resolve_output_flags

#: Upper bound of both logit scales: the authors clamp them to [0, 4.6052] (ln 100, rounded) after every step.
MAX_LOGIT_SCALE = 4.6052


class TextConditionedPooler(nn.Module):
    """beta-CLIP's conditioning block (the authors' ``AttentionPoolingMLPBlock``).

    ``a = MHA(q = L2(texts), k = v = L2(image tokens))``, then ``out = a + MLP(LN(a))`` with a ``mlp_ratio`` wide MLP.
    There is no residual from the query and no LayerNorm on q/k/v (the L2 normalisation of the inputs plays that
    role), and no zero-attention slot, unlike FLAIR's pooling block. The block owns the beta-CAL ``logit_scale``.

    The attention uses ``nn.MultiheadAttention``'s parameters (state-dict keys ``attn.in_proj_weight`` ...), computed
    in two steps so that the key/value projection of an image can be reused for many query chunks (retrieval).

    Args:
        dim (`int`): embedding size (the joint projection dim).
        num_heads (`int`): attention heads.
        mlp_ratio (`float`): MLP hidden width over `dim`.
        hidden_act (`str`): MLP activation (QuickGELU in the authors' code).
        logit_scale_init (`float`): initial log temperature of beta-CAL.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        hidden_act: str = "quick_gelu",
        logit_scale_init: float = math.log(1 / 0.07),
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.logit_scale_init = logit_scale_init
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.layer_norm = nn.LayerNorm(dim)
        hidden = int(round(dim * mlp_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.activation = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden, dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    @torch.no_grad()
    def reset_parameters(self, factor: float = 1.0) -> None:
        """PyTorch's default initialisation (what the authors' block gets), with the weight bounds scaled by
        ``factor`` (CLIP's ``initializer_factor``), through transformers' init helpers so that weights loaded by
        `from_pretrained` are left alone. The temperature starts at ``logit_scale_init`` whatever the factor."""
        init.xavier_uniform_(self.attn.in_proj_weight, gain=factor)
        init.zeros_(self.attn.in_proj_bias)
        init.zeros_(self.attn.out_proj.bias)
        for linear in (self.attn.out_proj, self.fc1, self.fc2):
            bound = factor / math.sqrt(linear.in_features)
            # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            init.uniform_(linear.weight, -bound, bound)
        for linear in (self.fc1, self.fc2):
            bound = factor / math.sqrt(linear.in_features)
            init.uniform_(linear.bias, -bound, bound)
        init.ones_(self.layer_norm.weight)
        init.zeros_(self.layer_norm.bias)
        init.constant_(self.logit_scale, self.logit_scale_init)

    def project_keys(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value heads of L2-normalised image tokens.

        Args:
            image_tokens (`torch.FloatTensor` of shape `(B, P, D)`): projected image tokens (normalised here).

        Returns:
            `(keys, values)`, each of shape `(B, heads, P, D // heads)`.
        """
        tokens = F.normalize(image_tokens, dim=-1)
        _, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        _, b_k, b_v = self.attn.in_proj_bias.chunk(3)
        return self._heads(F.linear(tokens, w_k, b_k)), self._heads(F.linear(tokens, w_v, b_v))

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Pool projected keys/values with query texts.

        Args:
            queries (`torch.FloatTensor` of shape `(B, Q, D)`): query text embeddings (normalised here).
            keys, values: from `project_keys`, batch `B` (or broadcastable to it).

        Returns:
            `torch.FloatTensor` of shape `(B, Q, D)`: text-conditioned image embeddings (not normalised).
        """
        w_q = self.attn.in_proj_weight[: self.dim]
        b_q = self.attn.in_proj_bias[: self.dim]
        q = self._heads(F.linear(F.normalize(queries, dim=-1), w_q, b_q))
        pooled = F.scaled_dot_product_attention(q, keys, values)
        batch, _, num_queries, _ = pooled.shape
        pooled = self.attn.out_proj(pooled.transpose(1, 2).reshape(batch, num_queries, self.dim))
        return pooled + self.fc2(self.activation(self.fc1(self.layer_norm(pooled))))

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Condition each image on its queries: `(B, Q, D)` texts x `(B, P, D)` image tokens -> `(B, Q, D)`."""
        keys, values = self.project_keys(image_tokens)
        return self.attend(queries, keys, values)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.dim // self.num_heads).transpose(1, 2)


@dataclass
class BetaCLIPOutput(CLIPVariantOutput):
    """
    Output of [`BetaCLIPModel.forward`]: the fields of [`CLIPVariantOutput`] (``loss`` is
    ``global_loss_weight * loss_global + beta_cal_loss_weight * loss_beta_cal``), then

    Args:
        loss_global (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE between the CLS image embeddings and the caption (EOT) embeddings, no label smoothing.
        loss_beta_cal (`torch.FloatTensor` of shape `()`, *optional*):
            beta-CAL (CE or BCE form, `config.beta_cal_mode`) over all `B * Kq` query slots of this process.
        query_text_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`, *optional*):
            L2-normalised query text embeddings, slots ordered caption, sentences, phrases; zero for padded slots
            (unless the authors' padded-column behaviour is on, then padded slots hold the encoded padding rows).
            Present when the hierarchy is encoded (`return_loss`, or sentence / phrase inputs given).
        conditioned_image_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`, *optional*):
            L2-normalised text-conditioned image embeddings, one per query slot.

    Attributes (not outputs):
        query_mask (`torch.BoolTensor` of shape `(batch_size, num_queries)`): True for real query slots.
    """

    loss_global: torch.FloatTensor | None = None
    loss_beta_cal: torch.FloatTensor | None = None
    query_text_embeds: torch.FloatTensor | None = None
    conditioned_image_embeds: torch.FloatTensor | None = None

    query_mask: ClassVar[torch.BoolTensor | None] = None


class BetaCLIPModel(LongCLIPModel):
    r"""
    beta-CLIP: Long-CLIP plus a text-conditioned pooling block trained with beta-CAL.

    Training inputs are an image, its caption, and per image up to `Ks` sentences and `Kp` phrases (build them with
    `BetaCLIPCollator`). The query slots of an image are `[caption, sentences..., phrases...]`
    (`Kq = 1 + Ks + Kp`). `forward(..., return_loss=True)` returns the global CLS <-> caption InfoNCE and beta-CAL.
    After every optimiser step the trainer should call :meth:`clamp_logit_scales` (both temperatures are kept in
    [0, 4.6052], ln 100 rounded, as the authors clamp).

    At inference the CLS and EOT embeddings are a stock CLIP's (`retrieval_scorings` "global"); "tci" scores each
    image conditioned on each query text against that text.

    Example:

    ```python
    >>> import torch, hf_longclip
    >>> model = hf_longclip.BetaCLIPModel.from_clip("openai/clip-vit-base-patch16")
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> collator = hf_longclip.data.BetaCLIPCollator(processor)
    >>> batch = collator([{"image": image, "caption": "A dog on a sofa. The sofa is red."}])
    >>> loss = model(**batch, return_loss=True).loss
    >>> loss.backward(); optimizer.step(); model.clamp_logit_scales()
    ```
    """

    config_class = BetaCLIPConfig
    config: BetaCLIPConfig
    _no_split_modules = [*(getattr(LongCLIPModel, "_no_split_modules", None) or []), "TextConditionedPooler"]
    head_modules: ClassVar[tuple[str, ...]] = ("text_conditioned_pooler",)
    retrieval_scorings: ClassVar[tuple[str, ...]] = ("global", "tci")
    # beta-CAL and its own global term replace every Long-CLIP loss setting
    unused_config_fields: ClassVar[frozenset[str]] = frozenset(
        {"long_loss_weight", "short_loss_weight", "pca_components", "pca_scope", "label_smoothing"}
    )

    def __init__(self, config: BetaCLIPConfig):
        super().__init__(config)
        self.text_conditioned_pooler = TextConditionedPooler(
            config.projection_dim,
            config.pooler_num_heads,
            config.pooler_mlp_ratio,
            config.pooler_hidden_act,
            config.pooler_logit_scale_init_value,
        )
        self.beta_cal = BetaCALoss(
            config.beta_cal_mode,
            alpha=config.beta_cal_alpha,
            beta=config.beta_cal_beta,
            mask_invalid_columns=config.ce_mask_invalid_columns,
            mean_over_all_pairs=config.bce_mean_over_all_pairs,
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent, so this overrides the generic Linear/LayerNorm init.
        if isinstance(module, TextConditionedPooler):
            module.reset_parameters(self.config.initializer_factor)

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp the global and the beta-CAL log temperatures to [0, 4.6052] in place (the authors' bound: ln 100, rounded).

        Call after every optimiser step (the authors do), e.g.
        ``optimizer.step(); unwrap(model).clamp_logit_scales()``.
        """
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.text_conditioned_pooler.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def after_optimizer_step(self) -> None:
        """The authors' clamp of both temperatures after every optimiser step."""
        self.clamp_logit_scales()

    # ------------------------------------------------------------------ image side
    def image_tower(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
    ) -> BaseModelOutputWithPooling:
        """The image tower as beta-CLIP runs it, from one vision pass.

        Blocks ``0..L-2`` run as usual. With ``config.value_path_last_block`` the last block computes full attention
        for the CLS query only (so the CLS output equals stock CLIP's) and gives every patch its value path
        ``out_proj(v_proj(LN1(x)))`` without query-key mixing; the residual and the MLP are kept, as in the authors'
        code. Its attention map (when asked for) is the CLS row's softmax and, for each patch, attention to itself.

        Returns:
            `BaseModelOutputWithPooling` whose ``last_hidden_state`` is before ``post_layernorm`` (as transformers')
            and whose ``pooler_output`` is the projected CLS `(B, projection_dim)`; hidden states and attentions as
            transformers' towers return them (default: the vision config's flags).
        """
        vision = self.vision_model
        output_attentions, output_hidden_states = resolve_output_flags(
            self.config.vision_config, output_attentions, output_hidden_states
        )
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))
        layers = vision.encoder.layers
        value_path = self.config.value_path_last_block
        with EncoderRecorder(layers, output_attentions, output_hidden_states) as recorder:
            recorder.record(hidden)
            for layer in layers[:-1] if value_path else layers:
                hidden = layer(hidden, None)
                recorder.record(hidden)
            if value_path:
                hidden, attention = self._value_path_block(layers[-1], hidden, output_attentions)
                recorder.record(hidden)
                if attention is not None:
                    recorder.attentions.append(attention)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=self.visual_projection(vision.post_layernorm(hidden[:, 0])),
            **recorder.outputs(),
        )

    def get_image_tokens(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected CLS embedding and projected patch tokens (after ``post_layernorm``) from `image_tower`.

        Returns:
            `(cls_embeds, patch_embeds)` of shapes `(B, D)` and `(B, P, D)`, not normalised.
        """
        cls_embeds, patch_embeds, _ = self._image_tokens(pixel_values, interpolate_pos_encoding)
        return cls_embeds, patch_embeds

    def _image_tokens(self, pixel_values, interpolate_pos_encoding=False, **tower_kwargs):
        outputs = self.image_tower(pixel_values, interpolate_pos_encoding, **tower_kwargs)
        tokens = self.visual_projection(self.vision_model.post_layernorm(outputs.last_hidden_state))
        return outputs.pooler_output, tokens[:, 1:], outputs

    @staticmethod
    def _value_path_block(
        layer: nn.Module, hidden: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A `CLIPEncoderLayer` whose CLS output is exact and whose patch outputs use the value path only; also its
        effective attention map `(B, heads, T, T)` when asked for."""
        attn = layer.self_attn
        batch, length, dim = hidden.shape
        heads = attn.num_heads
        normed = layer.layer_norm1(hidden)
        query = attn.q_proj(normed[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
        key = attn.k_proj(normed).view(batch, length, heads, -1).transpose(1, 2)
        value = attn.v_proj(normed)
        values = value.view(batch, length, heads, -1).transpose(1, 2)
        weights = None
        if output_attentions:
            cls_weights = ((query @ key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)  # (B, H, 1, T)
            cls = cls_weights @ values
            weights = torch.eye(length, dtype=cls_weights.dtype, device=cls_weights.device).repeat(batch, heads, 1, 1)
            weights[:, :, :1] = cls_weights
        else:
            cls = F.scaled_dot_product_attention(query, key, values, scale=attn.scale)
        mixed = torch.cat([cls.transpose(1, 2).reshape(batch, 1, dim), value[:, 1:]], dim=1)
        hidden = hidden + attn.out_proj(mixed)
        return hidden + layer.mlp(layer.layer_norm2(hidden)), weights

    # ------------------------------------------------------------------ text side
    def _eos_token_id(self) -> int:
        eos = self.config.text_config.eos_token_id
        # Legacy OpenAI configs say 2 and pool at argmax(ids); their real end-of-text id is the largest one.
        return self.config.text_config.vocab_size - 1 if eos in (None, 2) else eos

    def _row_lengths(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Real length of each right-padded row (from `attention_mask`, else up to the first end-of-text token)."""
        if attention_mask is not None:
            return attention_mask.to(torch.long).sum(-1).clamp(min=1)
        is_eos = input_ids == self._eos_token_id()
        return torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, input_ids.shape[1])

    def encode_captions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **tower_kwargs
    ) -> BaseModelOutputWithPooling:
        """The text tower's output for right-padded rows cut to their longest real length, ``pooler_output`` projected
        (under the causal mask the EOT token never sees the padding after it); `tower_kwargs` are output flags."""
        length = int(self._row_lengths(input_ids, attention_mask).max())
        return self.get_text_features(input_ids=input_ids[:, :length], return_dict=True, **tower_kwargs)

    def sharding_conflicts(self) -> list[str]:
        """Base conflicts, plus: sentence and phrase rows are encoded only when present (one packed call, or up to
        ``text_length_buckets`` calls per granularity unpacked), so the number of text-tower calls per step depends
        on each process's data."""
        return [*super().sharding_conflicts(), ("beta-CLIP encodes only the sentence and phrase rows a micro-batch "
                "has (one packed call, or up to text_length_buckets calls per granularity), so the number of "
                "text-tower calls per step depends on each process's data")]

    def encode_text_rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, buckets: int = 1
    ) -> torch.Tensor:
        """Pooled projected (EOT) embeddings of right-padded token rows, each chunk encoded at its own length.

        Rows are cut to their longest real length (from `attention_mask`, else up to the first end-of-text token).
        With ``buckets > 1`` rows are sorted by length and encoded in that many chunks, each cut to its own longest
        row. Under the causal text mask the EOT token never sees the padding after it, so the result equals encoding
        the rows padded to any longer length.

        Args:
            input_ids (`torch.LongTensor` of shape `(n, L)`).
            attention_mask (`torch.Tensor` of shape `(n, L)`, *optional*).
            buckets (`int`): number of length buckets.

        Returns:
            `torch.FloatTensor` of shape `(n, projection_dim)`, not normalised.
        """
        count = input_ids.shape[0]
        if count == 0:
            return self.text_projection.weight.new_zeros(0, self.config.projection_dim)
        lengths = self._row_lengths(input_ids, attention_mask)
        buckets = max(1, min(buckets, count))
        if buckets == 1:
            return self.encode_captions(input_ids, attention_mask).pooler_output
        order = torch.argsort(lengths)
        out = None
        for chunk in order.chunk(buckets):
            ids = input_ids[chunk, : int(lengths[chunk].max())]
            features = self.get_text_features(input_ids=ids, return_dict=True).pooler_output
            if out is None:
                out = features.new_empty(count, features.shape[-1])
            out[chunk] = features
        return out

    def packs_query_texts(self) -> bool:
        """Whether sentence and phrase rows are encoded packed (`config.pack_query_texts` and an attention
        implementation that takes the packed mask, `can_pack_text`)."""
        return bool(self.config.pack_query_texts) and self.can_pack_text()

    def _padding_query_embeds(self, caption_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the authors' padded query rows (used only when padded CE columns stay unmasked).

        Their padded sentence row is all pad ids (0) with EOT forced in the last column of the caption/sentence
        tensor (length = the batch's caption length); their padded phrase row is all zeros and pools at position 0,
        which under the causal mask does not depend on its length. All padded rows of a kind are identical, so each
        is encoded once.
        """
        device = self.text_projection.weight.device
        sentence = torch.zeros(1, caption_length, dtype=torch.long, device=device)
        sentence[0, -1] = self._eos_token_id()
        phrase = torch.zeros(1, 1, dtype=torch.long, device=device)
        return (
            self.get_text_features(input_ids=sentence, return_dict=True).pooler_output[0],
            self.get_text_features(input_ids=phrase, return_dict=True).pooler_output[0],
        )

    def encode_queries(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sentence_input_ids: torch.Tensor | None = None,
        sentence_attention_mask: torch.Tensor | None = None,
        sentence_mask: torch.Tensor | None = None,
        phrase_input_ids: torch.Tensor | None = None,
        phrase_attention_mask: torch.Tensor | None = None,
        phrase_mask: torch.Tensor | None = None,
        caption_query_mask: torch.Tensor | None = None,
        encode_padding: bool | None = None,
        caption_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the caption and every valid sentence / phrase, each granularity at its own length.

        Only valid rows are encoded (one text-tower call per granularity, or `config.text_length_buckets` calls);
        their embeddings are scattered back into the `(B, Kq, D)` query layout `[caption, sentences, phrases]`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, Lc)`): captions.
            attention_mask (`torch.Tensor` of shape `(B, Lc)`, *optional*).
            sentence_input_ids (`torch.LongTensor` of shape `(B, Ks, Ls)`, *optional*).
            sentence_attention_mask (`torch.Tensor` of shape `(B, Ks, Ls)`, *optional*).
            sentence_mask (`torch.BoolTensor` of shape `(B, Ks)`, *optional*): valid sentence slots (all when None).
            phrase_input_ids, phrase_attention_mask, phrase_mask: the same for phrases, `(B, Kp, Lp)` / `(B, Kp)`.
            caption_query_mask (`torch.BoolTensor` of shape `(B,)`, *optional*): whether the caption is a valid query
                (an empty caption is not); all True when None. The caption always enters the global loss.
            encode_padding (`bool`, *optional*): fill padded slots with the embeddings of the authors' padded rows;
                defaults to True exactly when the CE form keeps padded columns (`config.ce_mask_invalid_columns=False`).
            caption_embeds (`torch.FloatTensor` of shape `(B, D)`, *optional*): the captions' pooled embeddings when
                already encoded (e.g. by `encode_captions`).

        Returns:
            `(caption_embeds, query_embeds, query_mask)` of shapes `(B, D)`, `(B, Kq, D)`, `(B, Kq)`; embeddings are
            not normalised, padded slots are zero unless `encode_padding`.
        """
        cfg = self.config
        if encode_padding is None:
            encode_padding = cfg.beta_cal_mode == "ce" and not cfg.ce_mask_invalid_columns
        batch = input_ids.shape[0]
        device = input_ids.device
        if caption_embeds is None:
            caption_embeds = self.encode_text_rows(input_ids, attention_mask)
        if caption_query_mask is None:
            caption_query_mask = torch.ones(batch, dtype=torch.bool, device=device)
        slots = [caption_embeds[:, None]]
        masks = [caption_query_mask.to(device=device, dtype=torch.bool)[:, None]]
        padding = self._padding_query_embeds(input_ids.shape[1]) if encode_padding else (None, None)
        granularities = []
        for ids, att, mask, pad in (
            (sentence_input_ids, sentence_attention_mask, sentence_mask, padding[0]),
            (phrase_input_ids, phrase_attention_mask, phrase_mask, padding[1]),
        ):
            if ids is None or ids.shape[1] == 0:
                continue
            if ids.dim() != 3 or ids.shape[0] != batch:
                raise ValueError(f"query ids must have shape (batch={batch}, K, L), got {tuple(ids.shape)}")
            if mask is None:
                mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=device)
            mask = mask.to(device=device, dtype=torch.bool)
            if att is not None:
                # A slot without any real token cannot be a query, whatever the mask says.
                mask = mask & (att.sum(-1) > 0)
            granularities.append((mask, pad, ids[mask], None if att is None else att[mask]))
        if self.packs_query_texts():
            # sentences and phrases share one packed text-tower call
            encoded = self.encode_packed_text_rows(
                [(rows, att) for _, _, rows, att in granularities], cfg.query_pack_length
            )
        else:
            encoded = [self.encode_text_rows(rows, att, cfg.text_length_buckets) for _, _, rows, att in granularities]
        for (mask, pad, _, _), rows in zip(granularities, encoded):
            filled = caption_embeds.new_zeros(batch, mask.shape[1], caption_embeds.shape[-1])
            if pad is not None:
                filled = filled + pad.to(filled.dtype)
            slots.append(filled.masked_scatter(mask[..., None], rows.to(filled.dtype)))
            masks.append(mask)
        return caption_embeds, torch.cat(slots, dim=1), torch.cat(masks, dim=1)

    # ------------------------------------------------------------------ conditioning
    def _pooler_keys(self, cls_embeds: torch.Tensor, patch_embeds: torch.Tensor) -> torch.Tensor:
        if self.config.pooler_use_cls_token:
            return torch.cat([cls_embeds[:, None], patch_embeds], dim=1)
        return patch_embeds

    def condition_images(self, image_tokens: torch.Tensor, text_embeds: torch.Tensor, chunk_size: int | None = None):
        """Text-conditioned image embeddings of every image for every text (FLAIR-style, what "tci" scores).

        Args:
            image_tokens (`torch.FloatTensor` of shape `(I, P, D)`): key tokens of each image (patches, plus CLS
                first when `config.pooler_use_cls_token`), e.g. `retrieval_image_features(..., "tci")["image_tokens"]`.
            text_embeds (`torch.FloatTensor` of shape `(T, D)`): query text embeddings.
            chunk_size (`int`, *optional*): images and texts per chunk (default `config.tci_chunk_size`).

        Returns:
            `torch.FloatTensor` of shape `(I, T, D)`, L2-normalised.
        """
        chunk = chunk_size or self.config.tci_chunk_size
        pooler = self.text_conditioned_pooler
        rows = []
        for image_chunk in image_tokens.split(chunk):
            keys, values = pooler.project_keys(image_chunk)  # once per image chunk, reused for every text chunk
            cols = []
            for text_chunk in text_embeds.split(chunk):
                queries = text_chunk[None].expand(image_chunk.shape[0], -1, -1)
                cols.append(F.normalize(pooler.attend(queries, keys, values), dim=-1))
            rows.append(torch.cat(cols, dim=1))
        return torch.cat(rows, dim=0)

    # ------------------------------------------------------------------ retrieval scoring interface
    def retrieval_image_features(self, pixel_values: torch.Tensor, scoring: str = "global") -> dict[str, torch.Tensor]:
        """"global": `{"image_embeds": (B, D)}`; "tci" adds `"image_tokens": (B, P, D)`, the pooling block's keys.

        The CLS embedding is the same in both modes (the value-path block leaves the CLS path exact), and "tci"
        gets both from one vision pass.
        """
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_image_features(pixel_values, scoring)
        self.check_image_inputs(pixel_values)
        cls_embeds, patch_embeds = self.get_image_tokens(pixel_values)
        return {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "image_tokens": self._pooler_keys(cls_embeds, patch_embeds),
        }

    def retrieval_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, scoring: str = "global"
    ) -> dict[str, torch.Tensor]:
        """`{"text_embeds": (T, D)}` (normalised EOT embeddings) for both scorings."""
        self._check_scoring(scoring)
        return {"text_embeds": self.encode_text(input_ids, attention_mask)}

    def retrieval_scores(
        self,
        image_features: dict[str, torch.Tensor],
        text_features: dict[str, torch.Tensor],
        scoring: str = "global",
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """`(num_images, num_texts)` scores: "global" = cosine of CLS and EOT; "tci" = cosine of each image
        conditioned on each text with that text (chunked by `chunk_size`, default `config.tci_chunk_size`)."""
        self._check_scoring(scoring)
        if scoring == "global":
            return super().retrieval_scores(image_features, text_features, scoring)
        texts = F.normalize(text_features["text_embeds"], dim=-1)
        conditioned = self.condition_images(image_features["image_tokens"], texts, chunk_size)
        return (conditioned * texts[None]).sum(-1)

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.Tensor | None = None,
        sentence_mask: torch.BoolTensor | None = None,
        phrase_input_ids: torch.LongTensor | None = None,
        phrase_attention_mask: torch.Tensor | None = None,
        phrase_mask: torch.BoolTensor | None = None,
        caption_query_mask: torch.BoolTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
    ) -> BetaCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, Lc)`): captions (right-padded, <= 248 tokens).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor` of shape `(text_batch_size, Lc)`, *optional*): caption padding mask.
            sentence_input_ids (`torch.LongTensor` of shape `(B, Ks, Ls)`, *optional*): sentence queries.
            sentence_attention_mask (`torch.Tensor` of shape `(B, Ks, Ls)`, *optional*).
            sentence_mask (`torch.BoolTensor` of shape `(B, Ks)`, *optional*): valid sentence slots.
            phrase_input_ids (`torch.LongTensor` of shape `(B, Kp, Lp)`, *optional*): phrase queries.
            phrase_attention_mask (`torch.Tensor` of shape `(B, Kp, Lp)`, *optional*).
            phrase_mask (`torch.BoolTensor` of shape `(B, Kp)`, *optional*): valid phrase slots.
            caption_query_mask (`torch.BoolTensor` of shape `(B,)`, *optional*): whether each caption is also a valid
                query slot (False for empty captions).
            return_loss (`bool`, *optional*): compute the global loss and beta-CAL (image `i` pairs with caption `i`).
            output_attentions, output_hidden_states, return_dict: as in [`LongCLIPModel.forward`].

        Without `return_loss` and without sentence / phrase inputs the model is a CLIP: any number of texts against
        any number of images (zero-shot classification, retrieval), with the same CLS and caption embeddings.

        Returns:
            [`BetaCLIPOutput`]
        """
        hierarchy = sentence_input_ids is not None or phrase_input_ids is not None
        if not return_loss and not hierarchy:
            features = LongCLIPModel.loss_features(
                self,
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                keep_outputs=True,
            )
            return self._return(BetaCLIPOutput(**self.clip_outputs(features)), return_dict)
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            sentence_input_ids=sentence_input_ids,
            sentence_attention_mask=sentence_attention_mask,
            sentence_mask=sentence_mask,
            phrase_input_ids=phrase_input_ids,
            phrase_attention_mask=phrase_attention_mask,
            phrase_mask=phrase_mask,
            caption_query_mask=caption_query_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            keep_outputs=True,
        )
        return self._return(self.loss_from_features(features, return_loss=bool(return_loss)), return_dict)

    # ------------------------------------------------------------------ two-stage training interface
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.Tensor | None = None,
        sentence_mask: torch.BoolTensor | None = None,
        phrase_input_ids: torch.LongTensor | None = None,
        phrase_attention_mask: torch.Tensor | None = None,
        phrase_mask: torch.BoolTensor | None = None,
        caption_query_mask: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        keep_outputs: bool = False,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised CLS and caption
        embeddings, the pooling block's keys (``image_tokens``, `(B, P, D)`), and the query embeddings with their
        slot mask (``query_embeds`` `(B, K, D)`, ``query_mask`` `(B, K)`). The pooling block runs in
        `loss_from_features`."""
        self._require_inputs(input_ids, pixel_values, attention_mask)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"beta-CLIP's query hierarchy pairs image i with caption i: got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} captions"
            )
        towers = self.tower_kwargs(output_attentions, output_hidden_states)
        cls_embeds, patch_embeds, vision_outputs = self._image_tokens(pixel_values, interpolate_pos_encoding, **towers)
        caption_outputs = self.encode_captions(input_ids, attention_mask, **towers)
        caption_embeds, query_embeds, query_mask = self.encode_queries(
            input_ids,
            attention_mask,
            sentence_input_ids,
            sentence_attention_mask,
            sentence_mask,
            phrase_input_ids,
            phrase_attention_mask,
            phrase_mask,
            caption_query_mask,
            caption_embeds=caption_outputs.pooler_output,
        )
        features = {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "text_embeds": F.normalize(caption_embeds, dim=-1),
            "image_tokens": self._pooler_keys(cls_embeds, patch_embeds),
            "query_embeds": query_embeds,
            "query_mask": query_mask,
        }
        if keep_outputs:
            features.update(vision_model_output=vision_outputs, text_model_output=caption_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True) -> BetaCLIPOutput:
        """Text-conditioned pooling, logits and (with `return_loss`) the global loss and beta-CAL from
        `loss_features` output (possibly concatenated over micro-batches)."""
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        query_embeds, query_mask = features["query_embeds"], features["query_mask"]
        conditioned = self.text_conditioned_pooler(query_embeds, features["image_tokens"])
        loss = loss_global = loss_beta_cal = None
        if return_loss:
            cfg = self.config
            loss_global = global_contrastive_loss(
                image_embeds, text_embeds, self.logit_scale, cfg.global_loss_gradient
            )
            loss_beta_cal = self.beta_cal(
                conditioned, query_embeds, query_mask, self.text_conditioned_pooler.logit_scale
            )
            loss = cfg.global_loss_weight * loss_global + cfg.beta_cal_loss_weight * loss_beta_cal
        output = BetaCLIPOutput(
            loss=loss,
            **self.clip_outputs(features),
            loss_global=loss_global,
            loss_beta_cal=loss_beta_cal,
            query_text_embeds=F.normalize(query_embeds, dim=-1),
            conditioned_image_embeds=F.normalize(conditioned, dim=-1),
        )
        output.query_mask = query_mask
        return output


__all__ = ["BetaCLIPModel", "BetaCLIPOutput", "MAX_LOGIT_SCALE", "TextConditionedPooler"]
