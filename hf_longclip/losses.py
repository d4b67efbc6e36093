"""Contrastive losses shared by the hf_longclip variants.

All functions are pure: they take features and return scalars. Cross-process negatives use
:func:`gather_with_grad`, an all-gather that carries gradient back to the rank that produced each row, and the
losses follow the *local loss* form (open_clip's ``local_loss=True``): every rank scores its own rows against the
gathered columns. Averaging the per-rank losses (what DDP does to gradients) then equals the loss of one process
holding the whole global batch.

This file is copied next to saved models for ``trust_remote_code`` loading, so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def distributed_context() -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows of possibly different counts; the backward returns each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]):
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        max_rows = max(sizes)
        padded = tensor
        if tensor.shape[0] < max_rows:
            pad = tensor.new_zeros((max_rows - tensor.shape[0],) + tuple(tensor.shape[1:]))
            padded = torch.cat([tensor, pad], dim=0)
        buckets = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(buckets, padded.contiguous())
        return torch.cat([bucket[:n] for bucket, n in zip(buckets, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Every rank's loss may depend on every gathered row: sum the row gradients over ranks, keep our slice.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` (rows may differ per rank) from all ranks, keeping autograd.

    Returns ``(gathered, offset)`` where ``offset`` is the index of this rank's first row in ``gathered``.
    Without an initialised process group, returns ``(tensor, 0)``.
    """
    rank, world = distributed_context()
    if world == 1:
        return tensor, 0
    sizes = _gather_sizes(tensor)
    return _AllGatherWithGrad.apply(tensor, sizes), sum(sizes[:rank])


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (e.g. sample ids); rows may differ per rank."""
    _, world = distributed_context()
    if world == 1:
        return tensor
    with torch.no_grad():
        return _AllGatherWithGrad.apply(tensor.detach(), _gather_sizes(tensor))


def _gather_sizes(tensor: torch.Tensor) -> list[int]:
    local = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local)
    return [int(c.item()) for c in counts]


def local_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired features ``a[i] <-> b[i]`` (already L2-normalised).

    Rows are this rank's samples; columns are the other modality's features from every rank (gathered with
    gradient when ``gather`` and a process group is active). Returns
    ``(CE(s * a B_all^T, t) + CE(s * b A_all^T, t)) / 2`` with ``s = logit_scale.exp()`` and ``t`` the position of each
    row's partner among the gathered columns.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired features must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if gather:
        a_all, offset = gather_with_grad(a)
        b_all, _ = gather_with_grad(b)
    else:
        a_all, b_all, offset = a, b, 0
    scale = logit_scale.exp()
    targets = torch.arange(offset, offset + a.shape[0], device=a.device)
    logits_a = scale * a @ b_all.t()
    logits_b = scale * b @ a_all.t()
    return 0.5 * (
        F.cross_entropy(logits_a, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_b, targets, label_smoothing=label_smoothing)
    )


class _PrincipalSubspaceProjection(torch.autograd.Function):
    """``X -> X V_k V_k^T`` with ``V_k`` the top-``k`` right singular vectors of ``X``, with a stable backward.

    The projection depends only on the top-``k`` subspace, so its derivative involves only the gaps between kept
    and discarded eigenvalues ``l_i - l_j`` of ``C = X^T X`` (``i`` kept, ``j`` discarded). Back-propagating
    through a generic SVD also forms ``1 / (s_i^2 - s_j^2)`` for pairs *inside* each block; those terms cancel in
    exact arithmetic but are inf/NaN whenever two singular values coincide (rank-deficient or repeated features),
    which is how Long-CLIP's SVD step can turn a model's weights into NaN (the authors' issue #52). This backward
    is the same gradient with only the cross terms; a near-zero gap (an ill-defined subspace) is damped.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, components: int):
        work = x.double()
        eigenvalues, eigenvectors = torch.linalg.eigh(work.t() @ work)  # ascending
        # Rank <= components: the kept subspace holds every row of X, so the projection is the identity (and so is
        # its derivative); only the choice of the spare directions would be arbitrary.
        ctx.identity = bool(eigenvalues[-components - 1] <= 1e-10 * eigenvalues[-1].clamp_min(1e-300))
        if ctx.identity:
            return x.clone()
        kept = eigenvectors[:, -components:]
        ctx.save_for_backward(work, eigenvalues, eigenvectors)
        ctx.components = components
        return (work @ kept @ kept.t()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.identity:
            return grad_output, None
        work, eigenvalues, eigenvectors = ctx.saved_tensors
        k = ctx.components
        grad = grad_output.double()
        kept, rest = eigenvectors[:, -k:], eigenvectors[:, :-k]
        direct = grad @ kept @ kept.t()  # through X, with the subspace held fixed
        # through the subspace: dL/dP = X^T G, folded into the kept x discarded eigenvector pairs
        a = work.t() @ grad
        b = kept.t() @ (a + a.t()) @ rest  # (k, d - k)
        gap = eigenvalues[-k:, None] - eigenvalues[None, :-k]  # >= 0: kept eigenvalues are the largest
        damping = (1e-8 * float(eigenvalues[-1])) ** 2  # 1/gap for gaps >> 1e-8 of the top eigenvalue, -> 0 below
        weights = b * gap / (gap * gap + damping)
        m = rest @ weights.t() @ kept.t()  # sum_ij w_ij v_j v_i^T
        grad_c = 0.5 * (m + m.t())
        grad_x = direct + 2.0 * work @ grad_c
        return grad_x.to(grad_output.dtype), None


def pca_reconstruct(features: torch.Tensor, components: int) -> torch.Tensor:
    """Project a batch of features onto its first ``components`` principal components (and add the mean back).

    Long-CLIP's "primary component matching": ``X = f - mean(f)``, ``X = U S V^T``, result ``X V_k V_k^T + mean``,
    not re-normalised, with gradient through the decomposition (as the authors), computed in float64 with a
    backward that stays finite when singular values repeat (see `_PrincipalSubspaceProjection`). When the batch
    has no more than ``components`` rows the projection keeps every direction, so the features are returned
    unchanged.
    """
    if features.dim() != 2:
        raise ValueError(f"expected (batch, dim) features, got shape {tuple(features.shape)}")
    if features.shape[0] <= components or features.shape[1] <= components:
        return features
    mean = features.mean(dim=0, keepdim=True)
    centred = features - mean
    return _PrincipalSubspaceProjection.apply(centred, components) + mean


__all__ = [
    "distributed_context",
    "gather_with_grad",
    "gather_no_grad",
    "local_contrastive_loss",
    "pca_reconstruct",
]
