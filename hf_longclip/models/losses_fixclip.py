"""Fix-CLIP's hierarchical alignment: Gaussian group token aggregation and the weighted per-group InfoNCE terms
(see docs/fixclip.md)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .losses_common import local_contrastive_loss


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


__all__ = ["gaussian_group_weights", "group_token_aggregation", "hierarchical_alignment_loss"]
