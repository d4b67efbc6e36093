"""A QuickGELU that keeps a third of the activations autograd would keep.

CLIP's MLP activation is ``x * sigmoid(1.702 x)``. Written with tensor ops, autograd keeps the sigmoid's output and the
input for the backward pass, and the following ``fc2`` keeps the activation's output: three ``(tokens, 4 * width)``
tensors per layer, the largest activations of a CLIP step. `QuickGELUFunction` keeps only its input and recomputes
the sigmoid in the backward pass (one elementwise op), so the MLP keeps two. The forward is the same expression, so
outputs are identical; gradients equal autograd's up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import QuickGELUActivation


class QuickGELUFunction(torch.autograd.Function):
    """``x * sigmoid(1.702 x)`` whose backward recomputes the sigmoid from the saved input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


class MemoryEfficientQuickGELU(nn.Module):
    """Drop-in for transformers' `QuickGELUActivation` (same output) that saves only its input for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return QuickGELUFunction.apply(x)
        return x * torch.sigmoid(1.702 * x)


def use_memory_efficient_activations(model: nn.Module, enabled: bool = True) -> int:
    """Swap every QuickGELU of `model`'s CLIP MLPs for `MemoryEfficientQuickGELU` (or back); returns how many.

    Modules with another activation are left alone. Nothing in the state dict changes.
    """
    count = 0
    for module in model.modules():
        activation = getattr(module, "activation_fn", None)
        if enabled and isinstance(activation, QuickGELUActivation):
            module.activation_fn = MemoryEfficientQuickGELU()
            count += 1
        elif not enabled and isinstance(activation, MemoryEfficientQuickGELU):
            module.activation_fn = QuickGELUActivation()
            count += 1
    return count


__all__ = ["MemoryEfficientQuickGELU", "QuickGELUFunction", "use_memory_efficient_activations"]
