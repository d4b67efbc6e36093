"""MulCLIP's fine-grained losses as pure functions: word-patch reconstruction (``L_word``) and subcaption-aggregated
patch alignment (``L_sub``). See docs/mulclip.md (The objective).

Copied next to saved models for ``trust_remote_code`` loading, so it imports only torch and a sibling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .losses_common import distributed_context, gather_with_grad


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that stays connected to the inputs' graph (keeps DDP and `backward()` happy when nothing is valid)."""
    return sum(t.sum() * 0.0 for t in tensors)


def reconstruct_tokens(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rebuild every query token as an attention-weighted mixture of the other modality's tokens (same sample).

    ``softmax(cos(q_k, k_j) / temperature over j) @ keys``.

    Args:
        queries (`torch.Tensor` of shape `(B, Nq, D)`): tokens to rebuild.
        keys (`torch.Tensor` of shape `(B, Nk, D)`): tokens they are rebuilt from (keys and values).
        temperature (`float`): attention temperature.

    Returns:
        `torch.Tensor` of shape `(B, Nq, D)` (not normalised).
    """
    scores = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(1, 2)
    return (scores / temperature).softmax(dim=-1) @ keys


def token_reconstruction_contrastive(
    tokens: torch.Tensor, reconstructions: torch.Tensor, temperature: float, symmetric: bool = False
) -> torch.Tensor:
    """Token-level InfoNCE inside each sample: token ``k`` must pick its own reconstruction ``k``.

    Logits ``cos(tokens_k, reconstructions_j) / temperature``; cross-entropy with target ``j = k`` averaged over the
    ``N`` tokens. With ``symmetric`` the column direction (reconstruction ``k`` picks token ``k``) is averaged in.

    Args:
        tokens (`torch.Tensor` of shape `(B, N, D)`).
        reconstructions (`torch.Tensor` of shape `(B, N, D)`).
        temperature (`float`).
        symmetric (`bool`).

    Returns:
        `torch.Tensor` of shape `(B,)`: the loss of each sample.
    """
    logits = F.normalize(tokens, dim=-1) @ F.normalize(reconstructions, dim=-1).transpose(1, 2) / temperature
    batch, count, _ = logits.shape
    targets = torch.arange(count, device=logits.device).repeat(batch)
    rows = F.cross_entropy(logits.reshape(batch * count, count), targets, reduction="none").view(batch, count).mean(-1)
    if not symmetric:
        return rows
    cols = F.cross_entropy(
        logits.transpose(1, 2).reshape(batch * count, count), targets, reduction="none"
    ).view(batch, count).mean(-1)
    return 0.5 * (rows + cols)


def word_reconstruction_loss(
    visual_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    attention_temperature: float = 0.07,
    contrastive_temperature: float = 0.07,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MulCLIP's word-level loss ``L_word = L_recon,image + L_recon,text``, computed within each sample (no gather).

    Each calibrated visual token ``v'_k`` is rebuilt from the same sample's calibrated text tokens,
    ``ṽ_k = softmax(cos(v'_k, t'_j)/τ_a) t'``, and must match its own reconstruction among all ``ṽ_j`` of the sample
    (token-level InfoNCE at ``τ_c``); text tokens likewise from the visual tokens. Per-sample losses are averaged over
    the valid samples.

    Args:
        visual_tokens (`torch.Tensor` of shape `(B, Nv, D)`): calibrated visual tokens ``v'``.
        text_tokens (`torch.Tensor` of shape `(B, Nt, D)`): calibrated text tokens ``t'``.
        sample_mask (`torch.Tensor` of shape `(B,)`, *optional*): False for samples to leave out (e.g. a caption with
            no word token, whose calibrated text tokens are all zero).
        attention_temperature (`float`): ``τ_a`` of the reconstruction attention.
        contrastive_temperature (`float`): ``τ_c`` of the token-level InfoNCE.
        symmetric (`bool`): score both directions of the token-level InfoNCE.

    Returns:
        `(loss_word, loss_image, loss_text)`, scalars; 0 (graph-connected) when no sample is valid.
    """
    if visual_tokens.dim() != 3 or text_tokens.dim() != 3 or visual_tokens.shape[0] != text_tokens.shape[0]:
        raise ValueError(
            f"expected (B, Nv, D) and (B, Nt, D) tokens, got {tuple(visual_tokens.shape)} and {tuple(text_tokens.shape)}"
        )
    batch = visual_tokens.shape[0]
    valid = (
        torch.ones(batch, dtype=torch.bool, device=visual_tokens.device)
        if sample_mask is None
        else sample_mask.to(device=visual_tokens.device, dtype=torch.bool)
    )
    if not bool(valid.any()):
        zero = _zero_like_graph(visual_tokens, text_tokens)
        return zero, zero, zero
    visual, text = visual_tokens[valid], text_tokens[valid]
    rebuilt_visual = reconstruct_tokens(visual, text, attention_temperature)
    rebuilt_text = reconstruct_tokens(text, visual, attention_temperature)
    loss_image = token_reconstruction_contrastive(visual, rebuilt_visual, contrastive_temperature, symmetric).mean()
    loss_text = token_reconstruction_contrastive(text, rebuilt_text, contrastive_temperature, symmetric).mean()
    return loss_image + loss_text, loss_image, loss_text


def aggregate_by_subcaption(
    visual_tokens: torch.Tensor,
    subcaption_embeds: torch.Tensor,
    temperature: float = 0.07,
    top_k: int | None = None,
) -> torch.Tensor:
    """Subcaption-aggregated patches ``v̄``: for each subcaption, an attention-weighted mixture of its image's tokens.

    ``a = softmax(cos(t_sub, v_k) / τ)`` over the image's tokens (restricted to the ``top_k`` most similar ones when
    ``top_k`` is a positive number smaller than the token count), ``v̄ = normalize(Σ_k a_k v_k)``.

    Args:
        visual_tokens (`torch.Tensor` of shape `(B, N, D)`).
        subcaption_embeds (`torch.Tensor` of shape `(B, M, D)`): subcaption EOT embeddings of the same images.
        temperature (`float`): attention temperature ``τ_a``.
        top_k (`int`, *optional*): tokens kept per subcaption (None or 0: all).

    Returns:
        `torch.Tensor` of shape `(B, M, D)`, L2-normalised.
    """
    scores = F.normalize(subcaption_embeds, dim=-1) @ F.normalize(visual_tokens, dim=-1).transpose(1, 2)  # (B, M, N)
    scores = scores / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, torch.finfo(scores.dtype).min)
    return F.normalize(scores.softmax(dim=-1) @ visual_tokens, dim=-1)


def _masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, column_mask: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Row-wise cross-entropy over the valid columns only (label smoothing spread over the valid columns).

    Equals ``F.cross_entropy(logits[:, valid], ...)`` of each row with the invalid columns removed.
    """
    logits = logits.masked_fill(~column_mask, torch.finfo(logits.dtype).min)
    log_probs = logits.log_softmax(dim=-1)
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    if not label_smoothing:
        return nll
    valid_log_probs = torch.where(column_mask, log_probs, torch.zeros_like(log_probs))
    smooth = -valid_log_probs.sum(-1) / column_mask.sum(-1).clamp(min=1)
    return (1 - label_smoothing) * nll + label_smoothing * smooth


def subcaption_contrastive_loss(
    pooled_embeds: torch.Tensor,
    subcaption_embeds: torch.Tensor,
    subcaption_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    gather: bool = True,
) -> torch.Tensor:
    """MulCLIP's ``L_sub``: per subcaption slot ``i``, symmetric InfoNCE between the aggregated patches ``v̄_b^i`` and
    the subcaption embeddings ``t_b^i`` over the images ``b`` of the batch, averaged over every valid (image, slot).

    For slot ``i`` the candidates are the images whose slot ``i`` is valid: image ``b``'s ``v̄_b^i`` must pick
    ``t_b^i`` among ``{t_c^i}`` and vice versa. A padded slot is neither a row nor a column, so the loss equals the one
    computed on the unpadded set of subcaptions. A slot with one valid image contributes 0 (no negatives).

    Distributed (``gather`` and a process group active): the columns are all ranks' features, all-gathered with
    gradient, and each rank scores its own rows (local loss). The per-rank sum is divided by the *global* number of
    valid pairs and multiplied by the world size, so that DDP's gradient averaging gives exactly the gradient of one
    process holding the whole batch. Ranks may hold different slot counts ``M`` (padded to the largest here).

    Args:
        pooled_embeds (`torch.Tensor` of shape `(B, M, D)`): L2-normalised aggregated patches.
        subcaption_embeds (`torch.Tensor` of shape `(B, M, D)`): L2-normalised subcaption embeddings.
        subcaption_mask (`torch.Tensor` of shape `(B, M)`): True for real subcaptions.
        logit_scale (`torch.Tensor`): log of the inverse temperature (the model's ``logit_scale``).
        label_smoothing (`float`): label smoothing, spread over the valid candidates.
        gather (`bool`): use the other ranks' features as negatives.

    Returns:
        Scalar loss; 0 (graph-connected) when there is no valid subcaption anywhere.
    """
    if pooled_embeds.shape != subcaption_embeds.shape or pooled_embeds.dim() != 3:
        raise ValueError(
            f"expected two (B, M, D) tensors, got {tuple(pooled_embeds.shape)} and {tuple(subcaption_embeds.shape)}"
        )
    if tuple(subcaption_mask.shape) != tuple(pooled_embeds.shape[:2]):
        raise ValueError(f"subcaption_mask must be (B, M) = {tuple(pooled_embeds.shape[:2])}, got {tuple(subcaption_mask.shape)}")
    mask = subcaption_mask.to(device=pooled_embeds.device, dtype=torch.bool)
    rank, world = distributed_context()
    distributed = gather and world > 1
    if distributed:
        # Every rank must gather tensors of the same slot count.
        slots = torch.tensor([mask.shape[1]], device=mask.device, dtype=torch.long)
        dist.all_reduce(slots, op=dist.ReduceOp.MAX)
        extra = int(slots.item()) - mask.shape[1]
        if extra:
            pooled_embeds = F.pad(pooled_embeds, (0, 0, 0, extra))
            subcaption_embeds = F.pad(subcaption_embeds, (0, 0, 0, extra))
            mask = F.pad(mask, (0, extra), value=False)
        pooled_all, offset = gather_with_grad(pooled_embeds)
        text_all, _ = gather_with_grad(subcaption_embeds)
        mask_all, _ = gather_with_grad(mask.to(pooled_embeds.dtype).detach())
        mask_all = mask_all > 0.5
        count = mask.sum().to(torch.float64)
        dist.all_reduce(count)  # number of valid pairs in the global batch
        total_pairs = float(count.item())
    else:
        pooled_all, text_all, mask_all, offset = pooled_embeds, subcaption_embeds, mask, 0
        total_pairs = float(mask.sum().item())
    if total_pairs == 0:
        return _zero_like_graph(pooled_embeds, subcaption_embeds, logit_scale)

    batch, slots = mask.shape
    scale = logit_scale.exp()
    # (M, B, C): rows are this rank's images, columns every image, one matrix per slot.
    logits_image = scale * torch.einsum("bmd,cmd->mbc", pooled_embeds, text_all)
    logits_text = scale * torch.einsum("bmd,cmd->mbc", subcaption_embeds, pooled_all)
    column_mask = mask_all.t()[:, None, :].expand(slots, batch, -1)
    targets = (torch.arange(batch, device=mask.device) + offset).expand(slots, batch)
    per_pair = 0.5 * (
        _masked_cross_entropy(logits_image, targets, column_mask, label_smoothing)
        + _masked_cross_entropy(logits_text, targets, column_mask, label_smoothing)
    )  # (M, B)
    local_sum = torch.where(mask.t(), per_pair, torch.zeros_like(per_pair)).sum()
    if distributed:
        return local_sum * world / total_pairs
    return local_sum / total_pairs


__all__ = [
    "aggregate_by_subcaption",
    "reconstruct_tokens",
    "subcaption_contrastive_loss",
    "token_reconstruction_contrastive",
    "word_reconstruction_loss",
]
