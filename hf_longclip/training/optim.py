"""Optimiser parameter groups (backbone / head x decay / no decay) and the per-group learning-rate schedules of the
papers' recipes.

See docs/training.md (Optimiser and schedule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

def decays(name: str, parameter: torch.Tensor, weight_decay_filter: str) -> bool:
    """Whether weight decay applies to a parameter under `weight_decay_filter` ("all" or "matrices")."""
    if weight_decay_filter == "all":
        return True
    if weight_decay_filter == "matrices":
        return parameter.ndim >= 2 and not name.endswith(".bias")
    raise ValueError(f"weight_decay_filter must be 'all' or 'matrices', got {weight_decay_filter!r}")


@dataclass
class GroupSchedule:
    """Peak lr, floor and warm-up of one parameter group."""

    name: str
    peak: float
    floor: float
    warmup_steps: int


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    head_learning_rate: float | None = None,
    weight_decay_filter: str = "all",
) -> list[dict]:
    """AdamW parameter groups: ``backbone``/``head`` x ``decay``/``no_decay`` (empty groups are dropped).

    Only parameters with ``requires_grad`` are included; ``model.is_head_parameter`` sorts them. Each group dict
    carries ``name`` (for logging) besides ``params``, ``lr`` and ``weight_decay``.
    """
    head_lr = learning_rate if head_learning_rate is None else head_learning_rate
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "head" if model.is_head_parameter(name) else "backbone"
        buckets.setdefault((part, decays(name, parameter, weight_decay_filter)), []).append(parameter)
    groups = []
    for (part, decay), params in sorted(buckets.items(), key=lambda kv: (kv[0][0] != "backbone", not kv[0][1])):
        groups.append(
            {
                "name": f"{part}{'' if decay else '_no_decay'}",
                "params": params,
                "lr": learning_rate if part == "backbone" else head_lr,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def lr_multiplier(step: int, total_steps: int, schedule: GroupSchedule, kind: str = "cosine") -> float:
    """lr(step) / peak for one group.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (Long-CLIP's ramp, never exactly 0). Then
    ``cosine``: ``floor + (peak - floor) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the post-warm-up steps
    done; ``linear``: straight to the floor; ``constant``: the peak.
    """
    if schedule.peak == 0:
        return 0.0
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    floor = schedule.floor / schedule.peak
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    schedules: Iterable[GroupSchedule],
    kind: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying `lr_multiplier` per group (`schedules` in the optimizer's group order)."""
    schedules = list(schedules)
    if len(schedules) != len(optimizer.param_groups):
        raise ValueError(f"{len(schedules)} schedules for {len(optimizer.param_groups)} parameter groups")
    lambdas = [lambda step, s=s: lr_multiplier(step, total_steps, s, kind) for s in schedules]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def schedules_for_groups(
    groups: list[dict],
    learning_rate: float,
    min_learning_rate: float,
    warmup_steps: int,
    head_learning_rate: float | None = None,
    head_min_learning_rate: float | None = None,
    head_warmup_steps: int | None = None,
) -> list[GroupSchedule]:
    """One `GroupSchedule` per group of `parameter_groups` output (backbone or head settings by name)."""
    out = []
    for group in groups:
        if group["name"].startswith("head"):
            peak = learning_rate if head_learning_rate is None else head_learning_rate
            floor = min_learning_rate if head_min_learning_rate is None else head_min_learning_rate
            warmup = warmup_steps if head_warmup_steps is None else head_warmup_steps
        else:
            peak, floor, warmup = learning_rate, min_learning_rate, warmup_steps
        if floor > peak:
            raise ValueError(f"{group['name']}: the lr floor {floor} exceeds the peak {peak}")
        out.append(GroupSchedule(group["name"], peak, floor, warmup))
    return out


__all__ = [
    "GroupSchedule",
    "build_scheduler",
    "decays",
    "lr_multiplier",
    "parameter_groups",
    "schedules_for_groups",
]
