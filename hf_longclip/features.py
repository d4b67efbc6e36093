"""Per-batch feature dicts: concatenation along the sample dimension, padding trailing dimensions that differ
between batches (token counts, query slots) with zeros / False, which the models' masks make inert. Shared by the
cached gradient accumulation and the evaluation loops."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def concat_features(chunks: Sequence[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], list[dict[str, tuple]]]:
    """Concatenate feature dicts along dim 0, padding trailing dims to the largest size.

    Keys whose value is not a tensor with a sample dimension in every chunk (None, 0-d tensors, nested outputs) are
    dropped. Returns the merged dict and, per chunk, the original shape of each kept tensor (to slice gradients or
    results back).
    """
    if not chunks:
        raise ValueError("no feature chunks to concatenate")
    keys = [k for k, v in chunks[0].items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    keys = [k for k in keys if all(isinstance(c.get(k), torch.Tensor) for c in chunks)]
    merged: dict[str, torch.Tensor] = {}
    shapes: list[dict[str, tuple]] = [{} for _ in chunks]
    for key in keys:
        tensors = [c[key] for c in chunks]
        trailing = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for i, tensor in enumerate(tensors):
            shapes[i][key] = tuple(tensor.shape)
            pad: list[int] = []
            for d in reversed(range(1, tensor.dim())):
                pad += [0, trailing[d - 1] - tensor.shape[d]]
            padded.append(F.pad(tensor, pad) if any(pad) else tensor)
        merged[key] = torch.cat(padded, dim=0)
    return merged, shapes


__all__ = ["concat_features"]
