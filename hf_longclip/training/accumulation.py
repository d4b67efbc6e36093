"""Gradient accumulation that keeps the negatives of the whole accumulated batch (GradCache style), through the
models' ``loss_features`` / ``loss_from_features``.

See docs/training.md (Cached gradient accumulation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..features import concat_features


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def cached_accumulation_step(
    model: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    loss_kwargs: Mapping[str, Any] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
):
    """Accumulate the gradient of the loss over the concatenation of `micro_batches` into ``.grad``.

    Args:
        model: the (unwrapped) model, with ``loss_features`` and ``loss_from_features``.
        micro_batches: the keyword arguments of each micro-batch (as the collator gives them).
        loss_kwargs: extra arguments of ``loss_from_features`` (e.g. FineLIP's ``warmup_alpha``).
        backward: how to back-propagate the loss (``accelerator.backward`` scales fp16 losses); default
            ``loss.backward()``. The same scaling reaches the encoders through the cached feature gradients.
        autocast: a factory of the mixed-precision context the passes run in (``accelerator.autocast``).

    Returns:
        The ``loss_from_features`` output of the full batch (its tensors detached).
    """
    if not micro_batches:
        raise ValueError("no micro-batches")
    loss_kwargs = dict(loss_kwargs or {})
    backward = backward or (lambda loss: loss.backward())
    autocast = autocast or contextlib.nullcontext
    device = next(model.parameters()).device

    states, chunks = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state(device))
            with autocast():
                chunks.append(model.loss_features(**batch))
    merged, shapes = concat_features(chunks)
    leaves = {}
    for key, value in merged.items():
        if value.is_floating_point():
            value = value.detach().requires_grad_()
            leaves[key] = value
        merged[key] = value
    del chunks
    with autocast():
        output = model.loss_from_features(merged, **loss_kwargs)
    if output.loss is None:
        raise ValueError("loss_from_features returned no loss")
    backward(output.loss)
    feature_grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    final_state = _rng_state(device)

    start = 0
    for batch, state, shape in zip(micro_batches, states, shapes):
        _set_rng_state(state, device)
        rows = next(iter(shape.values()))[0]
        with autocast():
            features = model.loss_features(**batch)
        tensors, grads = [], []
        for key, grad in feature_grads.items():
            value = features.get(key)
            if not isinstance(value, torch.Tensor) or not value.requires_grad:
                continue
            index = (slice(start, start + rows),) + tuple(slice(0, n) for n in shape[key][1:])
            tensors.append(value)
            grads.append(grad[index].to(value.dtype))
        if tensors:
            torch.autograd.backward(tensors, grads)
        start += rows
    # Leave the RNG where an uncached pass over the batches would have left it.
    _set_rng_state(final_state, device)
    return _detached(output)


def _detached(output):
    for key in list(output.keys()):
        value = output[key]
        if isinstance(value, torch.Tensor):
            output[key] = value.detach()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            output[key] = type(value)(v.detach() for v in value)
    return output


def average_gradients(parameters, world_size: int) -> None:
    """All-reduce and average ``.grad`` of `parameters` across processes (one flat buffer per dtype/device).

    The cached step runs the unwrapped model (DDP's reducer expects one backward per forward), so gradients are
    synchronised here instead; a parameter without a gradient on some rank contributes zeros.
    """
    import torch.distributed as dist

    if world_size <= 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


__all__ = ["average_gradients", "cached_accumulation_step"]
