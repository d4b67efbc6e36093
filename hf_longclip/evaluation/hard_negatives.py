"""Attribute-binding hard negatives: does an image score its own caption above captions that change one detail?

Records are JSONL lines ``{"image", "caption", "negatives": [...], "negative_types"?: [...]}``; scored through the
model's retrieval interface, ties counted against the model. See docs/evaluation.md (Hard negatives).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .retrieval import (
    EvalSettings,
    _no_readable_images,
    _take,
    check_scoring,
    encode_images,
    encode_texts,
    score_matrix,
    unreadable_summary,
)

#: Benchmark names of the form ``hardneg:<path.jsonl>`` select a hard-negative file in `evaluate`.
HARD_NEGATIVE_PREFIX = "hardneg:"
#: Images scored per block: each block is scored against its own captions only, so the cost grows with the number of
#: images times the block's captions, not with images times all captions.
_BLOCK_IMAGES = 64


@dataclass
class HardNegativeSet:
    """A hard-negative benchmark: per image, one positive caption and its negatives (optionally typed).

    Args:
        name (`str`): benchmark name (reports, logs).
        image_paths (list of `Path`): one per record.
        captions (list of `str`): the positive caption of each image.
        negatives (list of list of `str`): each image's negative captions (at least one).
        negative_types (list of (list of `str`) or `None`): per image, the type of each negative, or None.
    """

    name: str
    image_paths: list[Path]
    captions: list[str]
    negatives: list[list[str]]
    negative_types: list[list[str] | None] = field(default_factory=list)

    def __post_init__(self):
        if not self.negative_types:
            self.negative_types = [None] * len(self.captions)
        counts = {len(self.image_paths), len(self.captions), len(self.negatives), len(self.negative_types)}
        if len(counts) != 1:
            raise ValueError(f"{self.name}: image_paths, captions, negatives and negative_types differ in length")


def _record_error(path: Path, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}:{line}: {problem} (expected {{\"image\": path, \"caption\": text, \"negatives\": "
                      "[text, ...], optional \"negative_types\": [name, ...]}; see docs/evaluation.md)")


def read_hard_negatives(path: str | os.PathLike, name: str | None = None) -> HardNegativeSet:
    """Read a hard-negative JSONL file; relative image paths start at the file's folder.

    Raises:
        `FileNotFoundError`: no such file. `ValueError` (naming the file and line): invalid JSON, a missing or empty
        ``image`` / ``caption``, no ``negatives``, a non-string negative, ``negative_types`` of another length than
        ``negatives``, or no record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hard-negative file {str(path)!r} not found (a JSONL file; see docs/evaluation.md)")
    images, captions, negatives, types = [], [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _record_error(path, number, f"not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise _record_error(path, number, f"a JSON {type(record).__name__}, not an object")
        image, caption, negs = record.get("image"), record.get("caption"), record.get("negatives")
        if not isinstance(image, str) or not image.strip():
            raise _record_error(path, number, "no 'image' path")
        if not isinstance(caption, str) or not caption.strip():
            raise _record_error(path, number, "no 'caption' text")
        if not isinstance(negs, list) or not negs or not all(isinstance(n, str) and n.strip() for n in negs):
            raise _record_error(path, number, "'negatives' must be a non-empty list of non-empty strings")
        kinds = record.get("negative_types")
        if kinds is not None and (
            not isinstance(kinds, list) or len(kinds) != len(negs) or not all(isinstance(k, str) for k in kinds)
        ):
            raise _record_error(path, number, f"'negative_types' must be a list of {len(negs)} strings, one per negative")
        images.append(path.parent / image)
        captions.append(" ".join(caption.split()))
        negatives.append([" ".join(n.split()) for n in negs])
        types.append(list(kinds) if kinds is not None else None)
    if not captions:
        raise ValueError(f"{path}: no hard-negative records")
    return HardNegativeSet(name or f"{HARD_NEGATIVE_PREFIX}{path}", images, captions, negatives, types)


# ----------------------------------------------------------------------------------------------- the metric
def hard_negative_ranks(positive_scores: torch.Tensor, negative_scores: torch.Tensor,
                        negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each positive among itself and its negatives; a negative scoring >= the positive (or a NaN
    score) ranks above it (ties pessimistic).

    Args:
        positive_scores (`torch.Tensor` of shape `(N,)`).
        negative_scores (`torch.Tensor` of shape `(N, M)`).
        negative_mask (`torch.BoolTensor` of shape `(N, M)`, *optional*): valid negatives (rows may have fewer).
    """
    positive = positive_scores.float().cpu()[:, None]
    negatives = negative_scores.float().cpu()
    not_beaten = ~(positive > negatives)
    if negative_mask is not None:
        not_beaten &= negative_mask.cpu().to(torch.bool)
    return 1 + not_beaten.sum(1)


def summarise_hard_negatives(
    positive_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
    negative_types: Sequence[Sequence[str] | None] | None = None,
) -> dict:
    """The hard-negative metrics from per-image scores (see `hard_negative_accuracy` for the fields).

    Args:
        positive_scores (`(N,)`), negative_scores (`(N, M)`), negative_mask (`(N, M)` bool, *optional*): as in
            `hard_negative_ranks`.
        negative_types (*optional*): per image, the type of each valid negative (in column order), or None.
    """
    count = positive_scores.shape[0]
    mask = torch.ones(negative_scores.shape, dtype=torch.bool) if negative_mask is None else negative_mask.cpu().bool()
    if count == 0:
        return {"accuracy": 0.0, "mean_rank": 0.0, "chance": 0.0, "chance_mean_rank": 0.0, "num_images": 0,
                "num_negatives": 0}
    ranks = hard_negative_ranks(positive_scores, negative_scores, mask)
    per_image = mask.sum(1).double()
    result = {
        "accuracy": 100.0 * (ranks == 1).double().mean().item(),
        "mean_rank": ranks.double().mean().item(),
        # a random scorer: the positive is first with probability 1 / (1 + n), at rank 1 + n / 2 on average
        "chance": 100.0 * (1.0 / (1.0 + per_image)).mean().item(),
        "chance_mean_rank": (1.0 + per_image / 2).mean().item(),
        "num_images": count,
        "num_negatives": int(per_image.sum().item()),
    }
    if negative_types is not None and any(kinds is not None for kinds in negative_types):
        wins = positive_scores.float().cpu()[:, None] > negative_scores.float().cpu()
        tally: dict[str, list[int]] = {}
        for row, kinds in enumerate(negative_types):
            columns = mask[row].nonzero().flatten().tolist()
            for column, kind in zip(columns, kinds or ()):
                won, seen = tally.setdefault(kind, [0, 0])
                tally[kind] = [won + int(wins[row, column]), seen + 1]
        result["per_type"] = {
            kind: {"accuracy": 100.0 * won / seen, "num_pairs": seen} for kind, (won, seen) in sorted(tally.items())
        }
    return result


def hard_negative_accuracy(
    scores: torch.Tensor,
    positives: Sequence[int],
    negatives: Sequence[Sequence[int]],
    negative_types: Sequence[Sequence[str] | None] | None = None,
) -> dict:
    """Hard-negative metrics from a score matrix (what a model's retrieval scoring gives).

    Args:
        scores (`torch.Tensor` of shape `(num_images, num_texts)`): image-text similarities, higher is better.
        positives (`num_images` ints): the text index of each image's positive caption.
        negatives (`num_images` lists of ints): the text indices of each image's negatives (at least one each).
        negative_types (*optional*): per image, the type of each negative (same order), or None.

    Returns:
        ``accuracy``: % of images whose positive scores strictly above every negative (a tie is a miss);
        ``mean_rank``: mean 1-based rank of the positive among positive + negatives, ties ranked pessimistically;
        ``chance``: the accuracy of a random scorer, % (mean of 1 / (1 + number of negatives));
        ``chance_mean_rank``: its mean rank; ``num_images``, ``num_negatives``; with types, ``per_type``:
        ``{type: {"accuracy": % of (image, negative) pairs of that type the positive beats strictly, "num_pairs"}}``
        (chance 50%).

    Example:

    ```python
    >>> import torch
    >>> scores = torch.tensor([[0.9, 0.5, 0.9], [0.1, 0.8, 0.2]])  # 2 images x 3 texts
    >>> hard_negative_accuracy(scores, positives=[0, 1], negatives=[[1, 2], [0, 2]])["accuracy"]  # image 0 ties
    50.0
    ```
    """
    if len(positives) != scores.shape[0] or len(negatives) != scores.shape[0]:
        raise ValueError(f"positives and negatives need one entry per image ({scores.shape[0]})")
    if any(len(row) == 0 for row in negatives):
        raise ValueError("every image needs at least one negative")
    scores = scores.float().cpu()
    width = max(len(row) for row in negatives)
    index = torch.zeros(len(negatives), width, dtype=torch.long)
    mask = torch.zeros(len(negatives), width, dtype=torch.bool)
    for row, columns in enumerate(negatives):
        index[row, : len(columns)] = torch.as_tensor(list(columns), dtype=torch.long)
        mask[row, : len(columns)] = True
    rows = torch.arange(scores.shape[0])
    positive = scores[rows, torch.as_tensor(list(positives), dtype=torch.long)]
    negative = scores.gather(1, index).masked_fill(~mask, float("-inf"))
    return summarise_hard_negatives(positive, negative, mask, negative_types)


def evaluate_hard_negatives(
    model,
    processor,
    dataset: HardNegativeSet | str | os.PathLike,
    scoring: str = "global",
    settings: EvalSettings | None = None,
) -> dict:
    """Score a hard-negative set (a `HardNegativeSet` or the path of its JSONL file) with `model`'s retrieval scoring.

    Images and captions go through `encode_images` / `encode_texts` (their batching, image reading and unreadable
    image counting); each block of images is scored against its own captions only with the model's
    ``retrieval_scores`` in `scoring` mode ("global", or a fine-grained mode the model supports). Images that cannot
    be read are skipped with their captions and counted.

    Returns:
        `hard_negative_accuracy`'s fields plus ``scoring``, ``unreadable_images``, ``unreadable_examples`` and
        ``unreadable_reasons``; ``warning`` when some score is not finite.
    """
    settings = settings or EvalSettings()
    if not isinstance(dataset, HardNegativeSet):
        dataset = read_hard_negatives(dataset)
    check_scoring(model, scoring)
    model.eval()
    image_features, kept, failed = encode_images(model, processor.image_processor, dataset.image_paths, scoring, settings)
    if not kept:
        raise _no_readable_images(dataset.name, len(dataset.image_paths), failed)
    text_index: dict[str, int] = {}
    for image in kept:
        for text in (dataset.captions[image], *dataset.negatives[image]):
            text_index.setdefault(text, len(text_index))
    text_features = encode_texts(model, processor.tokenizer, list(text_index), scoring, settings)
    width = max(len(dataset.negatives[image]) for image in kept)
    positive = torch.empty(len(kept))
    negative = torch.full((len(kept), width), float("-inf"))
    mask = torch.zeros(len(kept), width, dtype=torch.bool)
    for start in range(0, len(kept), _BLOCK_IMAGES):
        block = kept[start : start + _BLOCK_IMAGES]
        wanted = sorted({text_index[t] for image in block for t in (dataset.captions[image], *dataset.negatives[image])})
        column = {text: c for c, text in enumerate(wanted)}
        device = next(iter(text_features.values())).device
        scores = score_matrix(
            model,
            _take(image_features, slice(start, start + len(block))),
            _take(text_features, torch.tensor(wanted, dtype=torch.long, device=device)),
            scoring,
            settings,
        )
        for offset, image in enumerate(block):
            row = start + offset
            positive[row] = scores[offset, column[text_index[dataset.captions[image]]]]
            negs = [column[text_index[t]] for t in dataset.negatives[image]]
            negative[row, : len(negs)] = scores[offset, negs]
            mask[row, : len(negs)] = True
    result = summarise_hard_negatives(positive, negative, mask, [dataset.negative_types[image] for image in kept])
    result.update(scoring=scoring, **unreadable_summary(failed, dataset.name))
    finite = torch.isfinite(positive).all() and torch.isfinite(negative[mask]).all()
    if not finite:
        result["warning"] = "non-finite scores"
    return result


def resolve_hard_negative_path(spec: str, data_root: str | os.PathLike | None = None) -> Path:
    """The file of a ``hardneg:<path>`` benchmark name: the path as given when it exists (absolute, or relative to
    the current folder), else relative to `data_root`."""
    raw = spec[len(HARD_NEGATIVE_PREFIX) :] if spec.startswith(HARD_NEGATIVE_PREFIX) else spec
    path = Path(raw).expanduser()
    if path.is_file() or path.is_absolute() or data_root is None:
        return path
    under_root = Path(data_root) / path
    return under_root if under_root.is_file() else path


__all__ = [
    "HARD_NEGATIVE_PREFIX",
    "HardNegativeSet",
    "evaluate_hard_negatives",
    "hard_negative_accuracy",
    "hard_negative_ranks",
    "read_hard_negatives",
    "resolve_hard_negative_path",
    "summarise_hard_negatives",
]
