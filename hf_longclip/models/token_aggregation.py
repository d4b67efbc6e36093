"""Token aggregation: FineLIP's ATRM head (see docs/finelip.md).

The token calibration heads of MulCLIP reuse it."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init


class TokenAggregation(nn.Module):
    """Aggregate a variable number of tokens into a fixed number of weighted mixtures.

    Per-token scores ``W(x) = Linear(GELU(Linear(LayerNorm(x))))`` of shape ``(N, num_outputs)`` are multiplied by a
    learnable scalar and soft-maxed over the *real* tokens (padding masked out); the output is ``A x`` with ``A`` of
    shape ``(num_outputs, N)``: the scores see the normalised tokens, the mixture is taken over the raw tokens.

    Args:
        dim: token width.
        num_outputs: aggregated tokens produced (FineLIP B/16: 39).
        hidden_ratio: hidden width of the scoring MLP as a fraction of ``dim`` (FineLIP: 0.2, so 102 for 512).
    """

    def __init__(self, dim: int, num_outputs: int, hidden_ratio: float = 0.2):
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.num_outputs = num_outputs
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_outputs)
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    @torch.no_grad()
    def reset_parameters(self, factor: float = 1.0) -> None:
        """PyTorch's default initialisation (the authors'), with the Linear bounds scaled by ``factor`` (CLIP's
        ``initializer_factor``), through transformers' init helpers so that loaded weights are left alone."""
        init.ones_(self.norm.weight)
        init.zeros_(self.norm.bias)
        for linear in (self.fc1, self.fc2):
            bound = factor / math.sqrt(linear.in_features)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
            init.uniform_(linear.weight, -bound, bound)
            init.uniform_(linear.bias, -bound, bound)
        init.ones_(self.scale)

    def aggregation_weights(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax weights `(batch, num_outputs, N)`; masked (padding) tokens get weight 0."""
        scores = self.fc2(self.act(self.fc1(self.norm(tokens))))  # (B, N, num_outputs)
        logits = (self.scale * scores).transpose(1, 2)  # (B, num_outputs, N)
        if mask is not None:
            mask = mask.to(torch.bool)
            logits = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1)
        if mask is not None:
            # A sample with no real token gets all-zero weights instead of a uniform mix of padding.
            weights = weights * mask.any(dim=-1)[:, None, None].to(weights.dtype)
        return weights

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens` `(B, N, dim)`, optional `mask` `(B, N)` with 1 for real tokens -> `(B, num_outputs, dim)`."""
        return self.aggregation_weights(tokens, mask) @ tokens


__all__ = ["TokenAggregation"]
