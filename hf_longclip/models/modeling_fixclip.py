"""Fix-CLIP (Wang et al., ICCV 2025): Long-CLIP plus a masked short-caption branch, regional prompts under a one-way
attention mask, and hierarchical alignment of layer groups. No code of the authors exists; every open choice is a
`FixCLIPConfig` field. See docs/fixclip.md.

The image tower is not a stock ``CLIPVisionModel`` once prompts are on: ``model.vision_model(...)`` called directly
runs *without* prompts; use `get_image_features` / `encode_image` / `image_tower`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_fixclip import FixCLIPConfig
from .losses_common import local_contrastive_loss
from .losses_fixclip import gaussian_group_weights, group_token_aggregation, hierarchical_alignment_loss
from .modeling_longclip import CLIPVariantOutput, EncoderRecorder, LongCLIPModel, resolve_output_flags

# Attention kernels that take an arbitrary additive float mask through transformers' attention interface.
_MASKABLE_ATTENTION = ("eager", "sdpa")


# ---------------------------------------------------------------------------------------------- attention mask
def regional_attention_allowed(
    num_patches: int,
    num_prompts: int,
    remainder: str = "none",
    device: torch.device | str | None = None,
    isolate_patches: bool = False,
    patch_positions: torch.Tensor | None = None,
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

    With ``patch_positions`` (`(batch, K)`, the grid index of each patch token that is present: Fix-CLIP's short
    branch with ``masked_patches="drop"``) only those ``K`` patches are in the sequence (``N`` stays the full grid's
    patch count, which fixes the regions) and the result is one matrix per image, ``(batch, T, T)`` with
    ``T = 1 + K + M``: each prompt attends to the present patches of its region.

    Args:
        num_patches (`int`): ``N``.
        num_prompts (`int`): ``M``, in ``[1, N]``.
        remainder (`str`): ``"none"`` or ``"last"``.
        isolate_patches (`bool`): add the prompted CLS token as described above.
        patch_positions (`torch.LongTensor`, *optional*): the present patches' grid indices, per image.
    """
    if not 1 <= num_prompts <= num_patches:
        raise ValueError(f"need 1 <= num_prompts ({num_prompts}) <= num_patches ({num_patches})")
    n, m = num_patches, num_prompts
    if patch_positions is None:
        positions = torch.arange(n, device=device)[None]
    else:
        positions = patch_positions.to(device=device, dtype=torch.long)
    batch, k = positions.shape
    extra = 1 if isolate_patches else 0
    total = 1 + k + extra + m
    first_prompt = 1 + k + extra
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    allowed[:, 1 : 1 + k, : 1 + k] = True
    if isolate_patches:
        allowed[:, 0, : 1 + k] = True
        allowed[:, 1 + k, 1:] = True  # prompted CLS: patches, itself, prompts (not the prompt-free CLS)
    else:
        allowed[:, 0, :] = True
    region = positions // (n // m)  # a region index >= m: a trailing patch of no prompt (remainder "none")
    if remainder == "last":
        region = region.clamp(max=m - 1)
    prompts = torch.arange(m, device=device)
    allowed[:, first_prompt:, 1 : 1 + k] = region[:, None, :] == prompts[None, :, None]
    rows = torch.arange(first_prompt, total, device=device)
    allowed[:, rows, rows] = True
    return allowed if patch_positions is not None else allowed[0]


def regional_attention_mask(
    num_patches: int,
    num_prompts: int,
    remainder: str = "none",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    isolate_patches: bool = False,
    patch_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive float mask ``(1, 1, T, T)`` for transformers' attention: 0 where allowed, the dtype's most
    negative value elsewhere (see `regional_attention_allowed`). Every row allows at least one key, so no softmax row
    is empty; the eager kernel adds it to the scores and SDPA takes it as ``attn_mask``. With `patch_positions` it is
    one mask per image, ``(batch, 1, T, T)``."""
    allowed = regional_attention_allowed(num_patches, num_prompts, remainder, device, isolate_patches, patch_positions)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None] if patch_positions is not None else mask[None, None]


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
class FixCLIPImageTowerOutput(BaseModelOutputWithPooling):
    """
    Output of [`FixCLIPModel.image_tower`]: a `BaseModelOutputWithPooling` whose token tensors hold CLS and patches only
    (prompts removed; with ``isolate_patches_from_prompts`` the CLS slot holds the prompted CLS), plus

    Args:
        layer_cls (`torch.FloatTensor` of shape `(batch, num_layers, hidden)`, *optional*):
            The CLS token after every encoder layer (shallowest first), when asked for.
        prompt_states (`torch.FloatTensor` of shape `(batch, M, hidden)`, *optional*):
            The prompt tokens after the last layer (None without prompts).

    ``attentions`` (eager kernel) are the full maps, prompts included: `(batch, heads, T, T)`.
    """

    layer_cls: torch.FloatTensor | None = None
    prompt_states: torch.FloatTensor | None = None


@dataclass
class FixCLIPOutput(CLIPVariantOutput):
    """
    Output of [`FixCLIPModel.forward`]: the fields of [`CLIPVariantOutput`] (``loss`` is
    ``long_loss_weight * loss_long + short_loss_weight * loss_short + loss_hierarchical``; ``vision_model_output`` is
    the prompted tower's [`FixCLIPImageTowerOutput`]), then

    Args:
        loss_long (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE, full image vs long caption.
        loss_short (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE, masked image vs short caption
            (present when short captions were given).
        loss_hierarchical (`torch.FloatTensor` of shape `()`, *optional*): ``Σ_{i=K..G} ω_i L_m_i``.
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Normalised short-caption embeddings.
        masked_image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Normalised embeddings of the masked images (short branch).

    Attributes (not outputs):
        extra_loss_terms (`dict[str, torch.FloatTensor]`): the unweighted group terms ``L_m_i`` as ``loss_group_<i>``
            for ``i = K..G`` (their number depends on the config); `loss_terms()` includes them.
        patch_mask (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*): the patches the short branch
            replaced by the mask token.
    """

    loss_long: torch.FloatTensor | None = None
    loss_short: torch.FloatTensor | None = None
    loss_hierarchical: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None
    masked_image_embeds: torch.FloatTensor | None = None

    patch_mask: ClassVar[torch.BoolTensor | None] = None


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
    ``regional_prompts=False``). The prompts need an attention kernel that takes an additive mask (eager or SDPA).

    Training inputs (build them with `FixCLIPCollator`): ``pixel_values``, long captions (``input_ids``,
    ``attention_mask``) and short captions (``short_input_ids``, ``short_attention_mask``). A loss step without short
    captions does not reach the mask token; it then gets an exact zero gradient, so DDP needs no unused-parameter
    search.

    Example:

    ```python
    >>> import hf_longclip
    >>> model = hf_longclip.FixCLIPModel.from_clip("openai/clip-vit-base-patch16")  # 14 prompts per layer, G = 4
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> collator = hf_longclip.data.FixCLIPCollator(processor)
    >>> batch = collator([{"image": image, "caption": "A dog on a red sofa. A lamp stands to its left."}])
    >>> out = model(**batch, return_loss=True, mask_generator=0)  # seeded short-branch mask
    >>> out.loss.backward()  # out.loss_terms(): loss_long, loss_short, loss_hierarchical, loss_group_2 ...
    ```
    """

    config_class = FixCLIPConfig
    config: FixCLIPConfig
    _no_split_modules = [
        *(getattr(LongCLIPModel, "_no_split_modules", None) or []),
        "FixCLIPRegionalPrompts",
        "FixCLIPGroupHead",
    ]
    head_modules: ClassVar[tuple[str, ...]] = (
        "mask_token",
        "regional_prompts",
        "vision_group_heads",
        "text_group_heads",
        "short_logit_scale",
        "group_logit_scale",
    )
    # the short caption is matched against the masked image, not a PCA reconstruction
    unused_config_fields: ClassVar[frozenset[str]] = frozenset({"pca_components", "pca_scope"})

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
        self._check_attention_kernel()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Children are initialised before their parent: these replace the generic init for the Fix-CLIP modules.
        factor = self.config.initializer_factor
        if isinstance(module, FixCLIPRegionalPrompts):
            init.normal_(module.prompts, mean=0.0, std=float(self.config.prompt_init_std))
        elif isinstance(module, FixCLIPGroupHead):
            # PyTorch's default Linear init (kaiming-uniform bound 1/sqrt(fan_in)), scaled by initializer_factor.
            bound = factor / math.sqrt(module.proj.in_features)
            init.uniform_(module.proj.weight, -bound, bound)
            init.uniform_(module.proj.bias, -bound, bound)
            init.ones_(module.norm.weight)
            init.zeros_(module.norm.bias)
        elif isinstance(module, FixCLIPModel) and hasattr(module, "mask_token"):
            # (CLIPModel.__init__ runs post_init before the Fix-CLIP parameters exist; the second post_init sets them.)
            init.zeros_(module.mask_token)  # [stated] zero-initialised
            if module.config.separate_logit_scales:
                init.constant_(module.short_logit_scale, float(module.config.logit_scale_init_value))
                init.constant_(module.group_logit_scale, float(module.config.logit_scale_init_value))

    def sharding_units(self) -> list[nn.Module]:
        """The base units, less the image embeddings when the short branch masks before the position embedding:
        `_embed` then runs the embedding's parts itself, outside its ``forward``, so its parameters stay in the root
        unit (the regional prompts, a parameter holder without a ``forward``, are there already)."""
        units = super().sharding_units()
        if self.config.mask_before_position_embedding:
            units = [unit for unit in units if unit is not self.vision_model.embeddings]
        return units

    def _check_attention_kernel(self) -> None:
        if self.regional_prompts is None:
            return
        implementation = self.config.vision_config._attn_implementation
        if implementation not in _MASKABLE_ATTENTION:
            raise ValueError(
                f"Fix-CLIP's regional prompts need an attention kernel that takes an additive float mask "
                f"({', '.join(_MASKABLE_ATTENTION)}); the image tower is set to {implementation!r}"
            )

    def set_attn_implementation(self, attn_implementation):
        """As transformers', refusing kernels the prompted image tower cannot run (see `_MASKABLE_ATTENTION`)."""
        super().set_attn_implementation(attn_implementation)
        self._check_attention_kernel()

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
        """CLS + patch embeddings with positions; masked patches replaced by the mask token (``masked_patches=
        "mask_token"``; with ``"drop"`` see `_embed_visible`)."""
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

    def _embed_visible(
        self, pixel_values: torch.Tensor, patch_mask: torch.Tensor, interpolate_pos_encoding: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``masked_patches="drop"``: CLS + the visible patches, each with its own position embedding, and the grid
        indices of those patches `(batch, K)`. Every image must keep the same number ``K`` of patches (what
        `random_patch_mask` draws)."""
        tokens = self.vision_model.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        batch, seq, dim = tokens.shape
        if patch_mask.shape != (batch, seq - 1):
            raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected {(batch, seq - 1)}")
        visible = ~patch_mask
        counts = visible.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                "masked_patches='drop' needs the same number of visible patches in every image of the batch, got "
                f"{sorted(set(counts.tolist()))}"
            )
        positions = visible.nonzero()[:, 1].view(batch, -1)  # row-major: each row's indices in grid order
        patches = tokens[:, 1:].gather(1, positions[..., None].expand(-1, -1, dim))
        return torch.cat([tokens[:, :1], patches], dim=1), positions

    def image_tower(
        self,
        pixel_values: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        use_prompts: bool = True,
        output_layer_cls: bool = False,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
    ) -> FixCLIPImageTowerOutput:
        """Run the image tower with regional prompts (the stock ``vision_model`` submodules, a custom layer loop).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)`): images.
            patch_mask (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): the short branch's masked
                patches: replaced by the mask token, or left out with ``masked_patches="drop"``.
            use_prompts (`bool`): insert the regional prompts (ignored without prompts in the config).
            output_layer_cls (`bool`): also return the CLS token after every layer.
            output_attentions, output_hidden_states (*optional*): as transformers' towers (default: the vision
                config's); hidden states hold CLS and patches, attention maps include the prompts.

        Returns:
            [`FixCLIPImageTowerOutput`].
        """
        vision = self.vision_model
        output_attentions, output_hidden_states = resolve_output_flags(
            self.config.vision_config, output_attentions, output_hidden_states
        )
        positions = None
        if patch_mask is not None and self.config.masked_patches == "drop":
            embedded, positions = self._embed_visible(pixel_values, patch_mask, interpolate_pos_encoding)
        else:
            embedded = self._embed(pixel_values, patch_mask, interpolate_pos_encoding)
        hidden = vision.pre_layrnorm(embedded)
        batch, seq, _ = hidden.shape
        num_patches = seq - 1 if positions is None else patch_mask.shape[1]
        prompts = self.regional_prompts if use_prompts else None
        if prompts is not None:
            self._check_attention_kernel()
        mask = None
        # With isolate_patches_from_prompts a prompted copy of CLS sits at index `seq` and is the tower's output CLS.
        isolate = prompts is not None and self.config.isolate_patches_from_prompts
        first_prompt = seq + (1 if isolate else 0)
        cls_index = 0

        def visible(states: torch.Tensor) -> torch.Tensor:
            """CLS (the output CLS) and patch tokens of a hidden state."""
            if not cls_index:
                return states[:, :seq]
            return torch.cat([states[:, cls_index : cls_index + 1], states[:, 1:seq]], dim=1)

        layer_cls = []
        with EncoderRecorder(vision.encoder.layers, output_attentions, output_hidden_states) as recorder:
            recorder.record(hidden)
            for index, layer in enumerate(vision.encoder.layers):
                slot = self._prompt_slot.get(index) if prompts is not None else None
                if slot is not None:
                    fresh = prompts.prompts[slot].to(hidden.dtype).expand(batch, -1, -1)
                    if mask is None:  # first prompted layer: append the prompt slots after the patches
                        parts = [hidden, hidden[:, :1]] if isolate else [hidden]
                        hidden = torch.cat([*parts, fresh], dim=1)
                        if positions is None:
                            mask = self.attention_mask_for(num_patches, hidden.dtype, hidden.device)
                        else:  # dropped patches: one mask per image, over the patches it kept
                            mask = regional_attention_mask(
                                num_patches, self.config.prompts_per_layer, self.config.region_remainder,
                                hidden.dtype, hidden.device, self.config.isolate_patches_from_prompts, positions,
                            )
                        cls_index = seq if isolate else 0
                    elif self.config.prompt_depth_mode == "add":
                        hidden = torch.cat([hidden[:, :first_prompt], hidden[:, first_prompt:] + fresh], dim=1)
                    else:  # "replace": VPT-deep, the previous layer's prompt outputs are dropped
                        hidden = torch.cat([hidden[:, :first_prompt], fresh], dim=1)
                hidden = layer(hidden, mask)
                if output_layer_cls:
                    layer_cls.append(hidden[:, cls_index])
                recorder.record(visible(hidden) if recorder.hidden_states is not None else hidden)
        tokens = visible(hidden)
        return FixCLIPImageTowerOutput(
            last_hidden_state=tokens,
            pooler_output=vision.post_layernorm(tokens[:, 0]),
            **recorder.outputs(),
            layer_cls=torch.stack(layer_cls, dim=1) if output_layer_cls else None,
            prompt_states=hidden[:, first_prompt:] if mask is not None else None,
        )

    # ------------------------------------------------------------------ features (prompted tower)
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
    ) -> FixCLIPImageTowerOutput | tuple:
        """The prompted tower's output with ``pooler_output`` the projected CLS `(batch, projection_dim)`; its
        ``last_hidden_state`` holds CLS and patch tokens (prompts removed). A tuple when ``return_dict`` (else
        ``config.return_dict``) is False, as transformers' `get_image_features`."""
        tower = self.image_tower(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        tower.pooler_output = self.visual_projection(tower.pooler_output)
        return self._return(tower, return_dict)

    def get_image_token_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every image token (CLS first, prompts excluded) of the prompted tower after ``post_layernorm`` and the
        visual projection: `(batch, 1 + num_patches, projection_dim)`."""
        hidden = self.image_tower(pixel_values).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def _text_layer_eot(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **tower_kwargs
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """Text tower output (pooled EOT projected) and the EOT token after every layer `(batch, L, hidden)`."""
        # The per-layer EOT tokens come from hooks on the layers, so the caller's hidden-state selection is untouched.
        layer_eot = []
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        eot = _eot_positions(input_ids, self.text_model.eos_token_id).to(input_ids.device)

        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            layer_eot.append(hidden[rows, eot])

        handles = [layer.register_forward_hook(record) for layer in self.text_model.encoder.layers]
        try:
            out = self.text_model(
                input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **tower_kwargs
            )
        finally:
            for handle in handles:
                handle.remove()
        out.pooler_output = self.text_projection(out.pooler_output)
        return out, torch.stack(layer_eot, dim=1)

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
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
            output_attentions, output_hidden_states, return_dict: as in [`LongCLIPModel.forward`] (the image tower's
                hidden states hold CLS and patches only).

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
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            for_loss=bool(return_loss),
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
        position_ids: torch.LongTensor | None = None,
        patch_mask: torch.Tensor | None = None,
        mask_generator: torch.Generator | int | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        for_loss: bool = True,
        keep_outputs: bool = False,
    ) -> dict[str, Any]:
        """Per-sample features of the loss (see `LongCLIPModel.loss_features`): normalised long-branch and
        short-branch embeddings, the short branch's ``patch_mask``, and the per-layer CLS / EOT tokens of the
        branches the hierarchical alignment uses (``image_layer_tokens`` / ``text_layer_tokens``). With
        `for_loss=False` only the long branch runs (no masked pass, no layer tokens)."""
        self._require_inputs(input_ids, pixel_values, attention_mask)
        cfg = self.config
        towers = self.tower_kwargs(output_attentions, output_hidden_states)
        want_groups = for_loss and len(cfg.aligned_groups) > 0
        full = self.image_tower(
            pixel_values,
            output_layer_cls=want_groups and cfg.group_image_branch == "full",
            interpolate_pos_encoding=interpolate_pos_encoding,
            **towers,
        )
        features: dict[str, Any] = {"image_embeds": F.normalize(self.visual_projection(full.pooler_output), dim=-1)}
        group_from_long = want_groups and cfg.group_text_branch == "long"
        if group_from_long:
            text_outputs, features["text_layer_tokens"] = self._text_layer_eot(input_ids, attention_mask, **towers)
        else:
            text_outputs = self.get_text_features(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **towers
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
                    output_attentions=False,
                    output_hidden_states=False,
                )
            features["masked_image_embeds"] = F.normalize(self.visual_projection(masked_tower.pooler_output), dim=-1)
            features["patch_mask"] = masked
        if want_groups:
            source = full if cfg.group_image_branch == "full" else masked_tower
            features["image_layer_tokens"] = source.layer_cls
        if keep_outputs:
            full.pooler_output = self.visual_projection(full.pooler_output)
            features.update(vision_model_output=full, text_model_output=text_outputs)
        return features

    def _unreached_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that only some loss steps reach (the short branch's mask token and temperature)."""
        names = ("mask_token", "short_logit_scale", "group_logit_scale")
        return [p for p in (getattr(self, n, None) for n in names) if p is not None and p.requires_grad]

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True) -> FixCLIPOutput:
        """Logits and (with `return_loss`) Fix-CLIP's loss from `loss_features` output (possibly concatenated over
        micro-batches)."""
        cfg = self.config
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        masked_embeds = features.get("masked_image_embeds")
        loss = loss_long = loss_short = loss_hier = None
        group_terms: dict[str, torch.Tensor] = {}
        if return_loss:
            self._require_pairs(image_embeds, text_embeds)
            smoothing = float(cfg.label_smoothing)
            loss_long = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, smoothing)
            loss = cfg.long_loss_weight * loss_long
            if short_embeds is not None and masked_embeds is not None:
                scale = self.short_logit_scale if cfg.separate_logit_scales else self.logit_scale
                loss_short = local_contrastive_loss(masked_embeds, short_embeds, scale, smoothing)
                loss = loss + cfg.short_loss_weight * loss_short
            if len(cfg.aligned_groups) > 0 and "image_layer_tokens" in features:
                scale = self.group_logit_scale if cfg.separate_logit_scales else self.logit_scale
                loss_hier, per_group = hierarchical_alignment_loss(
                    self.group_features(features["image_layer_tokens"], "image"),
                    self.group_features(features["text_layer_tokens"], "text"),
                    cfg.group_align_start,
                    cfg.resolved_group_loss_weights,
                    scale,
                    smoothing,
                )
                loss = loss + loss_hier
                group_terms = {f"loss_group_{g}": term for g, term in zip(cfg.aligned_groups, per_group.unbind())}
            # Zero-weighted: a step without the short branch still gives its parameters an (exactly zero) gradient.
            for parameter in self._unreached_parameters():
                loss = loss + 0.0 * parameter.sum()
        output = FixCLIPOutput(
            loss=loss,
            **self.clip_outputs(features),
            loss_long=loss_long,
            loss_short=loss_short,
            loss_hierarchical=loss_hier,
            short_text_embeds=short_embeds,
            masked_image_embeds=masked_embeds,
        )
        output.extra_loss_terms = group_terms
        output.patch_mask = features.get("patch_mask")
        return output

    # ------------------------------------------------------------------ export
    def _stock_image_tower_error(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{what} is not available for a Fix-CLIP with regional prompts: its image tower inserts "
            f"{self.config.prompts_per_layer} learned prompts in layers {list(self.config.prompted_layers)} under a "
            "one-way attention mask, and the CLS embedding depends on them, so no stock transformers CLIP image "
            "tower reproduces it. Export the text encoder with `to_text_model()` (it is a stock CLIPTextModel), "
            "and keep the full FixCLIPModel (save_pretrained / AutoModel) for image features."
        )

    def to_clip_model(self):
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


__all__ = [
    "FixCLIPGroupHead",
    "FixCLIPImageTowerOutput",
    "FixCLIPModel",
    "FixCLIPOutput",
    "FixCLIPRegionalPrompts",
    "random_patch_mask",
    "regional_attention_allowed",
    "regional_attention_mask",
]
