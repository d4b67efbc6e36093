"""FineLIP's cross-modal late interaction (CLIM) score and its bidirectional hinge loss, as pure functions.

CLIM compares two *sets* of L2-normalised tokens: with ``S = LeakyReLU(T V^T)`` the (text tokens x image tokens)
cosine matrix, ``sim = mean_t max_v S + mean_v max_t S`` (text->image plus image->text, summed; no temperature).

This file is copied next to saved models for ``trust_remote_code`` loading, so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _clim_block(
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    text_mask: torch.Tensor | None,
    negative_slope: float,
) -> torch.Tensor:
    """CLIM for one block: `(Tc, Nt, D)` texts x `(Ic, Nv, D)` images -> `(Ic, Tc)`."""
    num_texts, text_len, dim = text_tokens.shape
    num_images, image_len, _ = image_tokens.shape
    # One matmul for the whole block; (Ic * Nv, Tc * Nt) viewed as (Ic, Nv, Tc, Nt).
    sim = (image_tokens.reshape(-1, dim) @ text_tokens.reshape(-1, dim).t()).view(
        num_images, image_len, num_texts, text_len
    )
    # LeakyReLU is strictly increasing, so max(LeakyReLU(s)) == LeakyReLU(max(s)): apply it to the maxima only
    # (same values and gradients, no pass over the full block). `max(dim)` saves only indices for backward.
    text_to_image = F.leaky_relu(sim.max(dim=1).values, negative_slope)  # (Ic, Tc, Nt)
    if text_mask is not None and not bool(text_mask.all()):
        mask = text_mask.to(torch.bool)
        sim = sim.masked_fill(~mask[None, None], torch.finfo(sim.dtype).min)
        weights = mask.to(text_to_image.dtype)  # (Tc, Nt)
        counts = weights.sum(-1).clamp(min=1)
        t2i = (text_to_image * weights[None]).sum(-1) / counts[None]
    else:
        mask = None
        t2i = text_to_image.mean(-1)
    image_to_text = F.leaky_relu(sim.max(dim=3).values, negative_slope)  # (Ic, Nv, Tc)
    score = t2i + image_to_text.mean(1)
    if mask is not None:
        # A text with no valid token has no defined score: give it 0 rather than a huge negative number.
        score = score.masked_fill(~mask.any(-1)[None], 0.0)
    return score


def clim_scores(
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    negative_slope: float = 0.1,
    chunk_size: int | None = 64,
) -> torch.Tensor:
    """CLIM similarity of every image with every text, computed in blocks so memory stays bounded.

    ``score[i, t] = mean_{a valid} max_b S[a, b] + mean_b max_{a valid} S[a, b]`` with
    ``S = LeakyReLU(text_tokens[t] @ image_tokens[i]^T)``; tokens are expected L2-normalised (the range is then
    about ``[-0.2, 2]``). Differentiable.

    Args:
        text_tokens (`torch.Tensor` of shape `(num_texts, Nt, D)`): token sets of the texts.
        image_tokens (`torch.Tensor` of shape `(num_images, Nv, D)`): token sets of the images.
        text_mask (`torch.Tensor` of shape `(num_texts, Nt)`, *optional*): True for valid text tokens; invalid ones
            take part in neither direction. A text with no valid token scores 0.
        negative_slope (`float`): LeakyReLU slope (FineLIP: 0.1).
        chunk_size (`int`, *optional*): images and texts per block (a block holds ``chunk^2 * Nt * Nv`` similarities);
            None scores everything in one block.

    Returns:
        `torch.Tensor` of shape `(num_images, num_texts)`.
    """
    if text_tokens.dim() != 3 or image_tokens.dim() != 3:
        raise ValueError(
            f"expected (N, tokens, dim) token sets, got {tuple(text_tokens.shape)} and {tuple(image_tokens.shape)}"
        )
    if text_tokens.shape[-1] != image_tokens.shape[-1]:
        raise ValueError(f"token widths differ: {text_tokens.shape[-1]} vs {image_tokens.shape[-1]}")
    if text_mask is not None and text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"text_mask has shape {tuple(text_mask.shape)}, expected {tuple(text_tokens.shape[:2])}")
    num_texts, num_images = text_tokens.shape[0], image_tokens.shape[0]
    if num_texts == 0 or num_images == 0:
        return image_tokens.new_zeros(num_images, num_texts)
    chunk = chunk_size or max(num_texts, num_images)
    rows = []
    for start in range(0, num_images, chunk):
        images = image_tokens[start : start + chunk]
        cols = []
        for t_start in range(0, num_texts, chunk):
            mask = text_mask[t_start : t_start + chunk] if text_mask is not None else None
            cols.append(_clim_block(text_tokens[t_start : t_start + chunk], images, mask, negative_slope))
        rows.append(torch.cat(cols, dim=1) if len(cols) > 1 else cols[0])
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def bidirectional_hinge_loss(
    scores: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    margin: float = 0.2,
    max_violation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VSE++-style bidirectional triplet-margin loss on a paired score matrix (FineLIP's training loss).

    With ``d = diag(scores)`` (image ``j`` is paired with caption ``j``):

    * ``cost_s[j, i] = max(0, margin + scores[j, i] - d[j])``: image ``j`` as anchor, caption ``i`` as negative;
    * ``cost_im[j, i] = max(0, margin + scores[j, i] - d[i])``: caption ``i`` as anchor, image ``j`` as negative;
    * both are zeroed wherever ``image_ids[j] == image_ids[i]`` (the diagonal, and duplicate images in the batch);
    * the loss is the **sum** of both matrices (or, with ``max_violation``, the sum over anchors of the hardest
      negative's cost).

    A batch of one pair has no negative: the loss is exactly 0 (with zero gradients).

    Args:
        scores (`torch.Tensor` of shape `(B, B)`): images (rows) x captions (columns).
        image_ids (`torch.Tensor` of shape `(B,)`, *optional*): image identifiers (e.g. dataset indices); None treats
            every row as a different image.
        margin (`float`): the margin (FineLIP: 0.2).
        max_violation (`bool`): hardest negative only.

    Returns:
        `(loss, loss_image_anchor, loss_text_anchor)`, three scalars with ``loss`` their sum.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"the hinge loss needs a square (images x paired captions) matrix, got {tuple(scores.shape)}")
    size = scores.shape[0]
    if image_ids is None:
        same = torch.eye(size, dtype=torch.bool, device=scores.device)
    else:
        if image_ids.shape != (size,):
            raise ValueError(f"image_ids must have shape ({size},), got {tuple(image_ids.shape)}")
        image_ids = image_ids.to(scores.device)
        same = image_ids[:, None] == image_ids[None, :]
    diagonal = scores.diagonal()
    cost_s = (margin + scores - diagonal[:, None]).clamp(min=0).masked_fill(same, 0.0)
    cost_im = (margin + scores - diagonal[None, :]).clamp(min=0).masked_fill(same, 0.0)
    if max_violation:
        loss_s, loss_im = cost_s.max(dim=1).values.sum(), cost_im.max(dim=0).values.sum()
    else:
        loss_s, loss_im = cost_s.sum(), cost_im.sum()
    return loss_s + loss_im, loss_s, loss_im


def hinge_warmup_alpha(step: int, steps_per_epoch: int, warmup_epochs: int = 0) -> float:
    """The authors' ramp of the hinge loss: ``(step mod E) / E`` during epoch ``warmup_epochs``, 1 otherwise.

    ``step`` counts data-loader iterations (micro-batches) from 0 and ``E = steps_per_epoch``, as in the authors'
    ``train.py``. With the default ``warmup_epochs=0`` the loss weight grows linearly from 0 to ``(E - 1) / E`` over
    the first epoch and is 1 afterwards. (With ``warmup_epochs = k > 0`` the authors' formula gives weight 1 to the
    epochs before ``k``; this is reproduced as is.)
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, index = divmod(step, steps_per_epoch)
    return index / steps_per_epoch if epoch == warmup_epochs else 1.0


__all__ = ["bidirectional_hinge_loss", "clim_scores", "hinge_warmup_alpha"]
