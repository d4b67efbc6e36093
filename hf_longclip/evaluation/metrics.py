"""Retrieval and classification metrics.

Ties are broken against the model: a ground truth ranks behind every wrong candidate whose score is greater than or
equal to its own. See docs/evaluation.md (What is computed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _as_index(text_to_image: Sequence[int] | torch.Tensor, num_texts: int, num_images: int) -> torch.Tensor:
    index = torch.as_tensor(text_to_image, dtype=torch.long)
    if index.shape != (num_texts,):
        raise ValueError(f"text_to_image must have one entry per text ({num_texts}), got shape {tuple(index.shape)}")
    if num_texts and (index.min() < 0 or index.max() >= num_images):
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    return index


@torch.no_grad()
def retrieval_ranks(
    scores: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the ground truth for every text query and every image query.

    Args:
        scores (`torch.Tensor` of shape `(num_images, num_texts)`): similarities, higher is more similar.
        text_to_image (sequence of `int` or `torch.LongTensor` of shape `(num_texts,)`): the image of each text.
            An image may own any number of texts (COCO: 5).
        chunk_size (`int`): rows processed at once (bounds the boolean temporaries).

    Returns:
        `(text_ranks, image_ranks)`: `text_ranks` of shape `(num_texts,)` is, for text->image retrieval, the number of
        *other* images scoring >= the text's own image; `image_ranks` of shape `(num_images,)` is, for image->text
        retrieval, the number of texts of *other* images scoring >= the image's best-scoring own text (so a hit at k
        means one of its captions is in the top k). An image with no text gets rank `num_texts` (never a hit).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (num_images, num_texts), got shape {tuple(scores.shape)}")
    scores = scores.float().cpu()
    num_images, num_texts = scores.shape
    owner = _as_index(text_to_image, num_texts, num_images)

    # text -> image: compare each column with the score of its own image
    text_ranks = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk_size):
        block = scores[:, start : start + chunk_size]  # (I, c)
        cols = torch.arange(block.shape[1])
        own = owner[start : start + chunk_size]
        positive = block[own, cols]  # (c,)
        beats = block >= positive[None, :]
        beats[own, cols] = False
        text_ranks[start : start + chunk_size] = beats.sum(0)

    # image -> text: best own caption against every caption of other images
    image_ranks = torch.full((num_images,), num_texts, dtype=torch.long)
    for start in range(0, num_images, chunk_size):
        block = scores[start : start + chunk_size]  # (c, T)
        rows = torch.arange(start, start + block.shape[0])
        is_own = owner[None, :] == rows[:, None]  # (c, T)
        best_own = block.masked_fill(~is_own, float("-inf")).max(1).values  # (c,)
        beats = (block >= best_own[:, None]) & ~is_own
        has_text = is_own.any(1)
        image_ranks[start : start + block.shape[0]] = torch.where(
            has_text, beats.sum(1), torch.full_like(beats.sum(1), num_texts)
        )
    return text_ranks, image_ranks


def recall_at_k(
    scores: torch.Tensor, text_to_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k in percent for text->image (`"t2i_R@k"`) and image->text (`"i2t_R@k"`) retrieval.

    Args:
        scores (`torch.Tensor` of shape `(num_images, num_texts)`): similarities.
        text_to_image (`(num_texts,)` ints): the image each text describes.
        ks (sequence of `int`): cut-offs.

    Returns:
        `dict[str, float]` with `t2i_R@k` = % of texts whose image is in the top k images, and `i2t_R@k` = % of images
        with at least one of their texts in the top k texts (ties pessimistic, see the module docstring).
    """
    text_ranks, image_ranks = retrieval_ranks(scores, text_to_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * (text_ranks < k).double().mean().item() if len(text_ranks) else 0.0
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (image_ranks < k).double().mean().item() if len(image_ranks) else 0.0
    return out


def topk_accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k classification accuracy in percent, ties pessimistic.

    Args:
        logits (`torch.Tensor` of shape `(num_samples, num_classes)`).
        labels (`(num_samples,)` ints).
    """
    logits = logits.float().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long)
    positive = logits.gather(1, labels[:, None])
    beats = logits >= positive
    beats.scatter_(1, labels[:, None], False)
    rank = beats.sum(1)
    return {f"top{k}": 100.0 * (rank < k).double().mean().item() if len(rank) else 0.0 for k in ks}


def pairwise_accuracy(positive_scores: torch.Tensor, negative_scores: torch.Tensor, negative_mask: torch.Tensor | None = None) -> float:
    """% of rows whose positive scores strictly above every (valid) negative (FG-OVD; a tie is a miss).

    Args:
        positive_scores (`torch.Tensor` of shape `(N,)`).
        negative_scores (`torch.Tensor` of shape `(N, M)`).
        negative_mask (`torch.BoolTensor` of shape `(N, M)`, *optional*): valid negatives.
    """
    if len(positive_scores) == 0:
        return 0.0
    negatives = negative_scores.float()
    if negative_mask is not None:
        negatives = negatives.masked_fill(~negative_mask, float("-inf"))
    wins = positive_scores.float()[:, None] > negatives
    return 100.0 * wins.all(1).double().mean().item()


__all__ = ["DEFAULT_KS", "pairwise_accuracy", "recall_at_k", "retrieval_ranks", "topk_accuracy"]
