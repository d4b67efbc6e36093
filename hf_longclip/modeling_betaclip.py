"""beta-CLIP: multi-granular text-conditioned alignment on a Long-CLIP backbone (Zohra et al., CVPR 2026).

The model is a [`LongCLIPModel`] (stock CLIP module names, 248-token text tower) plus one head, the
:class:`TextConditionedPooler`: each query text (the caption, sampled sentences and spaCy phrases of an image) attends
over that image's patch tokens and yields a *text-conditioned image embedding*. Training adds the beta-CAL loss
(`beta_cal.py`) over every (conditioned image, query text) pair of the batch to the usual CLS <-> caption InfoNCE.

Patch tokens come from a last vision block that keeps the CLS path exact and gives each patch its value path only
(:meth:`BetaCLIPModel.get_image_tokens`). Texts are encoded granularity by granularity, each at the length of its own
longest *valid* row, and padded query slots are never encoded (:meth:`BetaCLIPModel.encode_queries`).

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch, transformers and
sibling files of this folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .beta_cal import BetaCALoss
from .configuration_betaclip import BetaCLIPConfig
from .configuration_longclip import LongCLIPConfig
from .losses import distributed_context, gather_no_grad, local_contrastive_loss
from .modeling_longclip import LongCLIPModel

#: Upper bound of both logit scales (the authors clamp to [0, ln 100] after every optimiser step).
MAX_LOGIT_SCALE = math.log(100.0)


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
    def reset_parameters(self) -> None:
        """PyTorch's default initialisation (what the authors' block gets), through transformers' init helpers so
        that weights loaded by `from_pretrained` are left alone."""
        init.xavier_uniform_(self.attn.in_proj_weight)
        init.zeros_(self.attn.in_proj_bias)
        init.zeros_(self.attn.out_proj.bias)
        for linear in (self.attn.out_proj, self.fc1, self.fc2):
            bound = 1.0 / math.sqrt(linear.in_features)
            # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            init.uniform_(linear.weight, -bound, bound)
        for linear in (self.fc1, self.fc2):
            bound = 1.0 / math.sqrt(linear.in_features)
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
class BetaCLIPOutput(ModelOutput):
    """
    Output of [`BetaCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            ``global_loss_weight * loss_global + beta_cal_loss_weight * loss_beta_cal``.
        loss_global (`torch.FloatTensor` of shape `()`, *optional*):
            InfoNCE between the CLS image embeddings and the caption (EOT) embeddings, no label smoothing.
        loss_beta_cal (`torch.FloatTensor` of shape `()`, *optional*):
            beta-CAL (CE or BCE form, `config.beta_cal_mode`) over all `B * Kq` query slots of this process.
        logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            Scaled cosine similarities of CLS image embeddings (rows) and captions (columns).
        logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised caption embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised CLS image embeddings (identical to stock CLIP's for the same weights).
        query_text_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`):
            L2-normalised query text embeddings, slots ordered caption, sentences, phrases; zero for padded slots
            (unless the authors' padded-column behaviour is on, then padded slots hold the encoded padding rows).
        conditioned_image_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`):
            L2-normalised text-conditioned image embeddings, one per query slot.
        query_mask (`torch.BoolTensor` of shape `(batch_size, num_queries)`):
            True for real query slots.
    """

    loss: torch.FloatTensor | None = None
    loss_global: torch.FloatTensor | None = None
    loss_beta_cal: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    query_text_embeds: torch.FloatTensor | None = None
    conditioned_image_embeds: torch.FloatTensor | None = None
    query_mask: torch.BoolTensor | None = None


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, gather_with_grad: bool = False
) -> torch.Tensor:
    """beta-CLIP's CLS <-> caption InfoNCE (no label smoothing), local-loss form under torch.distributed.

    With ``gather_with_grad=False`` (the authors' SLIP-style gather) the other ranks' columns are constants and only
    this rank's rows and columns carry gradient; with True the gradient also flows to the rows other ranks gathered.
    Without a process group both are the plain symmetric InfoNCE.
    """
    rank, world = distributed_context()
    if gather_with_grad or world == 1:
        return local_contrastive_loss(image_embeds, text_embeds, logit_scale, 0.0, gather=True)
    batch = image_embeds.shape[0]
    sizes = gather_no_grad(torch.tensor([batch], device=image_embeds.device))
    offset = int(sizes[:rank].sum())

    def splice(local: torch.Tensor) -> torch.Tensor:
        gathered = gather_no_grad(local)
        return torch.cat([gathered[:offset], local, gathered[offset + batch :]], dim=0)

    image_all, text_all = splice(image_embeds), splice(text_embeds)
    scale = logit_scale.exp()
    targets = torch.arange(offset, offset + batch, device=image_embeds.device)
    return 0.5 * (
        F.cross_entropy(scale * image_embeds @ text_all.t(), targets)
        + F.cross_entropy(scale * text_embeds @ image_all.t(), targets)
    )


class BetaCLIPModel(LongCLIPModel):
    r"""
    beta-CLIP: Long-CLIP plus a text-conditioned pooling block trained with beta-CAL.

    Training inputs are an image, its caption, and per image up to `Ks` sentences and `Kp` phrases (build them with
    `BetaCLIPCollator`). The query slots of an image are `[caption, sentences..., phrases...]`
    (`Kq = 1 + Ks + Kp`). `forward(..., return_loss=True)` returns the global CLS <-> caption InfoNCE and beta-CAL.
    After every optimiser step the trainer should call :meth:`clamp_logit_scales` (both temperatures are kept in
    [0, ln 100], as in the authors' code).

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
    retrieval_scorings: tuple[str, ...] = ("global", "tci")

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
            module.reset_parameters()

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Clamp the global and the beta-CAL log temperatures to [0, ln 100] in place.

        Call after every optimiser step (the authors do), e.g.
        ``optimizer.step(); unwrap(model).clamp_logit_scales()``.
        """
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.text_conditioned_pooler.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def enable_text_gradient_checkpointing(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute the text tower's activations in the backward pass, and only the text tower's.

        beta-CLIP encodes up to ``1 + 5 + 30`` texts per image, so text activations dominate training memory; the
        authors checkpoint the text tower only. (``gradient_checkpointing_enable()`` checkpoints both towers.)
        """
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        # transformers >= 5.x names it `activation_checkpointing_enable` (the old name warns)
        if hasattr(self, "activation_checkpointing_enable"):
            self.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in self.vision_model.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    # ------------------------------------------------------------------ image side
    def get_image_tokens(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected CLS embedding and projected patch tokens from one vision pass.

        Blocks ``0..L-2`` run as usual. With ``config.value_path_last_block`` the last block computes full attention
        for the CLS query only (so the CLS output equals stock CLIP's) and gives every patch its value path
        ``out_proj(v_proj(LN1(x)))`` without query-key mixing; the residual and the MLP are kept, as in the authors'
        code. All tokens then go through ``post_layernorm`` and ``visual_projection``.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`).

        Returns:
            `(cls_embeds, patch_embeds)` of shapes `(B, D)` and `(B, P, D)`, not normalised.
        """
        vision = self.vision_model
        hidden = vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden = vision.pre_layrnorm(hidden)
        layers = vision.encoder.layers
        for layer in layers[:-1]:
            hidden = layer(hidden, None)
        if self.config.value_path_last_block:
            hidden = self._value_path_block(layers[-1], hidden)
        else:
            hidden = layers[-1](hidden, None)
        tokens = self.visual_projection(vision.post_layernorm(hidden))
        return tokens[:, 0], tokens[:, 1:]

    @staticmethod
    def _value_path_block(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A `CLIPEncoderLayer` whose CLS output is exact and whose patch outputs use the value path only."""
        attn = layer.self_attn
        batch, length, dim = hidden.shape
        heads = attn.num_heads
        normed = layer.layer_norm1(hidden)
        query = attn.q_proj(normed[:, :1]).view(batch, 1, heads, -1).transpose(1, 2)
        key = attn.k_proj(normed).view(batch, length, heads, -1).transpose(1, 2)
        value = attn.v_proj(normed)
        cls = F.scaled_dot_product_attention(
            query, key, value.view(batch, length, heads, -1).transpose(1, 2), scale=attn.scale
        )
        mixed = torch.cat([cls.transpose(1, 2).reshape(batch, 1, dim), value[:, 1:]], dim=1)
        hidden = hidden + attn.out_proj(mixed)
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    # ------------------------------------------------------------------ text side
    def _eos_token_id(self) -> int:
        eos = self.config.text_config.eos_token_id
        # Legacy OpenAI configs say 2 and pool at argmax(ids); their real end-of-text id is the largest one.
        return self.config.text_config.vocab_size - 1 if eos in (None, 2) else eos

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
        if attention_mask is not None:
            lengths = attention_mask.to(torch.long).sum(-1).clamp(min=1)
        else:
            is_eos = input_ids == self._eos_token_id()
            lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, input_ids.shape[1])
        buckets = max(1, min(buckets, count))
        if buckets == 1:
            return self.get_text_features(input_ids=input_ids[:, : int(lengths.max())]).pooler_output
        order = torch.argsort(lengths)
        out = None
        for chunk in order.chunk(buckets):
            ids = input_ids[chunk, : int(lengths[chunk].max())]
            features = self.get_text_features(input_ids=ids).pooler_output
            if out is None:
                out = features.new_empty(count, features.shape[-1])
            out[chunk] = features
        return out

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
            self.get_text_features(input_ids=sentence).pooler_output[0],
            self.get_text_features(input_ids=phrase).pooler_output[0],
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

        Returns:
            `(caption_embeds, query_embeds, query_mask)` of shapes `(B, D)`, `(B, Kq, D)`, `(B, Kq)`; embeddings are
            not normalised, padded slots are zero unless `encode_padding`.
        """
        cfg = self.config
        if encode_padding is None:
            encode_padding = cfg.beta_cal_mode == "ce" and not cfg.ce_mask_invalid_columns
        batch = input_ids.shape[0]
        device = input_ids.device
        caption_embeds = self.encode_text_rows(input_ids, attention_mask)
        if caption_query_mask is None:
            caption_query_mask = torch.ones(batch, dtype=torch.bool, device=device)
        slots = [caption_embeds[:, None]]
        masks = [caption_query_mask.to(device=device, dtype=torch.bool)[:, None]]
        padding = self._padding_query_embeds(input_ids.shape[1]) if encode_padding else (None, None)
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
            rows = self.encode_text_rows(ids[mask], None if att is None else att[mask], cfg.text_length_buckets)
            filled = caption_embeds.new_zeros(batch, ids.shape[1], caption_embeds.shape[-1])
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
        return_dict: bool | None = None,
        **kwargs,
    ) -> BetaCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, Lc)`): captions (right-padded, <= 248 tokens).
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): images.
            attention_mask (`torch.Tensor` of shape `(B, Lc)`, *optional*): caption padding mask.
            sentence_input_ids (`torch.LongTensor` of shape `(B, Ks, Ls)`, *optional*): sentence queries.
            sentence_attention_mask (`torch.Tensor` of shape `(B, Ks, Ls)`, *optional*).
            sentence_mask (`torch.BoolTensor` of shape `(B, Ks)`, *optional*): valid sentence slots.
            phrase_input_ids (`torch.LongTensor` of shape `(B, Kp, Lp)`, *optional*): phrase queries.
            phrase_attention_mask (`torch.Tensor` of shape `(B, Kp, Lp)`, *optional*).
            phrase_mask (`torch.BoolTensor` of shape `(B, Kp)`, *optional*): valid phrase slots.
            caption_query_mask (`torch.BoolTensor` of shape `(B,)`, *optional*): whether each caption is also a valid
                query slot (False for empty captions).
            return_loss (`bool`, *optional*): compute the global loss and beta-CAL.

        Returns:
            [`BetaCLIPOutput`]
        """
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
        sentence_input_ids: torch.LongTensor | None = None,
        sentence_attention_mask: torch.Tensor | None = None,
        sentence_mask: torch.BoolTensor | None = None,
        phrase_input_ids: torch.LongTensor | None = None,
        phrase_attention_mask: torch.Tensor | None = None,
        phrase_mask: torch.BoolTensor | None = None,
        caption_query_mask: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised CLS and caption
        embeddings, the pooling block's keys (``image_tokens``, `(B, P, D)`), and the query embeddings with their
        slot mask (``query_embeds`` `(B, K, D)`, ``query_mask`` `(B, K)`). The pooling block runs in
        `loss_from_features`."""
        if input_ids is None or pixel_values is None:
            raise ValueError("BetaCLIPModel.forward needs both input_ids and pixel_values")
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"beta-CLIP pairs image i with caption i: got {pixel_values.shape[0]} images and "
                f"{input_ids.shape[0]} captions"
            )
        cls_embeds, patch_embeds = self.get_image_tokens(pixel_values, interpolate_pos_encoding)
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
        )
        return {
            "image_embeds": F.normalize(cls_embeds, dim=-1),
            "text_embeds": F.normalize(caption_embeds, dim=-1),
            "image_tokens": self._pooler_keys(cls_embeds, patch_embeds),
            "query_embeds": query_embeds,
            "query_mask": query_mask,
        }

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True, **kwargs) -> BetaCLIPOutput:
        """Text-conditioned pooling, logits and (with `return_loss`) the global loss and beta-CAL from
        `loss_features` output (possibly concatenated over micro-batches)."""
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        query_embeds, query_mask = features["query_embeds"], features["query_mask"]
        conditioned = self.text_conditioned_pooler(query_embeds, features["image_tokens"])
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()

        loss = loss_global = loss_beta_cal = None
        if return_loss:
            cfg = self.config
            loss_global = global_contrastive_loss(
                image_embeds, text_embeds, self.logit_scale, cfg.global_loss_gather_with_grad
            )
            loss_beta_cal = self.beta_cal(
                conditioned, query_embeds, query_mask, self.text_conditioned_pooler.logit_scale
            )
            loss = cfg.global_loss_weight * loss_global + cfg.beta_cal_loss_weight * loss_beta_cal

        return BetaCLIPOutput(
            loss=loss,
            loss_global=loss_global,
            loss_beta_cal=loss_beta_cal,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            query_text_embeds=F.normalize(query_embeds, dim=-1),
            conditioned_image_embeds=F.normalize(conditioned, dim=-1),
            query_mask=query_mask,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_clip(cls, clip_config, **overrides) -> BetaCLIPConfig:
        """A `BetaCLIPConfig` with the towers of a stock `CLIPConfig`; `overrides` set Long-CLIP / beta-CLIP fields."""
        beta_fields = {k: overrides.pop(k) for k in list(overrides) if k in _BETA_ONLY_FIELDS}
        base = LongCLIPModel.config_from_clip(clip_config, **overrides)
        return _beta_config_from(base, **beta_fields)

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int = 20,
        position_ratio: int = 4,
        reset_logit_scale: bool = True,
        **kwargs,
    ) -> BetaCLIPModel:
        """Build a beta-CLIP from a stock CLIP (Hub id, folder or `CLIPModel`): stretch the text positions as
        Long-CLIP does and add a freshly initialised pooling block. A folder holding a saved beta-CLIP is loaded as
        it is. beta-CLIP config fields (e.g. ``beta_cal_mode="bce"``) may be passed as keyword arguments."""
        beta_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _BETA_ONLY_FIELDS}
        if isinstance(clip, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            source_config = AutoConfig.from_pretrained(clip, **hub_kwargs)
            if getattr(source_config, "model_type", None) == BetaCLIPConfig.model_type:
                return cls.from_pretrained(clip, **kwargs, **beta_fields)
        backbone = LongCLIPModel.from_clip(clip, position_keep, position_ratio, reset_logit_scale, **kwargs)
        model = cls(_beta_config_from(backbone.config, **beta_fields)).to(dtype=backbone.dtype)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or any(not key.startswith("text_conditioned_pooler.") for key in missing):
            raise RuntimeError(f"unexpected backbone keys {unexpected} / missing {missing}")
        return model.eval()


_BETA_ONLY_FIELDS = frozenset(BetaCLIPConfig.__dataclass_fields__) - frozenset(LongCLIPConfig.__dataclass_fields__)


def _beta_config_from(config: LongCLIPConfig, **beta_fields) -> BetaCLIPConfig:
    """A `BetaCLIPConfig` with the towers and stretch geometry of a Long-CLIP config."""
    return BetaCLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
        source_max_position_embeddings=config.source_max_position_embeddings,
        position_keep=config.position_keep,
        position_ratio=config.position_ratio,
        freeze_kept_positions=config.freeze_kept_positions,
        **beta_fields,
    )


__all__ = [
    "BetaCLIPModel",
    "BetaCLIPOutput",
    "MAX_LOGIT_SCALE",
    "TextConditionedPooler",
    "global_contrastive_loss",
]
