"""Contrastive losses and cross-process gathers shared by every variant (local-loss form; see docs/training.md)."""

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


__all__ = [
    "distributed_context",
    "gather_with_grad",
    "gather_no_grad",
    "local_contrastive_loss",
]
