"""Fix-CLIP: dual-branch training, regional prompts with a one-way attention mask, hierarchical layer-group alignment.

Fix-CLIP (Wang et al., ICCV 2025) fine-tunes a Long-CLIP-stretched CLIP with three additions:

1. **Dual branch.** The short caption is contrasted with the image whose patch embeddings are ~75 % replaced by one
   learnable, zero-initialised mask token (``L_short``); the long caption with the full image (``L_long``).
2. **Regional prompts.** ``M`` learnable tokens, fresh per prompted image-encoder layer, appended after the patch
   tokens. A one-way attention mask lets CLS see everything, patches see CLS and patches only, and prompt ``j`` see
   itself and its region (a contiguous run of ``floor(N / M)`` patches). The mask is an additive float mask handed to
   transformers' own ``CLIPEncoderLayer`` (so the SDPA and eager kernels both apply it). Within a layer patch tokens
   never see prompts; across layers they see them through CLS (``isolate_patches_from_prompts`` removes that). The
   prompts stay in the tower at inference.
3. **Hierarchical alignment.** The per-layer CLS (image) and EOT (text) tokens are split into ``G`` groups of
   consecutive layers, Gaussian-weighted inside each group (Group Token Aggregation), projected by a Linear +
   LayerNorm head per group and modality (Group Middle Features) and contrasted for groups ``K..G``.

Total loss: ``Σ_{i=K..G} ω_i L_m_i + long_loss_weight * L_long + short_loss_weight * L_short``.

No code of the authors exists; every choice the public text leaves open is a `FixCLIPConfig` field.

Module names and state-dict keys of the shared weights are CLIP's (``vision_model.*``, ``text_model.*``, ...). The
image tower, however, is not a stock ``CLIPVisionModel`` once prompts are on: ``model.vision_model(...)`` called
directly runs *without* prompts. Use `get_image_features` / `encode_image` / `image_tower` instead.

This file is copied next to saved models for ``trust_remote_code`` loading: it imports only torch, transformers
and sibling files of this folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPModel, initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_fixclip import FixCLIPConfig
from .configuration_longclip import LongCLIPConfig
from .losses import local_contrastive_loss
from .modeling_longclip import LongCLIPModel

# Attention kernels that take an arbitrary additive float mask through transformers' attention interface.
_MASKABLE_ATTENTION = ("eager", "sdpa")


# ---------------------------------------------------------------------------------------------- attention mask
def regional_attention_allowed(
    num_patches: int,
    num_prompts: int,
    remainder: str = "none",
    device: torch.device | str | None = None,
    isolate_patches: bool = False,
) -> torch.Tensor:
    """Boolean ``(T, T)`` matrix of the allowed (query, key) pairs, ``T = 1 + N + M``, tokens ordered
    ``[CLS, patch_0 .. patch_{N-1}, prompt_0 .. prompt_{M-1}]``.

    - CLS (row 0) attends to every token (patches and prompts);
    - a patch attends to CLS and to every patch, never to a prompt;
    - prompt ``j`` attends to itself and to the patches of its region ``[j*s, (j+1)*s)``, ``s = floor(N / M)``
      (``remainder="last"`` extends the last region to the final patch; ``"none"`` leaves the ``N mod M`` trailing
      patches to no prompt, the stated formula). Regions are contiguous in row-major order, so with ``M`` equal to
      the grid side each region is one row of patches.

    With ``isolate_patches`` (not in the paper) one more token, the *prompted CLS*, sits after the patches
    (``T = 2 + N + M``, order ``[CLS, patches, prompted CLS, prompts]``): the first CLS then follows the stock rule
    (CLS and patches only) and is what patches read, while the prompted CLS reads itself, the patches and every
    prompt. Patch tokens then never depend on prompts, even through CLS in later layers.

    Args:
        num_patches (`int`): ``N``.
        num_prompts (`int`): ``M``, in ``[1, N]``.
        remainder (`str`): ``"none"`` or ``"last"``.
        isolate_patches (`bool`): add the prompted CLS token as described above.
    """
    if not 1 <= num_prompts <= num_patches:
        raise ValueError(f"need 1 <= num_prompts ({num_prompts}) <= num_patches ({num_patches})")
    n, m = num_patches, num_prompts
    extra = 1 if isolate_patches else 0
    total = 1 + n + extra + m
    first_prompt = 1 + n + extra
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[1 : 1 + n, : 1 + n] = True
    if isolate_patches:
        allowed[0, : 1 + n] = True
        allowed[1 + n, 1:] = True  # prompted CLS: patches, itself, prompts (not the prompt-free CLS)
    else:
        allowed[0, :] = True
    size = n // m
    for j in range(m):
        row = first_prompt + j
        start = j * size
        stop = n if (remainder == "last" and j == m - 1) else start + size
        allowed[row, 1 + start : 1 + stop] = True
        allowed[row, row] = True
    return allowed


def regional_attention_mask(
    num_patches: int,
    num_prompts: int,
    remainder: str = "none",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    isolate_patches: bool = False,
) -> torch.Tensor:
    """The additive float mask ``(1, 1, T, T)`` for transformers' attention: 0 where allowed, the dtype's most
    negative value elsewhere (see `regional_attention_allowed`). Every row allows at least one key, so no softmax row
    is empty; the eager kernel adds it to the scores and SDPA takes it as ``attn_mask``."""
    allowed = regional_attention_allowed(num_patches, num_prompts, remainder, device, isolate_patches)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


# ---------------------------------------------------------------------------------------------- group aggregation
def gaussian_group_weights(
    group_size: int, center: float = 1.0, sigma: float = 1.0, normalize: bool = True, dtype=torch.float32
) -> torch.Tensor:
    """Gaussian layer weights inside a group of ``S`` layers (Group Token Aggregation).

    ``w_j = exp(-(j - μ)^2 / (2 σ^2))`` for ``j = 1..S`` with ``μ = 1 + center * (S - 1)`` (``center = 1`` puts the
    peak on the group's deepest layer: the stated ``Gaussian(j; S, 1)``), divided by their sum when ``normalize``.

    Returns:
        `torch.Tensor` of shape `(S,)`.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    positions = torch.arange(1, group_size + 1, dtype=torch.float64)
    mu = 1.0 + center * (group_size - 1)
    weights = torch.exp(-((positions - mu) ** 2) / (2.0 * sigma**2))
    if normalize:
        weights = weights / weights.sum()
    return weights.to(dtype)


def group_token_aggregation(per_layer: torch.Tensor, num_groups: int, weights: torch.Tensor) -> torch.Tensor:
    """Split ``L`` per-layer tokens into ``G`` groups of ``S = L / G`` consecutive layers and take each group's
    weighted sum.

    Args:
        per_layer (`torch.Tensor` of shape `(batch, L, dim)`): one token per layer, shallowest first.
        num_groups (`int`): ``G``; must divide ``L``.
        weights (`torch.Tensor` of shape `(S,)`): per-position weights inside a group.

    Returns:
        `torch.Tensor` of shape `(batch, G, dim)`.
    """
    batch, layers, dim = per_layer.shape
    if layers % num_groups:
        raise ValueError(f"{num_groups} groups do not divide {layers} layers")
    size = layers // num_groups
    if weights.shape != (size,):
        raise ValueError(f"expected {size} group weights, got shape {tuple(weights.shape)}")
    grouped = per_layer.reshape(batch, num_groups, size, dim)
    return torch.einsum("bgsd,s->bgd", grouped, weights.to(per_layer.dtype))


def hierarchical_alignment_loss(
    image_groups: Sequence[torch.Tensor | None],
    text_groups: Sequence[torch.Tensor | None],
    start_group: int,
    weights: Sequence[float],
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_{i=K..G} ω_i InfoNCE(image_i, text_i)``; groups shallower than ``K`` are ignored (may be None).

    Args:
        image_groups, text_groups: ``G`` entries each, entry ``i - 1`` the L2-normalised group-``i`` features
            `(batch, dim)` of that modality.
        start_group (`int`): ``K``, 1-based.
        weights: ``ω_K..ω_G`` (``G - K + 1`` values).
        logit_scale (`torch.Tensor`): log of the inverse temperature.

    Returns:
        ``(total, per_group)`` with ``per_group`` of shape `(G - K + 1,)` (unweighted ``L_m_K..L_m_G``).
    """
    num_groups = len(image_groups)
    if len(text_groups) != num_groups:
        raise ValueError(f"{num_groups} image groups but {len(text_groups)} text groups")
    if not 1 <= start_group <= num_groups:
        raise ValueError(f"start_group must be in [1, {num_groups}], got {start_group}")
    if len(weights) != num_groups - start_group + 1:
        raise ValueError(f"need {num_groups - start_group + 1} weights, got {len(weights)}")
    terms = [
        local_contrastive_loss(image_groups[i], text_groups[i], logit_scale, label_smoothing)
        for i in range(start_group - 1, num_groups)
    ]
    per_group = torch.stack(terms)
    total = sum(w * t for w, t in zip(weights, terms))
    return total, per_group


# ---------------------------------------------------------------------------------------------- modules
class FixCLIPRegionalPrompts(nn.Module):
    """Fresh learnable prompts for each prompted image-encoder layer: ``prompts`` `(num_prompted_layers, M, dim)`."""

    def __init__(self, num_layers: int, num_prompts: int, dim: int):
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(num_layers, num_prompts, dim))

    def extra_repr(self) -> str:
        layers, prompts, dim = self.prompts.shape
        return f"layers={layers}, prompts={prompts}, dim={dim}"


class FixCLIPGroupHead(nn.Module):
    """Group Middle Feature head: Linear then LayerNorm, ``(batch, in_dim) -> (batch, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


@dataclass
class FixCLIPImageTowerOutput(ModelOutput):
    """
    Output of [`FixCLIPModel.image_tower`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, 1 + num_patches, hidden)`):
            CLS and patch tokens after the last layer (before ``post_layernorm``; prompts removed; with
            ``isolate_patches_from_prompts`` the CLS slot holds the prompted CLS).
        pooler_output (`torch.FloatTensor` of shape `(batch, hidden)`): ``post_layernorm`` of the final CLS.
        layer_cls (`torch.FloatTensor` of shape `(batch, num_layers, hidden)`, *optional*):
            The CLS token after every encoder layer (shallowest first), when asked for.
        prompt_states (`torch.FloatTensor` of shape `(batch, M, hidden)`, *optional*):
            The prompt tokens after the last layer (None without prompts).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    layer_cls: torch.FloatTensor | None = None
    prompt_states: torch.FloatTensor | None = None


@dataclass
class FixCLIPOutput(ModelOutput):
    """
    Output of [`FixCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            ``long_loss_weight * loss_long + short_loss_weight * loss_short + loss_hierarchical``.
        loss_long (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE, full image vs long caption.
        loss_short (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE, masked image vs short caption
            (present when short captions were given).
        loss_hierarchical (`torch.FloatTensor` of shape `()`, *optional*): ``Σ_{i=K..G} ω_i L_m_i``.
        loss_groups (`torch.FloatTensor` of shape `(G - K + 1,)`, *optional*): the unweighted ``L_m_K..L_m_G``.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of full images (rows) and long captions (columns).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised long-caption embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): normalised full-image embeddings.
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Normalised short-caption embeddings.
        masked_image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Normalised embeddings of the masked images (short branch).
        patch_mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            The patches the short branch replaced by the mask token.
        text_model_output (`BaseModelOutputWithPooling`): text encoder output for the long captions.
        vision_model_output (`FixCLIPImageTowerOutput`): prompted image tower output for the full images.
    """

    loss: torch.FloatTensor | None = None
    loss_long: torch.FloatTensor | None = None
    loss_short: torch.FloatTensor | None = None
    loss_hierarchical: torch.FloatTensor | None = None
    loss_groups: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None
    masked_image_embeds: torch.FloatTensor | None = None
    patch_mask: torch.BoolTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: FixCLIPImageTowerOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in super().to_tuple())


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A fresh random patch mask per image: exactly ``N - int(N * (1 - mask_ratio))`` True entries per row.

    Args:
        generator: a `torch.Generator` or an integer seed (a CPU generator is built from it) for reproducible masks;
            None uses torch's global RNG.

    Returns:
        `torch.BoolTensor` of shape `(batch_size, num_patches)`.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    masked = num_patches - int(num_patches * (1.0 - mask_ratio))
    noise_device = generator.device if isinstance(generator, torch.Generator) else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=noise_device)
    mask.scatter_(1, order[:, :masked], True)
    return mask.to(device) if device is not None else mask


# ---------------------------------------------------------------------------------------------- model
class FixCLIPModel(LongCLIPModel):
    r"""
    Fix-CLIP on the Long-CLIP backbone: 248-token text tower, an image tower with regional prompts under a one-way
    attention mask, a zero-initialised mask token for the short branch, and Linear + LayerNorm group heads for the
    hierarchical alignment of groups ``K..G``.

    Inference (`get_image_features`, `encode_image`, `get_image_token_features`, the retrieval interface and the
    ``forward`` logits) runs the prompted tower on the full image: CLS depends on the prompts. The mask token and the
    group heads are training-only. `to_text_model` exports a stock ``CLIPTextModel``; `to_clip_model` and
    `to_vision_model` raise, because a prompted image tower has no stock equivalent (they work when
    ``regional_prompts=False``).

    Training inputs (build them with `FixCLIPCollator`): ``pixel_values``, long captions (``input_ids``,
    ``attention_mask``) and short captions (``short_input_ids``, ``short_attention_mask``).

    Example:

    ```python
    >>> import hf_longclip
    >>> model = hf_longclip.FixCLIPModel.from_clip("openai/clip-vit-base-patch16")  # 14 prompts per layer, G = 4
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> collator = hf_longclip.data.FixCLIPCollator(processor)
    >>> batch = collator([{"image": image, "caption": "A dog on a red sofa. A lamp stands to its left."}])
    >>> out = model(**batch, return_loss=True, mask_generator=0)  # seeded short-branch mask
    >>> out.loss.backward()  # out.loss_long, out.loss_short, out.loss_groups are logged separately
    ```
    """

    config_class = FixCLIPConfig
    config: FixCLIPConfig
    _no_split_modules = [
        *(getattr(LongCLIPModel, "_no_split_modules", None) or []),
        "FixCLIPRegionalPrompts",
        "FixCLIPGroupHead",
    ]

    def __init__(self, config: FixCLIPConfig):
        super().__init__(config)
        vision_dim = config.vision_config.hidden_size
        text_dim = config.text_config.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(vision_dim))
        layers = config.prompted_layers
        self.regional_prompts = (
            FixCLIPRegionalPrompts(len(layers), config.prompts_per_layer, vision_dim) if layers else None
        )
        self._prompt_slot = {layer: i for i, layer in enumerate(layers)}
        aligned = len(config.aligned_groups)
        dim = config.projection_dim
        self.vision_group_heads = nn.ModuleList(
            FixCLIPGroupHead(vision_dim, dim, config.vision_config.layer_norm_eps) for _ in range(aligned)
        )
        self.text_group_heads = nn.ModuleList(
            FixCLIPGroupHead(text_dim, dim, config.text_config.layer_norm_eps) for _ in range(aligned)
        )
        if config.separate_logit_scales:
            self.short_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
            self.group_logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent: these replace the generic init for the Fix-CLIP modules.
        if isinstance(module, FixCLIPRegionalPrompts):
            init.normal_(module.prompts, mean=0.0, std=float(self.config.prompt_init_std))
        elif isinstance(module, FixCLIPGroupHead):
            # PyTorch's default Linear init (Kaiming-uniform), written through transformers' init helpers.
            init.kaiming_uniform_(module.proj.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(module.proj.in_features)
            init.uniform_(module.proj.bias, -bound, bound)
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)
        elif isinstance(module, FixCLIPModel) and hasattr(module, "mask_token"):
            # (CLIPModel.__init__ runs post_init before the Fix-CLIP parameters exist; the second post_init sets them.)
            init.zeros_(module.mask_token)  # [stated] zero-initialised
            if module.config.separate_logit_scales:
                init.constant_(module.short_logit_scale, float(module.config.logit_scale_init_value))
                init.constant_(module.group_logit_scale, float(module.config.logit_scale_init_value))

    # ------------------------------------------------------------------ image tower
    def attention_mask_for(self, num_patches: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The cached additive regional mask `(1, 1, T, T)` for this model's ``M`` (``T = 1 + N + M``, one more with
        ``isolate_patches_from_prompts``)."""
        key = (num_patches, dtype, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            # Built outside inference mode: a mask first made under `torch.inference_mode()` (evaluation) could not
            # be saved for backward when training continues.
            with torch.inference_mode(False), torch.no_grad():
                mask = regional_attention_mask(
                    num_patches,
                    self.config.prompts_per_layer,
                    self.config.region_remainder,
                    dtype,
                    device,
                    self.config.isolate_patches_from_prompts,
                )
            self._mask_cache[key] = mask
        return mask

    def _embed(
        self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None, interpolate_pos_encoding: bool
    ) -> torch.Tensor:
        """CLS + patch embeddings with positions; masked patches replaced by the mask token."""
        embeddings = self.vision_model.embeddings
        if patch_mask is None or not self.config.mask_before_position_embedding:
            tokens = embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            if patch_mask is not None:
                patches = torch.where(patch_mask[..., None], self.mask_token.to(tokens.dtype), tokens[:, 1:])
                tokens = torch.cat([tokens[:, :1], patches], dim=1)
            return tokens
        # Same steps as CLIPVisionEmbeddings.forward, with the mask token swapped in before the positions are added.
        batch, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != embeddings.image_size or width != embeddings.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({embeddings.image_size}*{embeddings.image_size})."
            )
        weight = embeddings.patch_embedding.weight
        patches = embeddings.patch_embedding(pixel_values.to(dtype=weight.dtype)).flatten(2).transpose(1, 2)
        if patch_mask.shape != patches.shape[:2]:
            raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected {tuple(patches.shape[:2])}")
        patches = torch.where(patch_mask[..., None], self.mask_token.to(patches.dtype), patches)
        tokens = torch.cat([embeddings.class_embedding.expand(batch, 1, -1), patches], dim=1)
        if interpolate_pos_encoding:
            return tokens + embeddings.interpolate_pos_encoding(tokens, height, width)
        return tokens + embeddings.position_embedding(embeddings.position_ids)

    def image_tower(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        use_prompts: bool = True,
        output_layer_cls: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> FixCLIPImageTowerOutput:
        """Run the image tower with regional prompts (the stock ``vision_model`` submodules, a custom layer loop).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)`): images.
            patch_mask (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): patches to replace by the
                mask token (the short branch).
            use_prompts (`bool`): insert the regional prompts (ignored without prompts in the config).
            output_layer_cls (`bool`): also return the CLS token after every layer.

        Returns:
            [`FixCLIPImageTowerOutput`].
        """
        vision = self.vision_model
        hidden = vision.pre_layrnorm(self._embed(pixel_values, patch_mask, interpolate_pos_encoding))
        batch, seq, dim = hidden.shape
        num_patches = seq - 1
        prompts = self.regional_prompts if use_prompts else None
        if prompts is not None:
            implementation = self.config.vision_config._attn_implementation
            if implementation not in _MASKABLE_ATTENTION:
                raise ValueError(
                    f"regional prompts need an attention kernel that takes an additive float mask {_MASKABLE_ATTENTION}; "
                    f"the image tower uses {implementation!r}"
                )
        mask = None
        # With isolate_patches_from_prompts a prompted copy of CLS sits at index `seq` and is the tower's output CLS.
        isolate = prompts is not None and self.config.isolate_patches_from_prompts
        first_prompt = seq + (1 if isolate else 0)
        cls_index = 0
        layer_cls = []
        for index, layer in enumerate(vision.encoder.layers):
            slot = self._prompt_slot.get(index) if prompts is not None else None
            if slot is not None:
                fresh = prompts.prompts[slot].to(hidden.dtype).expand(batch, -1, -1)
                if mask is None:  # first prompted layer: append the prompt slots after the patches
                    parts = [hidden, hidden[:, :1]] if isolate else [hidden]
                    hidden = torch.cat([*parts, fresh], dim=1)
                    mask = self.attention_mask_for(num_patches, hidden.dtype, hidden.device)
                    cls_index = seq if isolate else 0
                elif self.config.prompt_depth_mode == "add":
                    hidden = torch.cat([hidden[:, :first_prompt], hidden[:, first_prompt:] + fresh], dim=1)
                else:  # "replace": VPT-deep, the previous layer's prompt outputs are dropped
                    hidden = torch.cat([hidden[:, :first_prompt], fresh], dim=1)
            hidden = layer(hidden, mask)
            if output_layer_cls:
                layer_cls.append(hidden[:, cls_index])
        tokens = hidden[:, :seq]
        if cls_index:  # report the prompted CLS in the CLS slot
            tokens = torch.cat([hidden[:, cls_index : cls_index + 1], tokens[:, 1:]], dim=1)
        return FixCLIPImageTowerOutput(
            last_hidden_state=tokens,
            pooler_output=vision.post_layernorm(tokens[:, 0]),
            layer_cls=torch.stack(layer_cls, dim=1) if output_layer_cls else None,
            prompt_states=hidden[:, first_prompt:] if mask is not None else None,
        )

    # ------------------------------------------------------------------ features (prompted tower)
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Projected CLS features of the prompted tower: ``pooler_output`` `(batch, projection_dim)`; the
        ``last_hidden_state`` holds CLS and patch tokens (prompts removed)."""
        tower = self.image_tower(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return BaseModelOutputWithPooling(
            last_hidden_state=tower.last_hidden_state, pooler_output=self.visual_projection(tower.pooler_output)
        )

    def get_image_token_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every image token (CLS first, prompts excluded) of the prompted tower after ``post_layernorm`` and the
        visual projection: `(batch, 1 + num_patches, projection_dim)`."""
        hidden = self.image_tower(pixel_values).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def _text_layer_eot(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """Text tower output (pooled EOT projected) and the EOT token after every layer `(batch, L, hidden)`."""
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        eot = _eot_positions(input_ids, self.text_model.eos_token_id).to(out.last_hidden_state.device)
        rows = torch.arange(input_ids.shape[0], device=eot.device)
        layers = torch.stack([h[rows, eot] for h in out.hidden_states[1:]], dim=1)
        out.pooler_output = self.text_projection(out.pooler_output)
        return out, layers

    def group_features(self, layer_tokens: torch.Tensor, modality: str) -> list[torch.Tensor | None]:
        """Normalised Group Middle Features of groups ``1..G`` (None for the unaligned groups ``< K``).

        Args:
            layer_tokens (`torch.Tensor` of shape `(batch, L, hidden)`): CLS (image) or EOT (text) per layer.
            modality (`str`): ``"image"`` or ``"text"``.
        """
        cfg = self.config
        if cfg.group_feature_source == "post_layernorm":
            norm = self.vision_model.post_layernorm if modality == "image" else self.text_model.final_layer_norm
            layer_tokens = norm(layer_tokens)
        size = layer_tokens.shape[1] // cfg.num_groups
        weights = gaussian_group_weights(
            size, float(cfg.group_gaussian_center), float(cfg.group_gaussian_sigma), cfg.group_normalize_weights
        ).to(layer_tokens.device)
        groups = group_token_aggregation(layer_tokens, cfg.num_groups, weights)
        heads = self.vision_group_heads if modality == "image" else self.text_group_heads
        start = cfg.group_align_start
        features: list[torch.Tensor | None] = [None] * (start - 1)
        for offset, head in enumerate(heads):
            features.append(F.normalize(head(groups[:, start - 1 + offset]), dim=-1))
        return features

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
        patch_mask: torch.Tensor | None = None,
        mask_generator: torch.Generator | int | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> FixCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`): long-caption ids (<= 248 tokens).
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor`, *optional*): padding mask of `input_ids`.
            short_input_ids (`torch.LongTensor` of shape `(batch_size, short_len)`, *optional*):
                short-caption ids, encoded at their own length; needed for ``L_short``.
            short_attention_mask (`torch.Tensor`, *optional*): padding mask of `short_input_ids`.
            return_loss (`bool`, *optional*): compute Fix-CLIP's loss (runs the masked short-branch pass).
            patch_mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*): the short branch's
                masked patches; drawn fresh per image (``mask_ratio``) when not given.
            mask_generator (`torch.Generator` or `int`, *optional*): generator or seed of that draw (reproducible
                masks); None uses torch's global RNG.

        Returns:
            [`FixCLIPOutput`]
        """
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            short_input_ids=short_input_ids,
            short_attention_mask=short_attention_mask,
            position_ids=position_ids,
            patch_mask=patch_mask,
            mask_generator=mask_generator,
            interpolate_pos_encoding=interpolate_pos_encoding,
            for_loss=bool(return_loss),
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
        position_ids: torch.LongTensor | None = None,
        patch_mask: torch.Tensor | None = None,
        mask_generator: torch.Generator | int | None = None,
        interpolate_pos_encoding: bool = False,
        for_loss: bool = True,
        keep_outputs: bool = False,
        **kwargs,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised long-branch and
        short-branch embeddings, the short branch's ``patch_mask``, and the per-layer CLS / EOT tokens of the
        branches the hierarchical alignment uses (``image_layer_tokens`` / ``text_layer_tokens``). With
        `for_loss=False` only the long branch runs (no masked pass, no layer tokens)."""
        if input_ids is None or pixel_values is None:
            raise ValueError("FixCLIPModel.forward needs both input_ids and pixel_values")
        cfg = self.config
        want_groups = for_loss and len(cfg.aligned_groups) > 0
        full = self.image_tower(
            pixel_values,
            output_layer_cls=want_groups and cfg.group_image_branch == "full",
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        features: dict[str, Any] = {"image_embeds": F.normalize(self.visual_projection(full.pooler_output), dim=-1)}
        group_from_long = want_groups and cfg.group_text_branch == "long"
        if group_from_long:
            text_outputs, features["text_layer_tokens"] = self._text_layer_eot(input_ids, attention_mask)
        else:
            text_outputs = self.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            )
        features["text_embeds"] = F.normalize(text_outputs.pooler_output, dim=-1)

        if short_input_ids is not None:
            if want_groups and cfg.group_text_branch == "short":
                short_out, features["text_layer_tokens"] = self._text_layer_eot(short_input_ids, short_attention_mask)
                features["short_text_embeds"] = F.normalize(short_out.pooler_output, dim=-1)
            else:
                features["short_text_embeds"] = self.encode_text(short_input_ids, short_attention_mask)
        elif want_groups and cfg.group_text_branch == "short":
            raise ValueError("group_text_branch='short' needs short_input_ids")
        needs_masked = for_loss and (
            short_input_ids is not None or (want_groups and cfg.group_image_branch == "masked")
        )
        masked_tower = None
        if needs_masked:
            num_patches = full.last_hidden_state.shape[1] - 1
            masked = patch_mask
            if masked is None:
                masked = random_patch_mask(
                    pixel_values.shape[0], num_patches, float(cfg.mask_ratio), mask_generator, pixel_values.device
                )
            masked = masked.to(device=pixel_values.device, dtype=torch.bool)
            same_as_full = not bool(masked.any()) and (cfg.prompts_in_masked_branch or self.regional_prompts is None)
            if same_as_full and cfg.group_image_branch == "full":
                masked_tower = full  # nothing masked: the second pass would repeat the first exactly
            else:
                masked_tower = self.image_tower(
                    pixel_values,
                    patch_mask=masked,
                    use_prompts=cfg.prompts_in_masked_branch,
                    output_layer_cls=want_groups and cfg.group_image_branch == "masked",
                    interpolate_pos_encoding=interpolate_pos_encoding,
                )
            features["masked_image_embeds"] = F.normalize(self.visual_projection(masked_tower.pooler_output), dim=-1)
            features["patch_mask"] = masked
        if want_groups:
            source = full if cfg.group_image_branch == "full" else masked_tower
            features["image_layer_tokens"] = source.layer_cls
        if keep_outputs:
            features.update(vision_model_output=full, text_model_output=text_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True, **kwargs) -> FixCLIPOutput:
        """Logits and (with `return_loss`) Fix-CLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        masked_embeds = features.get("masked_image_embeds")
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()

        loss = loss_long = loss_short = loss_hier = loss_groups = None
        if return_loss:
            if image_embeds.shape[0] != text_embeds.shape[0]:
                raise ValueError(
                    f"the loss pairs image i with caption i: got {image_embeds.shape[0]} images and "
                    f"{text_embeds.shape[0]} captions"
                )
            smoothing = float(cfg.label_smoothing)
            loss_long = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, smoothing)
            loss = cfg.long_loss_weight * loss_long
            if short_embeds is not None and masked_embeds is not None:
                scale = self.short_logit_scale if cfg.separate_logit_scales else self.logit_scale
                loss_short = local_contrastive_loss(masked_embeds, short_embeds, scale, smoothing)
                loss = loss + cfg.short_loss_weight * loss_short
            if len(cfg.aligned_groups) > 0 and "image_layer_tokens" in features:
                scale = self.group_logit_scale if cfg.separate_logit_scales else self.logit_scale
                loss_hier, loss_groups = hierarchical_alignment_loss(
                    self.group_features(features["image_layer_tokens"], "image"),
                    self.group_features(features["text_layer_tokens"], "text"),
                    cfg.group_align_start,
                    cfg.resolved_group_loss_weights,
                    scale,
                    smoothing,
                )
                loss = loss + loss_hier

        return FixCLIPOutput(
            loss=loss,
            loss_long=loss_long,
            loss_short=loss_short,
            loss_hierarchical=loss_hier,
            loss_groups=loss_groups,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            short_text_embeds=short_embeds,
            masked_image_embeds=masked_embeds,
            patch_mask=features.get("patch_mask"),
            text_model_output=features.get("text_model_output"),
            vision_model_output=features.get("vision_model_output"),
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def config_from_clip(cls, clip_config, **overrides) -> FixCLIPConfig:
        """A `FixCLIPConfig` with the towers of a stock `CLIPConfig`; `overrides` set Long-CLIP / Fix-CLIP fields."""
        own = {k: overrides.pop(k) for k in list(overrides) if k in _FIXCLIP_FIELDS}
        base = LongCLIPModel.config_from_clip(clip_config, **overrides)
        return _fixclip_config_from(base, **own)

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int = 20,
        position_ratio: int = 4,
        reset_logit_scale: bool = True,
        **kwargs,
    ) -> FixCLIPModel:
        """Build a Fix-CLIP from a stock CLIP (Hub id, folder or `CLIPModel`): stretch the text positions as
        Long-CLIP does and add fresh prompts, mask token and group heads. A folder holding a saved Fix-CLIP is loaded
        as it is. Fix-CLIP config fields (e.g. ``num_groups=4``, ``prompt_layers=[6, 7]``) may be passed as keywords.
        """
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIXCLIP_FIELDS}
        if isinstance(clip, (str, os.PathLike)):
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            source_config = AutoConfig.from_pretrained(clip, **hub_kwargs)
            if getattr(source_config, "model_type", None) == FixCLIPConfig.model_type:
                return cls.from_pretrained(clip, **kwargs, **own)
        backbone = LongCLIPModel.from_clip(clip, position_keep, position_ratio, reset_logit_scale, **kwargs)
        model = cls(_fixclip_config_from(backbone.config, **own)).to(dtype=backbone.dtype)
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        extras = ("mask_token", "regional_prompts.", "vision_group_heads.", "text_group_heads.", "short_logit_scale", "group_logit_scale")
        if unexpected or any(not key.startswith(extras) for key in missing):
            raise RuntimeError(f"unexpected backbone keys {unexpected} / missing {missing}")
        return model.eval()

    # ------------------------------------------------------------------ export
    def _stock_image_tower_error(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} is not available for a Fix-CLIP with regional prompts: its image tower inserts "
            f"{self.config.prompts_per_layer} learned prompts in layers {list(self.config.prompted_layers)} under a "
            "one-way attention mask, and the CLS embedding depends on them, so no stock transformers CLIP image "
            "tower reproduces it. Export the text encoder with `to_text_model()` (it is a stock CLIPTextModel), "
            "and keep the full FixCLIPModel (save_pretrained / AutoModel) for image features."
        )

    def to_clip_model(self) -> CLIPModel:
        """A stock `CLIPModel`: only when ``regional_prompts=False`` (the tower is then stock); raises otherwise."""
        if self.regional_prompts is not None:
            raise self._stock_image_tower_error("to_clip_model()")
        return super().to_clip_model()

    def to_vision_model(self):
        """A stock `CLIPVisionModel`: only when ``regional_prompts=False``; raises otherwise."""
        if self.regional_prompts is not None:
            raise self._stock_image_tower_error("to_vision_model()")
        return super().to_vision_model()


def _eot_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the token CLIPTextModel pools (first EOS, or the highest id for legacy configs with EOS id 2)."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


# Fields a Fix-CLIP config sets beyond the towers and the stretch geometry (includes the re-defaulted loss fields).
_FIXCLIP_FIELDS = (frozenset(FixCLIPConfig.__dataclass_fields__) - frozenset(LongCLIPConfig.__dataclass_fields__)) | {
    "long_loss_weight",
    "short_loss_weight",
    "label_smoothing",
}


def _fixclip_config_from(config: LongCLIPConfig, **fields) -> FixCLIPConfig:
    """A `FixCLIPConfig` with the towers and stretch geometry of a Long-CLIP config (Fix-CLIP defaults elsewhere)."""
    return FixCLIPConfig(
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


__all__ = [
    "FixCLIPGroupHead",
    "FixCLIPImageTowerOutput",
    "FixCLIPModel",
    "FixCLIPOutput",
    "FixCLIPRegionalPrompts",
    "gaussian_group_weights",
    "group_token_aggregation",
    "hierarchical_alignment_loss",
    "random_patch_mask",
    "regional_attention_allowed",
    "regional_attention_mask",
]
