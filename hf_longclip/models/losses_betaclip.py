"""beta-CLIP's losses: beta-CAL (soft-CE and weighted-BCE forms, with the authors' padded-slot behaviours as flags) and
the global CLS <-> caption InfoNCE with the authors' gather. The formulas are in docs/betaclip.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .losses_common import distributed_context, gather_no_grad, local_contrastive_loss

BETA_CAL_MODES = ("ce", "bce")


def same_image_indicator(num_images: int, slots: int, device=None) -> torch.Tensor:
    """``G = I_B (x) 1_{KxK}`` as a bool `(B*K, B*K)` matrix: True where two slots belong to the same image."""
    owner = torch.arange(num_images * slots, device=device) // max(slots, 1)
    return owner[:, None] == owner[None, :]


def beta_cal_target_weights(
    mask: torch.Tensor, alpha: float = 1.0, beta: float = 0.5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Unnormalised CE target weights ``W = (alpha I + beta (G - I)) * m m^T`` of shape `(B*K, B*K)`.

    Args:
        mask (`torch.BoolTensor` of shape `(B, K)`): validity of each query slot.
        alpha (`float`): weight of a slot's own text.
        beta (`float`): weight of the other texts of the same image.
    """
    num_images, slots = mask.shape
    valid = mask.reshape(-1).to(dtype)
    same = same_image_indicator(num_images, slots, mask.device).to(dtype)
    eye = torch.eye(num_images * slots, dtype=dtype, device=mask.device)
    weights = alpha * eye + beta * (same - eye)
    return weights * valid[:, None] * valid[None, :]


def _flatten(image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor | None):
    if image_embeds.shape != text_embeds.shape or image_embeds.dim() != 3:
        raise ValueError(
            "expected conditioned image and text embeddings of the same (B, K, D) shape, got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )
    num_images, slots, dim = image_embeds.shape
    if mask is None:
        mask = torch.ones(num_images, slots, dtype=torch.bool, device=image_embeds.device)
    if mask.shape != (num_images, slots):
        raise ValueError(f"mask must have shape {(num_images, slots)}, got {tuple(mask.shape)}")
    mask = mask.to(device=image_embeds.device, dtype=torch.bool)
    z = F.normalize(image_embeds.reshape(-1, dim), dim=-1)
    u = F.normalize(text_embeds.reshape(-1, dim), dim=-1)
    return z, u, mask


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    # Keeps every input in the graph (DDP with unused-parameter checks, gradient accumulation) without NaN.
    return sum(t.sum() for t in tensors) * 0.0


def beta_cal_ce_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    mask: torch.Tensor | None,
    logit_scale: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.5,
    mask_invalid_columns: bool = True,
) -> torch.Tensor:
    """beta-CAL, cross-entropy form with soft targets.

    ``L = 1/2 [ mean_{valid n} -sum_m W~[n,m] log softmax_m(S[n]) + the same with S^T ]`` where ``W~`` is
    `beta_cal_target_weights` row-normalised (rows summing to 0 give zero targets, as the authors' clamp does).

    Args:
        image_embeds (`torch.FloatTensor` of shape `(B, K, D)`): text-conditioned image embeddings (normalised here).
        text_embeds (`torch.FloatTensor` of shape `(B, K, D)`): the query text embeddings (normalised here).
        mask (`torch.BoolTensor` of shape `(B, K)`, *optional*): valid query slots; all valid when None.
        logit_scale (`torch.Tensor` of shape `()`): the *log* temperature; logits use ``exp(logit_scale)``.
        alpha (`float`): target weight of the slot's own text.
        beta (`float`): target weight of the same image's other texts; ``beta=0`` gives per-slot InfoNCE.
        mask_invalid_columns (`bool`): drop padded slots from the softmax denominators (default). False keeps them
            as negatives, the authors' behaviour.

    Returns:
        `torch.FloatTensor` of shape `()`.
    """
    z, u, mask = _flatten(image_embeds, text_embeds, mask)
    valid = mask.reshape(-1)
    if not bool(valid.any()):
        return _zero_loss(z, u, logit_scale)
    scale = logit_scale.exp()
    weights = beta_cal_target_weights(mask, alpha, beta, dtype=z.dtype)
    rows = valid.nonzero(as_tuple=True)[0]
    # Only valid rows enter the mean, so only they are computed; with masked columns only valid columns either
    # (identical to filling the padded logits with -inf, without the N x N work).
    cols = rows if mask_invalid_columns else torch.arange(valid.numel(), device=valid.device)
    targets = weights[rows][:, cols]
    targets = targets / targets.sum(dim=-1, keepdim=True).clamp(min=1e-8)
    logits_image = scale * z[rows] @ u[cols].t()  # conditioned image n vs every text m
    logits_text = scale * u[rows] @ z[cols].t()  # text n vs every conditioned image m
    loss_image = -(targets * F.log_softmax(logits_image, dim=-1)).sum(dim=-1).mean()
    loss_text = -(targets * F.log_softmax(logits_text, dim=-1)).sum(dim=-1).mean()
    return 0.5 * (loss_image + loss_text)


def beta_cal_bce_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    mask: torch.Tensor | None,
    logit_scale: torch.Tensor,
    beta: float = 0.5,
    mean_over_all_pairs: bool = False,
) -> torch.Tensor:
    """beta-CAL, binary cross-entropy form with beta-weighted same-image positives (no learnable bias).

    Labels ``Y = G * m m^T`` (every same-image pair is a positive); element weights ``w`` = 1 on the diagonal and on
    other-image pairs, ``beta`` on same-image off-diagonal pairs, times ``m m^T``.
    ``L = 1/2 [sum w * bce(S, Y) + sum w * bce(S^T, Y)] / denominator``.

    Args:
        image_embeds (`torch.FloatTensor` of shape `(B, K, D)`): text-conditioned image embeddings (normalised here).
        text_embeds (`torch.FloatTensor` of shape `(B, K, D)`): the query text embeddings (normalised here).
        mask (`torch.BoolTensor` of shape `(B, K)`, *optional*): valid query slots; all valid when None.
        logit_scale (`torch.Tensor` of shape `()`): the *log* temperature; logits use ``exp(logit_scale)``.
        beta (`float`): loss weight of same-image off-diagonal positives (clamped at 0, as the authors do).
        mean_over_all_pairs (`bool`): denominator ``N^2 = (B*K)^2`` including zero-weight entries (the authors'
            behaviour). Default False: the number of valid pairs ``(sum m)^2``.

    Returns:
        `torch.FloatTensor` of shape `()`.
    """
    z, u, mask = _flatten(image_embeds, text_embeds, mask)
    valid = mask.reshape(-1)
    count = int(valid.sum())
    if count == 0:
        return _zero_loss(z, u, logit_scale)
    num_images, slots = mask.shape
    rows = valid.nonzero(as_tuple=True)[0]
    # Entries touching an invalid slot have weight 0 (and the authors' -1e9 column fill makes their bce 0 too), so
    # only the valid sub-matrix contributes to the sum; the two modes differ only in the denominator.
    same = same_image_indicator(num_images, slots, z.device)[rows][:, rows]
    labels = same.to(z.dtype)
    weights = torch.ones_like(labels)
    weights = weights.masked_fill(same, max(float(beta), 0.0))
    weights.fill_diagonal_(1.0)
    scale = logit_scale.exp()
    logits_image = scale * z[rows] @ u[rows].t()
    logits_text = scale * u[rows] @ z[rows].t()
    total = F.binary_cross_entropy_with_logits(logits_image, labels, weight=weights, reduction="sum")
    total = total + F.binary_cross_entropy_with_logits(logits_text, labels, weight=weights, reduction="sum")
    denominator = float(valid.numel()) ** 2 if mean_over_all_pairs else float(count) ** 2
    return 0.5 * total / denominator


class BetaCALoss(nn.Module):
    """beta-CAL as a module: picks the CE or BCE form and holds its settings.

    Args:
        mode (`str`): ``"ce"`` (soft-target cross-entropy) or ``"bce"`` (beta-weighted binary cross-entropy).
        alpha (`float`): CE weight of a slot's own text (BCE always uses 1).
        beta (`float`): weight of the same image's other texts.
        mask_invalid_columns (`bool`): CE only; see `beta_cal_ce_loss`.
        mean_over_all_pairs (`bool`): BCE only; see `beta_cal_bce_loss`.

    Example:

    ```python
    >>> import torch
    >>> loss_fn = BetaCALoss("ce", beta=0.5)
    >>> z, u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    >>> loss = loss_fn(z, u, torch.ones(2, 3, dtype=torch.bool), torch.tensor(2.659))
    ```
    """

    def __init__(
        self,
        mode: str = "ce",
        alpha: float = 1.0,
        beta: float = 0.5,
        mask_invalid_columns: bool = True,
        mean_over_all_pairs: bool = False,
    ):
        super().__init__()
        if mode not in BETA_CAL_MODES:
            raise ValueError(f"beta-CAL mode must be one of {BETA_CAL_MODES}, got {mode!r}")
        self.mode = mode
        self.alpha = alpha
        self.beta = beta
        self.mask_invalid_columns = mask_invalid_columns
        self.mean_over_all_pairs = mean_over_all_pairs

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor | None, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if self.mode == "ce":
            return beta_cal_ce_loss(
                image_embeds, text_embeds, mask, logit_scale, self.alpha, self.beta, self.mask_invalid_columns
            )
        return beta_cal_bce_loss(image_embeds, text_embeds, mask, logit_scale, self.beta, self.mean_over_all_pairs)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha}, beta={self.beta}"


def global_contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, gradient: str = "local_rows"
) -> torch.Tensor:
    """beta-CLIP's CLS <-> caption InfoNCE (no label smoothing): this process's rows against every process's columns.

    Args:
        image_embeds, text_embeds (`torch.Tensor` of shape `(B, D)`): this process's L2-normalised embeddings.
        logit_scale (`torch.Tensor`): log of the inverse temperature.
        gradient (`str`): which features carry gradient under torch.distributed: ``"local_rows"`` (the authors': the
            gathered columns are constants, this process's own among them), ``"local_rows_and_columns"`` (this
            process's features also carry gradient as columns) or ``"all"`` (gather with gradient). Without a process
            group every setting is the plain symmetric InfoNCE with gradient everywhere, as the authors' code, which
            gathers nothing then.
    """
    rank, world = distributed_context()
    if world == 1 or gradient == "all":
        return local_contrastive_loss(image_embeds, text_embeds, logit_scale, 0.0, gather=True)
    if gradient not in ("local_rows", "local_rows_and_columns"):
        raise ValueError(f"gradient must be 'local_rows', 'local_rows_and_columns' or 'all', got {gradient!r}")
    batch = image_embeds.shape[0]
    sizes = gather_no_grad(torch.tensor([batch], device=image_embeds.device))
    offset = int(sizes[:rank].sum())

    def columns(local: torch.Tensor) -> torch.Tensor:
        gathered = gather_no_grad(local)
        if gradient == "local_rows":
            return gathered
        return torch.cat([gathered[:offset], local, gathered[offset + batch :]], dim=0)

    image_all, text_all = columns(image_embeds), columns(text_embeds)
    scale = logit_scale.exp()
    targets = torch.arange(offset, offset + batch, device=image_embeds.device)
    return 0.5 * (
        F.cross_entropy(scale * image_embeds @ text_all.t(), targets)
        + F.cross_entropy(scale * text_embeds @ image_all.t(), targets)
    )


__all__ = [
    "global_contrastive_loss",
    "BETA_CAL_MODES",
    "BetaCALoss",
    "beta_cal_bce_loss",
    "beta_cal_ce_loss",
    "beta_cal_target_weights",
    "same_image_indicator",
]
