"""Batched feature extraction and retrieval scoring through the models' retrieval interface.

Every variant's scoring modes run unchanged; a stock transformers `CLIPModel` is scored "global" only.
See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data.images import BAD_IMAGE_REASONS, BadImageError, load_image
from ..features import concat_features
from ..models.modeling_longclip import check_input_ids, check_pixel_values
from .metrics import DEFAULT_KS, recall_at_k
from .readers import RetrievalSet

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EvalSettings:
    """How to run an evaluation.

    Args:
        batch_size (`int`): images (and texts) per forward pass.
        device (`str`, *optional*): ``"cuda"``, ``"cpu"``, ...; default: the model's device. A device this machine
            does not have (``"cuda"`` without CUDA, ``"cuda:3"`` with two GPUs) is refused here, with a `ValueError`.
        dtype (`str`): ``"fp32"``, ``"fp16"`` or ``"bf16"``. fp16/bf16 run the forward passes under
            ``torch.autocast`` (weights stay as they are; scores are computed in fp32). fp16 needs a GPU.
        num_workers (`int`): image-decoding worker processes (torch ``DataLoader``).
        progress (`bool`): show tqdm progress bars.
        score_chunk (`int`): images scored per ``retrieval_scores`` call (bounds the memory of fine-grained modes).
    """

    batch_size: int = 64
    device: str | None = None
    dtype: str = "fp32"
    num_workers: int = 0
    progress: bool = True
    score_chunk: int = 1024

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device is not None:
            check_device(self.device)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, or a one-line `ValueError` when it is malformed or this machine lacks it (CUDA
    not available, a GPU index past the last one, MPS / XPU not available)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"unknown device {device!r} ({' '.join(str(error).split())})") from None
    kind = resolved.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} asked for, but this machine has {count} CUDA device(s)")
    elif kind not in ("cpu", "meta"):
        backend = getattr(torch.backends, kind, None) or getattr(torch, kind, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise ValueError(f"device {str(device)!r} asked for, but {kind} is not available on this machine")
    return resolved


def model_device(model: torch.nn.Module, settings: EvalSettings) -> torch.device:
    if settings.device is not None:
        return torch.device(settings.device)
    return next(model.parameters()).device


def autocast_context(device: torch.device, dtype: str):
    """`torch.autocast` for fp16/bf16 (fp16 on CPU is refused: CPU autocast is for bf16), else a no-op."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("fp16 evaluation needs a GPU; use dtype='bf16' or 'fp32' on CPU")
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


# ----------------------------------------------------------------------------------------------- images
#: Unreadable images listed by path in a result (``unreadable_examples``); all are counted.
MAX_UNREADABLE_EXAMPLES = 10


class UnreadableImage(NamedTuple):
    """An image evaluation skipped: its index (into the paths given), path, and the `BadImageError` ``reason``
    (``missing``, ``empty``, ``corrupt``, ``too_large``, ``too_small``) and ``detail`` training would give it."""

    index: int
    path: str
    reason: str
    detail: str

    def __str__(self) -> str:
        # "<path>: <reason>: <detail>"; a detail that starts with the path does not repeat it.
        detail = self.detail[len(self.path) + 2 :] if self.detail.startswith(self.path + ": ") else self.detail
        return f"{self.path}: {self.reason}: {detail}"


class ImageFiles(torch.utils.data.Dataset):
    """Loads images with the training loader (`hf_longclip.data.images.load_image`) in its reference-decoding mode,
    i.e. with training's conversions to RGB (16-bit grayscale scaled to 8 bits, transparency composited on white)
    but without EXIF rotation, as the authors' evaluation code (so 8-bit RGB JPEGs, what the benchmarks hold, give
    exactly ``Image.open(path).convert("RGB")``), and no pixel limit beyond PIL's own decompression-bomb check (a
    bomb is skipped and counted as ``too_large``); then runs the image processor.

    Items are ``(index, pixel_values, (width, height))``, or ``(index, None, UnreadableImage)`` for a file that
    cannot be used (its reason is counted later).
    """

    def __init__(self, paths: Sequence[str | Path], image_processor):
        self.paths = list(paths)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = os.fspath(self.paths[index])
        try:
            image = load_image(path, max_image_pixels=None, reference_decode=True)
        except BadImageError as error:
            return index, None, UnreadableImage(index, path, error.reason, error.detail)
        size = image.size  # (width, height) before preprocessing: FG-OVD maps boxes with it
        try:
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        except (OSError, ValueError, TypeError) as error:  # a decodable image the processor still cannot take
            detail = f"{path}: image processor failed: {type(error).__name__}: {error}"
            return index, None, UnreadableImage(index, path, "corrupt", detail)
        return index, pixels, size


def _collate_images(items):
    good = [item for item in items if item[1] is not None]
    failed = [item[2] for item in items if item[1] is None]
    pixels = torch.stack([item[1] for item in good]) if good else None
    return [item[0] for item in good], pixels, [item[2] for item in good], failed


def image_batches(paths: Sequence[str | Path], image_processor, settings: EvalSettings, desc: str = "images"):
    """Yield `(indices, pixel_values, sizes, failed)` batches in path order; `failed` lists an `UnreadableImage`
    (index into `paths`, path, reason, detail) per image of the batch that could not be used."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, image_processor),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=_collate_images,
    )
    yield from _progress(loader, len(loader), desc, settings.progress)


def unreadable_summary(failed: Sequence[UnreadableImage], name: str = "evaluation") -> dict:
    """The result fields describing skipped images, and one WARNING log line summarising them (when any).

    Returns:
        ``unreadable_images`` (count), ``unreadable_examples`` (up to `MAX_UNREADABLE_EXAMPLES` strings
        ``"<path>: <reason>: <detail>"``) and ``unreadable_reasons`` (reason -> count).
    """
    counts = Counter(item.reason for item in failed)
    order = [r for r in BAD_IMAGE_REASONS if r in counts] + sorted(set(counts) - set(BAD_IMAGE_REASONS))
    reasons = {reason: counts[reason] for reason in order}
    if failed:
        logger.warning(
            "%s: skipped %d unreadable image(s) (%s); first: %s",
            name,
            len(failed),
            ", ".join(f"{reason}: {count}" for reason, count in reasons.items()),
            failed[0],
        )
    return {
        "unreadable_images": len(failed),
        "unreadable_examples": [str(item) for item in failed[:MAX_UNREADABLE_EXAMPLES]],
        "unreadable_reasons": reasons,
    }


def _no_readable_images(name: str, total: int, failed: Sequence[UnreadableImage]) -> ValueError:
    reasons = Counter(item.reason for item in failed)
    first = f"; first: {failed[0]}" if failed else ""
    return ValueError(f"{name}: none of the {total} images could be read ({dict(reasons)}){first}")


def _merge(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return concat_features(chunks)[0] if chunks else {}


def _take(features: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {key: value[index] for key, value in features.items()}


def _has_interface(model) -> bool:
    return all(hasattr(model, name) for name in ("retrieval_image_features", "retrieval_text_features", "retrieval_scores"))


def check_scoring(model, scoring: str) -> None:
    """Raise the interface's error early when `model` lacks `scoring` (before any image is decoded)."""
    if _has_interface(model):
        check = getattr(model, "_check_scoring", None)
        if check is not None:
            check(scoring)
        elif scoring not in getattr(model, "retrieval_scorings", ("global",)):
            raise ValueError(f"{type(model).__name__} supports scoring {model.retrieval_scorings}, not {scoring!r}")
    elif scoring != "global":
        raise ValueError(f"{type(model).__name__} has no retrieval interface; only scoring 'global' works, not {scoring!r}")


def _image_features(model, pixel_values: torch.Tensor, scoring: str) -> dict[str, torch.Tensor]:
    if _has_interface(model):
        return model.retrieval_image_features(pixel_values, scoring=scoring)
    output = model.get_image_features(pixel_values=pixel_values)
    pooled = output if isinstance(output, torch.Tensor) else output.pooler_output
    return {"image_embeds": F.normalize(pooled, dim=-1)}


def _text_features(model, input_ids, attention_mask, scoring: str) -> dict[str, torch.Tensor]:
    if _has_interface(model):
        return model.retrieval_text_features(input_ids, attention_mask, scoring=scoring)
    output = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    pooled = output if isinstance(output, torch.Tensor) else output.pooler_output
    return {"text_embeds": F.normalize(pooled, dim=-1)}


def _scores(model, image_features, text_features, scoring: str) -> torch.Tensor:
    if _has_interface(model):
        return model.retrieval_scores(image_features, text_features, scoring=scoring)
    return image_features["image_embeds"] @ text_features["text_embeds"].t()


@torch.inference_mode()
def encode_images(
    model, image_processor, paths: Sequence[str | Path], scoring: str = "global", settings: EvalSettings | None = None
) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
    """Retrieval features of every readable image.

    Returns:
        `(features, kept, failed)`: `features` is the model's feature dict with the readable images on dim 0 (in
        path order), `kept` their indices into `paths`, `failed` an `UnreadableImage` (index into `paths`, path,
        reason, detail) per image that could not be used.
    """
    settings = settings or EvalSettings()
    device = model_device(model, settings)
    chunks, kept, failed = [], [], []
    for indices, pixels, _, bad in image_batches(paths, image_processor, settings):
        failed.extend(bad)
        if pixels is None:
            continue
        check_pixel_values(pixels, values=True)  # on the CPU: no device synchronisation
        with autocast_context(device, settings.dtype):
            features = _image_features(model, pixels.to(device), scoring)
        chunks.append(features)
        kept.extend(indices)
    return _merge(chunks), kept, failed


def text_length_limit(model, tokenizer) -> int:
    """Tokens the model's text tower reads (the tokenizer's length, capped at the position table)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    positions = getattr(text_config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(int(tokenizer.model_max_length), int(positions))


@torch.inference_mode()
def encode_texts(
    model, tokenizer, texts: Sequence[str], scoring: str = "global", settings: EvalSettings | None = None
) -> dict[str, torch.Tensor]:
    """Retrieval features of every text, in input order.

    Texts are tokenised once (truncated to the model's length, end-of-text kept last by the tokenizer's
    truncation), sorted by length and batched, so each batch is padded only to its own longest text; pooled
    EOT features do not depend on padding (causal mask), so the order trick changes speed, not results.
    """
    settings = settings or EvalSettings()
    device = model_device(model, settings)
    limit = text_length_limit(model, tokenizer)
    encoded = tokenizer(list(texts), truncation=True, max_length=limit, padding=False)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    chunks = []
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    for batch in _progress(batches, len(batches), "texts", settings.progress):
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
        # On the CPU, before the batch moves: every row must hold the end-of-text token the text tower pools at.
        check_input_ids(
            padded["input_ids"],
            padded["attention_mask"],
            eos_token_id=getattr(text_config, "eos_token_id", None),
            vocab_size=getattr(text_config, "vocab_size", None),
            values=True,
            row_names=[f"text {order_index}" for order_index in batch],
        )
        with autocast_context(device, settings.dtype):
            chunks.append(
                _text_features(model, padded["input_ids"].to(device), padded["attention_mask"].to(device), scoring)
            )
    features = _merge(chunks)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return _take(features, inverse.to(next(iter(features.values())).device)) if features else features


@torch.inference_mode()
def score_matrix(
    model, image_features: dict, text_features: dict, scoring: str = "global", settings: EvalSettings | None = None
) -> torch.Tensor:
    """`(num_images, num_texts)` fp32 CPU scores, computed `settings.score_chunk` images at a time."""
    settings = settings or EvalSettings()
    num_images = next(iter(image_features.values())).shape[0]
    device = next(iter(image_features.values())).device
    rows = []
    for start in range(0, num_images, settings.score_chunk):
        block = _take(image_features, slice(start, start + settings.score_chunk))
        with autocast_context(device, settings.dtype):
            rows.append(_scores(model, block, text_features, scoring).float().cpu())
    return torch.cat(rows, dim=0)


def evaluate_retrieval(
    model,
    processor,
    dataset: RetrievalSet,
    scoring: str = "global",
    settings: EvalSettings | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict:
    """R@k both ways on one benchmark.

    Unreadable images are dropped together with their texts; they are counted, by reason, and logged (see
    `unreadable_summary`).

    Returns:
        A dict with `t2i_R@k`, `i2t_R@k` (percent), `num_images`, `num_texts`, `unreadable_images`,
        `unreadable_examples`, `unreadable_reasons`, `split`, `scoring`, and throughput (`images_per_s`,
        `texts_per_s`).
    """
    settings = settings or EvalSettings()
    check_scoring(model, scoring)
    model.eval()
    start = time.perf_counter()
    image_features, kept, failed = encode_images(model, processor.image_processor, dataset.image_paths, scoring, settings)
    image_seconds = time.perf_counter() - start
    if not kept:
        raise _no_readable_images(dataset.name, len(dataset.image_paths), failed)
    new_index = {old: new for new, old in enumerate(kept)}
    text_ids = [t for t, image in enumerate(dataset.text_to_image) if image in new_index]
    texts = [dataset.texts[t] for t in text_ids]
    owner = [new_index[dataset.text_to_image[t]] for t in text_ids]
    start = time.perf_counter()
    text_features = encode_texts(model, processor.tokenizer, texts, scoring, settings)
    text_seconds = time.perf_counter() - start
    scores = score_matrix(model, image_features, text_features, scoring, settings)
    result = recall_at_k(scores, owner, ks)
    result.update(
        num_images=len(kept),
        num_texts=len(texts),
        **unreadable_summary(failed, dataset.name),
        split=dataset.split,
        scoring=scoring,
        images_per_s=round(len(kept) / max(image_seconds, 1e-9), 2),
        texts_per_s=round(len(texts) / max(text_seconds, 1e-9), 2),
    )
    if not math.isfinite(scores.sum().item()):
        result["warning"] = "non-finite scores"
    return result


__all__ = [
    "DTYPES",
    "MAX_UNREADABLE_EXAMPLES",
    "EvalSettings",
    "ImageFiles",
    "UnreadableImage",
    "autocast_context",
    "check_device",
    "check_scoring",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "image_batches",
    "score_matrix",
    "text_length_limit",
    "unreadable_summary",
]
