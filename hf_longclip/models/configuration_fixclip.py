"""Configuration of Fix-CLIP (Long-CLIP backbone + dual-branch training, regional prompts, hierarchical alignment)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_longclip import LongCLIPConfig

PROMPT_DEPTH_MODES = ("replace", "add")
REGION_REMAINDERS = ("none", "last")
GROUP_FEATURE_SOURCES = ("hidden", "post_layernorm")
GROUP_IMAGE_BRANCHES = ("full", "masked")
GROUP_TEXT_BRANCHES = ("long", "short")
MASKED_PATCH_MODES = ("mask_token", "drop")


@strict
class FixCLIPConfig(LongCLIPConfig):
    r"""
    Configuration of a [`FixCLIPModel`] (Wang et al., "Fix-CLIP", ICCV 2025, arXiv 2507.10095): a Long-CLIP
    configuration plus the settings of Fix-CLIP's three modules.

    No code of the authors exists and only secondary summaries of the method were readable. Values the public text
    states are marked [stated]; everything else is UNKNOWN and has the default we judged most sensible.

    Inherited fields are those of [`LongCLIPConfig`] (towers, 248-token stretch). ``long_loss_weight`` and
    ``short_loss_weight`` weigh ``L_long`` (long caption vs full image) and ``L_short`` (short caption vs masked image);
    ``pca_components`` is unused (Fix-CLIP has no PCA step).

    Args:
        label_smoothing (`float`, *optional*, defaults to 0.0):
            Label smoothing of every InfoNCE term. UNKNOWN; plain CLIP InfoNCE by default (Long-CLIP's code uses 0.1).
        mask_ratio (`float`, *optional*, defaults to 0.75):
            [stated] Fraction of patch embeddings the short branch replaces by the mask token. Must be in [0, 1).
            ``N - int(N * (1 - mask_ratio))`` patches are masked per image (MAE's count: 147 of 196).
        masked_patches (`str`, *optional*, defaults to `"mask_token"`):
            What the short branch does with its masked patches. ``"mask_token"`` (the stated method): every patch
            slot stays and the masked ones carry the learned mask token, so the branch costs a full image pass.
            ``"drop"`` (FLIP-style, not in the paper): the masked patches are removed; CLS, the visible patches with
            their own position embeddings and the regional prompts remain (each prompt still attends to the visible
            patches of its region), so at ``mask_ratio=0.75`` the branch runs on about a quarter of the tokens. The
            mask token is then unused.
        mask_before_position_embedding (`bool`, *optional*, defaults to `True`):
            Replace the patch embedding *before* the position embedding is added, so a masked slot still carries its
            position (BEiT / SimMIM style). UNKNOWN; False replaces the whole embedded token after the position is
            added (the mask token then carries no position).
        prompts_in_masked_branch (`bool`, *optional*, defaults to `True`):
            Run the masked short-branch image through the prompted tower too. UNKNOWN; True keeps one image tower.
        regional_prompts (`bool`, *optional*, defaults to `True`):
            Use regional prompts at all. False gives a stock CLIP image tower (plus the training-only mask token).
        num_regional_prompts (`int`, *optional*):
            ``M``, prompts per prompted layer. UNKNOWN; None means the patch grid's side (14 for ViT-B/16 at 224 px),
            so that every region is exactly one row of patches. Must be in ``[1, num_patches]``.
        prompt_layers (`list[int]`, *optional*):
            0-based indices of the image-encoder layers that receive fresh prompts. UNKNOWN; None means every layer.
            An empty list is rejected (use ``regional_prompts=False``).
        prompt_depth_mode (`str`, *optional*, defaults to `"add"`):
            How a prompted layer treats the previous layer's prompt outputs (UNKNOWN in the public text). ``"add"``
            adds the layer's fresh prompts to them, so what each prompt gathered from its region reaches the next
            layer's CLS: the only reading under which the paper's "prompt j sees its region" mask changes anything
            when every layer is prompted. ``"replace"`` (VPT-deep) discards them and inserts the new prompts; then a
            prompt's own attention output is never read and only the CLS -> prompt part of the mask matters.
            Layers after the first prompted one that are not in ``prompt_layers`` carry the prompt outputs through
            unchanged in both modes.
        isolate_patches_from_prompts (`bool`, *optional*, defaults to `False`):
            Not in the paper. The stated mask lets patches attend to CLS, and CLS reads the prompts, so from the layer
            after the first prompted one on, patch tokens depend on the prompts *through CLS*. True adds a second,
            prompted CLS token (the tower's output) and keeps the CLS that patches read prompt-free, so patch tokens
            are exactly those of the unprompted tower (one more token per prompted layer).
        prompt_init_std (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the prompts. UNKNOWN.
        region_remainder (`str`, *optional*, defaults to `"none"`):
            Where the ``N mod M`` patches left over by ``floor(N / M)``-patch regions go. ``"none"`` follows the stated
            formula (no prompt sees them); ``"last"`` adds them to the last region. Irrelevant when M divides N.
        num_groups (`int`, *optional*, defaults to 4):
            ``G``, groups the per-layer CLS / EOT tokens are split into. UNKNOWN. Must divide both towers' layer
            counts (12 and 12 for B/16, 24 and 12 for L/14: G in {1, 2, 3, 4, 6, 12}).
        group_align_start (`int`, *optional*, defaults to 2):
            ``K`` (1-based): groups ``K..G`` are aligned, shallower groups are not. UNKNOWN. Must be in ``[1, G]``.
        group_loss_weights (`list[float]`, *optional*):
            ``ω_K..ω_G``, one weight per aligned group. UNKNOWN; None gives ``1 / (G - K + 1)`` each, so the
            hierarchical term as a whole weighs as much as one InfoNCE term.
        group_gaussian_center (`float`, *optional*, defaults to 1.0):
            Centre of the Gaussian inside a group of ``S`` layers, as a fraction of the way from the group's first
            (0.0) to its last layer (1.0): ``μ = 1 + center * (S - 1)`` on 1-based layer positions. The stated formula
            ``Gaussian(j; S, 1)`` is centre 1.0.
        group_gaussian_sigma (`float`, *optional*, defaults to 1.0):
            [stated] Width of the Gaussian, in layers.
        group_normalize_weights (`bool`, *optional*, defaults to `True`):
            Normalise each group's Gaussian weights to sum to 1. UNKNOWN.
        group_feature_source (`str`, *optional*, defaults to `"hidden"`):
            What is aggregated per layer: ``"hidden"`` the raw residual-stream CLS / EOT tokens; ``"post_layernorm"``
            the tokens after the tower's final LayerNorm (``post_layernorm`` / ``final_layer_norm``). UNKNOWN.
        group_image_branch (`str`, *optional*, defaults to `"full"`):
            Which image pass feeds the group losses: ``"full"`` or ``"masked"``. UNKNOWN.
        group_text_branch (`str`, *optional*, defaults to `"long"`):
            Which caption feeds the group losses: ``"long"`` or ``"short"``. UNKNOWN.
        separate_logit_scales (`bool`, *optional*, defaults to `False`):
            Give ``L_short`` and the group losses their own learnable temperatures (``short_logit_scale``,
            ``group_logit_scale``). UNKNOWN; by default every term shares CLIP's ``logit_scale``.

    Example:

    ```python
    >>> from hf_longclip import FixCLIPConfig, FixCLIPModel
    >>> config = FixCLIPConfig(num_groups=4, group_align_start=2)  # ViT-B/32-shaped towers, 7 prompts per layer
    >>> model = FixCLIPModel(config)
    ```
    """

    model_type = "fixclip"

    label_smoothing: float | int = 0.0
    mask_ratio: float | int = 0.75
    masked_patches: str = "mask_token"
    mask_before_position_embedding: bool = True
    prompts_in_masked_branch: bool = True
    regional_prompts: bool = True
    num_regional_prompts: int | None = None
    prompt_layers: list[int] | None = None
    prompt_depth_mode: str = "add"
    isolate_patches_from_prompts: bool = False
    prompt_init_std: float | int = 0.02
    region_remainder: str = "none"
    num_groups: int = 4
    group_align_start: int = 2
    group_loss_weights: list[float | int] | None = None
    group_gaussian_center: float | int = 1.0
    group_gaussian_sigma: float | int = 1.0
    group_normalize_weights: bool = True
    group_feature_source: str = "hidden"
    group_image_branch: str = "full"
    group_text_branch: str = "long"
    separate_logit_scales: bool = False

    def __post_init__(self, **kwargs):
        if isinstance(self.mask_ratio, bool) or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        for name, allowed in (
            ("prompt_depth_mode", PROMPT_DEPTH_MODES),
            ("region_remainder", REGION_REMAINDERS),
            ("group_feature_source", GROUP_FEATURE_SOURCES),
            ("group_image_branch", GROUP_IMAGE_BRANCHES),
            ("group_text_branch", GROUP_TEXT_BRANCHES),
            ("masked_patches", MASKED_PATCH_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.prompt_init_std < 0:
            raise ValueError(f"prompt_init_std must be >= 0, got {self.prompt_init_std}")
        if self.group_gaussian_sigma <= 0:
            raise ValueError(f"group_gaussian_sigma must be > 0, got {self.group_gaussian_sigma}")
        if not 0.0 <= self.group_gaussian_center <= 1.0:
            raise ValueError(f"group_gaussian_center must be in [0, 1] (fraction of the group), got {self.group_gaussian_center}")
        for name in ("long_loss_weight", "short_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        super().__post_init__(**kwargs)
        # Checks that need the tower configs (only available once CLIPConfig has built them).
        vision_layers = self.vision_config.num_hidden_layers
        text_layers = self.text_config.num_hidden_layers
        patches = self.num_patches
        if self.num_regional_prompts is not None:
            m = self.num_regional_prompts
            if isinstance(m, bool) or not 1 <= m <= patches:
                raise ValueError(
                    f"num_regional_prompts must be in [1, {patches}] (the number of patches), got {m!r}"
                )
        if self.prompt_layers is not None:
            layers = list(self.prompt_layers)
            if not layers:
                raise ValueError("prompt_layers is empty; set regional_prompts=False to train without prompts")
            if any(not 0 <= i < vision_layers for i in layers):
                raise ValueError(f"prompt_layers must be 0-based indices below {vision_layers}, got {layers}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"prompt_layers has duplicates: {layers}")
        g, k = self.num_groups, self.group_align_start
        if isinstance(g, bool) or g < 1:
            raise ValueError(f"num_groups must be >= 1, got {g!r}")
        if vision_layers % g or text_layers % g:
            raise ValueError(
                f"num_groups={g} must divide both the image tower's {vision_layers} layers and the text tower's "
                f"{text_layers} layers (groups are consecutive, equally sized layer blocks)"
            )
        if not 1 <= k <= g:
            raise ValueError(f"group_align_start (K) must be in [1, num_groups={g}], got {k}")
        if self.group_loss_weights is not None:
            if len(self.group_loss_weights) != g - k + 1:
                raise ValueError(
                    f"group_loss_weights needs one weight per aligned group K..G ({g - k + 1}), "
                    f"got {len(self.group_loss_weights)}"
                )
            if any(w < 0 for w in self.group_loss_weights):
                raise ValueError(f"group_loss_weights must be >= 0, got {self.group_loss_weights}")

    @property
    def prompts_per_layer(self) -> int:
        """``M``: ``num_regional_prompts`` or the grid side (regions are whole patch rows)."""
        return self.num_regional_prompts if self.num_regional_prompts is not None else self.grid_size

    @property
    def prompted_layers(self) -> tuple[int, ...]:
        """Sorted 0-based indices of the prompted image-encoder layers (empty without regional prompts)."""
        if not self.regional_prompts:
            return ()
        if self.prompt_layers is None:
            return tuple(range(self.vision_config.num_hidden_layers))
        return tuple(sorted(self.prompt_layers))

    @property
    def aligned_groups(self) -> tuple[int, ...]:
        """1-based indices ``K..G`` of the groups that get a loss term."""
        return tuple(range(self.group_align_start, self.num_groups + 1))

    @property
    def resolved_group_loss_weights(self) -> tuple[float, ...]:
        """``ω_K..ω_G`` (the configured list, or equal weights summing to 1)."""
        if self.group_loss_weights is not None:
            return tuple(float(w) for w in self.group_loss_weights)
        n = len(self.aligned_groups)
        return tuple(1.0 / n for _ in range(n))


__all__ = [
    "FixCLIPConfig",
    "PROMPT_DEPTH_MODES",
    "REGION_REMAINDERS",
    "GROUP_FEATURE_SOURCES",
    "GROUP_IMAGE_BRANCHES",
    "GROUP_TEXT_BRANCHES",
]
