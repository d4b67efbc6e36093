"""Sequence packing for the text tower: many short rows share one tower row, each attending only to itself.

beta-CLIP encodes, per image, a caption and up to 5 sentences and 30 phrases. Padded to their longest row, the
sentence and phrase rows are about 40% padding (measured on ShareGPT4V-like captions, docs/betaclip.md), and the
text tower's cost is linear in positions. Packing puts several rows end to end in one tower row with

* position ids restarting at 0 for every row, so each row sees the position embeddings it would see alone;
* a block-diagonal causal mask, so each token attends to the earlier tokens of its own row only;
* pooling at each row's own end-of-text position.

The pooled embedding of a row is then the one the unpacked tower computes, up to float rounding (the matmuls see
different shapes), with only the rows' real tokens encoded. The attention is dense over a packed row (its cost grows
with the packed width), which is why rows are packed to a bounded `capacity` rather than all into one row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: attention implementations that take an additive `(batch, 1, query, key)` float mask
PACKABLE_ATTENTION = frozenset({"eager", "sdpa"})
#: default tokens per packed text row
DEFAULT_PACK_LENGTH = 64


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: bins of row indices whose lengths sum to at most `capacity`.

    Rows keep their relative order inside a bin by length (longest first); the bins' order is the order in which
    they were opened. A row longer than `capacity` gets a bin of its own.

    Args:
        lengths: each row's number of real tokens (>= 1).
        capacity: the tokens one packed row may hold.

    Returns:
        the bins, each a list of row indices; every row appears in exactly one bin.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for row in order:
        need = int(lengths[row])
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(row)
                room[b] -= need
                break
        else:
            bins.append([row])
            room.append(capacity - need)
    return bins


def packed_layout(lengths: torch.Tensor, capacity: int) -> dict[str, torch.Tensor]:
    """Where each row's tokens go in the packed batch.

    Args:
        lengths (`torch.LongTensor` of shape `(n,)`): real tokens per row.
        capacity (`int`): tokens per packed row (raised to the longest row when smaller).

    Returns:
        a dict with ``row_bin`` / ``row_offset`` `(n,)` (packed row and first column of each row), ``num_bins`` and
        ``width`` (0-dim tensors: the packed batch's shape).
    """
    lengths_list = [int(x) for x in lengths.tolist()]
    capacity = max(capacity, max(lengths_list, default=1))
    bins = pack_rows(lengths_list, capacity)
    row_bin = [0] * len(lengths_list)
    row_offset = [0] * len(lengths_list)
    width = 1
    for b, rows in enumerate(bins):
        offset = 0
        for row in rows:
            row_bin[row], row_offset[row] = b, offset
            offset += lengths_list[row]
        width = max(width, offset)
    device = lengths.device
    return {
        "row_bin": torch.tensor(row_bin, dtype=torch.long, device=device),
        "row_offset": torch.tensor(row_offset, dtype=torch.long, device=device),
        "num_bins": torch.tensor(len(bins)),
        "width": torch.tensor(width),
    }


def packed_text_hidden_states(
    text_model: nn.Module,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    pool_index: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """The text tower's final-LayerNorm output at one position of each row, with the rows packed.

    Args:
        text_model: a transformers `CLIPTextTransformer` / `CLIPTextModel` (``embeddings``, ``encoder.layers``,
            ``final_layer_norm``) whose attention takes an additive mask (`PACKABLE_ATTENTION`).
        input_ids (`torch.LongTensor` of shape `(n, L)`): right-padded rows.
        lengths (`torch.LongTensor` of shape `(n,)`): real tokens per row (1 <= length <= L).
        pool_index (`torch.LongTensor` of shape `(n,)`): the position to return in each row (< its length).
        capacity (`int`): tokens per packed row.

    Returns:
        `torch.FloatTensor` of shape `(n, hidden_size)`.
    """
    count, full_width = input_ids.shape
    device = input_ids.device
    layout = packed_layout(lengths, capacity)
    bins, width = int(layout["num_bins"]), int(layout["width"])
    row_bin, row_offset = layout["row_bin"], layout["row_offset"]

    column = torch.arange(full_width, device=device)
    real = column[None] < lengths[:, None]  # (n, L)
    rows, cols = real.nonzero(as_tuple=True)
    dest_bin, dest_col = row_bin[rows], row_offset[rows] + cols

    packed_ids = input_ids.new_zeros(bins, width)
    packed_ids[dest_bin, dest_col] = input_ids[rows, cols]
    position_ids = torch.zeros(bins, width, dtype=torch.long, device=device)
    position_ids[dest_bin, dest_col] = cols
    segment = torch.full((bins, width), -1, dtype=torch.long, device=device)
    segment[dest_bin, dest_col] = rows

    hidden = text_model.embeddings(input_ids=packed_ids, position_ids=position_ids)
    same_row = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = (same_row & causal) | torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself only
    mask = torch.zeros(bins, 1, width, width, dtype=hidden.dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(hidden.dtype).min)
    for layer in text_model.encoder.layers:
        hidden = layer(hidden, mask)
    hidden = text_model.final_layer_norm(hidden)
    return hidden[row_bin, row_offset + pool_index]


__all__ = ["DEFAULT_PACK_LENGTH", "PACKABLE_ATTENTION", "pack_rows", "packed_layout", "packed_text_hidden_states"]
