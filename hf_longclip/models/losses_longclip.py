"""Long-CLIP's primary-component matching: the PCA reconstruction of a batch's image features (see docs/longclip.md)."""

from __future__ import annotations

import torch


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


__all__ = ["pca_reconstruct"]
