"""Torch datasets over caption records that skip bad samples and count them, and a seeded DataLoader.

A bad sample (an unreadable image, an empty or non-string caption) becomes a `SkippedSample` instead of an
exception; `SkipCountingCollator` drops those from the batch and reports ``batch["skipped"] = {reason: count}``,
which the trainer pops, accumulates in a `SkipCounter` and logs. With ``strict=True`` the first bad sample raises
`BadSampleError` instead.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..text.sentences import first_sentence, normalise_caption
from .images import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, describe_image_source, image_source_exists, load_image
from .sources import resolve_image_path

logger = logging.getLogger(__name__)

#: Caption problems, next to the image reasons of `BAD_IMAGE_REASONS`.
CAPTION_REASONS = ("empty_caption", "non_string_caption")


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder a dataset returns for a bad sample (picklable, so it crosses DataLoader workers).

    Args:
        index: the record's index (map-style) or position in the shard's stream (iterable).
        reason (`str`): a `BadImageError` reason or one of `CAPTION_REASONS`.
        source (`str`): the image source, described (a path, or ``<N bytes>``).
        detail (`str`): a human-readable explanation.
    """

    index: Any
    reason: str
    source: str = ""
    detail: str = ""


class BadSampleError(ValueError):
    """Raised in strict mode for the first bad sample; the message names the index, the image and the reason."""

    def __init__(self, index: Any, source: str, reason: str, detail: str = ""):
        self.index, self.source, self.reason, self.detail = index, source, reason, detail
        message = f"bad sample at index {index} (image {source}): {reason}"
        super().__init__(f"{message} ({detail})" if detail else message)

    def __reduce__(self):
        return (type(self), (self.index, self.source, self.reason, self.detail))

    @classmethod
    def from_skipped(cls, skipped: SkippedSample) -> BadSampleError:
        return cls(skipped.index, skipped.source, skipped.reason, skipped.detail)


@dataclass(frozen=True)
class RecordColumns:
    """Which keys of a record hold the image, the long caption, the short caption and the id."""

    image: str = "image"
    caption: str = "caption"
    short_caption: str | None = "short_caption"
    id: str | None = "id"


def check_caption(caption: Any) -> tuple[str | None, str | None]:
    """``(normalised caption, None)`` for a usable caption, else ``(None, reason)``."""
    if not isinstance(caption, str):
        return None, "non_string_caption"
    caption = normalise_caption(caption)
    if not caption:
        return None, "empty_caption"
    return caption, None


def prepare_sample(
    record: Mapping[str, Any],
    index: Any,
    transform: Callable[[Any], torch.Tensor] | None,
    columns: RecordColumns = RecordColumns(),
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    image_root: str | os.PathLike | None = None,
    default_id: Any = None,
    passthrough: Sequence[str] = (),
    rng: random.Random | None = None,
) -> dict[str, Any] | SkippedSample:
    """Turn one record into a training example, or a `SkippedSample` if its data is bad.

    The caption is checked first (cheap), then the image is loaded with `load_image` and transformed. The short
    caption is the record's own when it is a non-empty string, else the long caption's first sentence.

    `passthrough` names record keys copied into the example as they are (e.g. beta-CLIP's parsed ``sentences`` /
    ``phrases``). `rng`, when given, is passed to the transform (``transform(image, rng=rng)``) so random
    augmentations can be a function of the sample rather than of a shared RNG stream.

    Returns:
        ``{"pixel_values", "caption", "short_caption", "id"}`` (``"image"``, a PIL image, instead of
        ``"pixel_values"`` when `transform` is `None`: the collator then runs the processor), or a `SkippedSample`.
    """
    image_source = record.get(columns.image)
    caption, reason = check_caption(record.get(columns.caption))
    if reason is not None:
        detail = f"caption is {record.get(columns.caption)!r:.60}"
        return SkippedSample(index, reason, describe_image_source(image_source), detail)
    image_source = resolve_image_path(image_source, image_root)
    try:
        image = load_image(image_source, max_image_pixels=max_image_pixels)
    except BadImageError as error:
        return SkippedSample(index, error.reason, describe_image_source(image_source), error.detail)
    short = record.get(columns.short_caption) if columns.short_caption else None
    short = normalise_caption(short) if isinstance(short, str) else ""
    ident = record.get(columns.id) if columns.id else None
    example = {
        "caption": caption,
        "short_caption": short or first_sentence(caption),
        "id": default_id if ident is None else ident,
    }
    if transform is None:
        example["image"] = image
    else:
        example["pixel_values"] = transform(image) if rng is None else transform(image, rng=rng)
    for key in passthrough:
        if key in record:
            example[key] = record[key]
    return example


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A `random.Random` that depends only on (seed, epoch, sample index): augmentations drawn from it are the same
    whatever the number of workers, the prefetching, or where a resumed run restarted."""
    return random.Random((seed * 1_000_003 + epoch) * 10_000_019 + index)


class LongCaptionDataset(Dataset):
    r"""
    Map-style dataset of (image, long caption) records that never raises for bad data.

    `__getitem__` returns ``{"pixel_values", "caption", "short_caption", "id"}`` or, for a bad record, a
    `SkippedSample` (``reason``: a `BadImageError` reason, ``empty_caption`` or ``non_string_caption``). Wrap the
    variant collator in `SkipCountingCollator` to drop and count those. Captions go through `normalise_caption`.

    Args:
        records: a sequence of mappings (e.g. from `read_sharegpt4v`) or a `datasets.Dataset`.
        transform (*optional*): PIL image -> ``(3, H, W)`` tensor (see `transforms`); `None` returns the PIL image
            as ``"image"`` for the collator's processor.
        image_column / caption_column / short_caption_column / id_column (`str`): record keys. Without an id the
            record's index is its id (what FineLIP's duplicate-image mask uses).
        strict (`bool`, defaults to `False`): raise `BadSampleError` on the first bad sample instead.
        max_image_pixels (`int`, *optional*): see `load_image`.
        image_root (*optional*): folder relative image paths are resolved against (readers already resolve theirs).
        passthrough (`Sequence[str]`): record keys copied into each example (e.g. parsed caption hierarchies).
        seed (`int`, *optional*): make random transforms a function of (seed, epoch, index) via `sample_rng`
            (the transform must accept ``rng=``); call `set_epoch` every epoch.

    Example:

    ```python
    >>> from hf_longclip.data import LongCaptionDataset, SkipCountingCollator, LongCLIPCollator
    >>> from hf_longclip.data.transforms import EvalTransform
    >>> dataset = LongCaptionDataset(records, EvalTransform(224))  # doctest: +SKIP
    >>> collator = SkipCountingCollator(LongCLIPCollator(processor))  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        short_caption_column: str | None = "short_caption",
        id_column: str | None = "id",
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        image_root: str | os.PathLike | None = None,
        passthrough: Sequence[str] = (),
        seed: int | None = None,
    ):
        self.records = records
        self.transform = transform
        self.columns = RecordColumns(image_column, caption_column, short_caption_column, id_column)
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.image_root = image_root
        self.passthrough = tuple(passthrough)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the per-sample augmentation RNG (with `seed`); set it before creating each epoch's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        index = int(index)
        sample = prepare_sample(
            self.records[index],
            index,
            self.transform,
            self.columns,
            self.max_image_pixels,
            self.image_root,
            default_id=index,
            passthrough=self.passthrough,
            rng=None if self.seed is None else sample_rng(self.seed, self.epoch, index),
        )
        if self.strict and isinstance(sample, SkippedSample):
            raise BadSampleError.from_skipped(sample)
        return sample


def shard_position() -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker; ``(0, 1)`` in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _is_hf_iterable(records: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency, but keep this module importable without it
        return False
    return isinstance(records, datasets.IterableDataset)


class IterableLongCaptionDataset(IterableDataset):
    r"""
    Iterable dataset for streamed or very large sources, sharded by process AND by DataLoader worker so that every
    record is read by exactly one (rank, worker) pair. Bad records give `SkippedSample`s as in `LongCaptionDataset`.

    Sharding: shard ``rank * num_workers + worker`` of ``world_size * num_workers``.

    * A sequence (list, `datasets.Dataset`) is indexed directly: shard ``s`` takes indices ``s, s + n, ...`` and reads
      nothing else; the index is the default id.
    * A `datasets.IterableDataset` is split across processes with `datasets.distributed.split_dataset_by_node`,
      and `datasets` itself then splits it across DataLoader workers by shard files (it does so whenever it is
      iterated inside a worker). Workers beyond the dataset's ``num_shards`` get no data, so keep
      ``num_workers <= dataset.num_shards / world_size``. Rows without an id get ``"<rank>-<worker>-<n>"``.
    * Any other iterable (or a zero-argument callable returning one, re-called every epoch) is read by every shard,
      which keeps every ``n``-th record.

    Do not pass the DataLoader over this dataset through ``accelerator.prepare``: Accelerate would shard it a second
    time (``IterableDatasetShard``) or dispatch batches from rank 0. Move batches to the device yourself.

    Args:
        records: see above.
        transform / columns / strict / max_image_pixels / image_root: as in `LongCaptionDataset`.
        rank (`int`, defaults to 0) / world_size (`int`, defaults to 1): this process's place among the training
            processes (``accelerator.process_index`` / ``accelerator.num_processes``).
    """

    def __init__(
        self,
        records: Iterable[Mapping[str, Any]] | Callable[[], Iterable[Mapping[str, Any]]],
        transform: Callable[[Any], torch.Tensor] | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        short_caption_column: str | None = "short_caption",
        id_column: str | None = "id",
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        image_root: str | os.PathLike | None = None,
        rank: int = 0,
        world_size: int = 1,
        passthrough: Sequence[str] = (),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.records = records
        self.transform = transform
        self.columns = RecordColumns(image_column, caption_column, short_caption_column, id_column)
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.image_root = image_root
        self.rank = rank
        self.world_size = world_size
        self.passthrough = tuple(passthrough)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the source (a shuffled `datasets.IterableDataset` reshuffles per epoch)."""
        self.epoch = epoch
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def _indexed_records(self) -> Iterator[tuple[Any, Any, Mapping[str, Any]]]:
        """``(index, default id, record)`` for this (rank, worker)'s shard."""
        worker, num_workers = shard_position()
        shard, num_shards = self.rank * num_workers + worker, self.world_size * num_workers
        records = self.records
        if _is_hf_iterable(records):
            from datasets.distributed import split_dataset_by_node

            # datasets shards by worker itself inside DataLoader workers; we only split by process.
            if self.world_size > 1:
                records = split_dataset_by_node(records, rank=self.rank, world_size=self.world_size)
            for position, record in enumerate(records):
                yield position, f"{self.rank}-{worker}-{position}", record
            return
        if isinstance(records, Sequence) or _is_map_style(records):
            for index in range(shard, len(records), num_shards):
                yield index, index, records[index]
            return
        if callable(records):
            records = records()
        for index, record in itertools.islice(enumerate(records), shard, None, num_shards):
            yield index, index, record

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        for index, default_id, record in self._indexed_records():
            sample = prepare_sample(
                record, index, self.transform, self.columns, self.max_image_pixels, self.image_root, default_id,
                passthrough=self.passthrough,
            )
            if self.strict and isinstance(sample, SkippedSample):
                raise BadSampleError.from_skipped(sample)
            yield sample


def _is_map_style(records: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(records, datasets.Dataset)


class SkipCounter:
    """Accumulates ``{reason: count}`` dicts (the ``skipped`` entry of batches) over a run.

    Example:

    ```python
    >>> counter = SkipCounter()
    >>> counter.update({"corrupt": 2})
    >>> counter.update({"empty_caption": 1})
    >>> counter.summary()
    'skipped 3 samples: corrupt=2, empty_caption=1'
    ```
    """

    def __init__(self, counts: Mapping[str, int] | None = None):
        self._counts: Counter[str] = Counter()
        self.update(counts)

    def update(self, counts: Mapping[str, int] | None) -> None:
        """Add the counts of one batch (or of another counter's `as_dict`); `None` is a no-op."""
        for reason, count in (counts or {}).items():
            if count:
                self._counts[reason] += int(count)

    def reset(self) -> None:
        """Forget every count (e.g. after handing them to another process's counter)."""
        self._counts.clear()

    @property
    def total(self) -> int:
        """Samples skipped so far."""
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts per reason, sorted by reason (plain ints: safe to log or to gather across processes)."""
        return {reason: self._counts[reason] for reason in sorted(self._counts)}

    def summary(self) -> str:
        """One line for the log, e.g. ``"skipped 3 samples: corrupt=2, empty_caption=1"``."""
        total = self.total
        noun = "sample" if total == 1 else "samples"
        if not total:
            return "skipped 0 samples"
        return f"skipped {total} {noun}: " + ", ".join(f"{reason}={count}" for reason, count in self.as_dict().items())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


class SkipCountingCollator:
    """Wrap a variant collator: drop `SkippedSample` entries, collate the rest, report the dropped ones.

    The batch gets ``batch["skipped"] = {reason: count}`` (a plain dict, possibly empty): pop it before calling the
    model. When every example of a batch is bad the result is ``{"skipped": {...}}`` with no tensors; the trainer
    should skip that step. (Batches can therefore be smaller than the batch size; the contrastive losses handle any
    size >= 1.)

    Args:
        collator: the variant's collator (e.g. `LongCLIPCollator`).
    """

    def __init__(self, collator: Callable[[list[Mapping[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        good = [example for example in examples if not isinstance(example, SkippedSample)]
        skipped = dict(sorted(Counter(e.reason for e in examples if isinstance(e, SkippedSample)).items()))
        if not good:
            return {"skipped": skipped}
        batch = dict(self.collator(good))
        batch["skipped"] = skipped
        return batch

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped collator's attributes (``processor``, ...) for code that inspects the collator.
        # `collator` itself and dunders (looked up by pickle before __dict__ is restored) must not recurse.
        if name == "collator" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.collator, name)


@dataclass
class ValidationReport:
    """What `validate_records` found.

    Args:
        total (`int`): records checked.
        bad (`dict[str, int]`): counts per reason.
        examples (`list[SkippedSample]`): the first few bad records, for the log.
    """

    total: int
    bad: dict[str, int] = field(default_factory=dict)
    examples: list[SkippedSample] = field(default_factory=list)

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        """E.g. ``"1000 records, 3 bad: missing=2, empty_caption=1"``."""
        if not self.num_bad:
            return f"{self.total} records, none bad"
        parts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad.items()))
        return f"{self.total} records, {self.num_bad} bad: {parts}"


def validate_records(
    records: Iterable[Mapping[str, Any]],
    strict: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    check_files: bool = True,
    image_root: str | os.PathLike | None = None,
    max_examples: int = 10,
) -> ValidationReport:
    """Cheap up-front check of records, without decoding images: captions are non-empty strings, image files exist
    and are not empty. Run at start-up so ``--strict`` fails before training, not hours in.

    Args:
        records: the records: a list of mappings, or a `datasets.Dataset` (its caption column is read in one go; its
            images are checked only when they are path strings).
        strict (`bool`, defaults to `False`): raise `BadSampleError` on the first bad record; otherwise only count.
        image_column / caption_column (`str`): record keys.
        check_files (`bool`, defaults to `True`): stat each image path (one ``stat`` per record: on a slow network
            filesystem with millions of files, consider `False`).
        image_root (*optional*): as in `LongCaptionDataset`.
        max_examples (`int`, defaults to 10): bad records kept in the report.

    Returns:
        `ValidationReport`.
    """
    report_counts: Counter[str] = Counter()
    examples: list[SkippedSample] = []
    total = 0
    for index, (image, caption, check_image) in enumerate(_image_caption_pairs(records, image_column, caption_column)):
        total += 1
        source = resolve_image_path(image, image_root)
        _, reason = check_caption(caption)
        if reason is None and check_files and check_image:
            reason = image_source_exists(source)
        if reason is None:
            continue
        bad = SkippedSample(index, reason, describe_image_source(source))
        if strict:
            raise BadSampleError.from_skipped(bad)
        report_counts[reason] += 1
        if len(examples) < max_examples:
            examples.append(bad)
    return ValidationReport(total, dict(sorted(report_counts.items())), examples)


def _image_caption_pairs(records: Any, image_column: str, caption_column: str) -> Iterator[tuple[Any, Any, bool]]:
    """``(image, caption, whether to check the image)`` per record.

    A `datasets.Dataset` is read column-wise (row access would fetch every column), and its images are checked only
    when they are path strings: embedded image bytes would mean reading the whole dataset, and `load_image` catches
    bad ones at training time anyway.
    """
    if _is_map_style(records):
        import datasets

        captions = records[caption_column]
        if isinstance(records.features.get(image_column), datasets.Value):
            yield from ((image, caption, True) for image, caption in zip(records[image_column], captions))
        else:
            yield from ((None, caption, False) for caption in captions)
        return
    if _is_hf_iterable(records):
        raise TypeError("validate_records would consume a streamed dataset; validate a list or a datasets.Dataset")
    for record in records:
        yield record.get(image_column), record.get(caption_column), True


class _SeedWorker:
    """``worker_init_fn``: seed `random` and `numpy` in each worker from torch's per-worker seed.

    torch gives worker ``i`` the seed ``base + i``, where ``base`` is drawn from the DataLoader's generator at the
    start of every epoch: so worker seeds follow from `make_dataloader`'s `seed`, differ between workers, and
    differ between epochs (a fixed ``seed + worker_id`` would repeat the same augmentations every epoch). `rank`
    is mixed in so processes of a distributed run do not draw identical crops.
    """

    def __init__(self, rank: int = 0):
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        seed = (torch.initial_seed() + 1_000_003 * self.rank) % 2**32
        random.seed(seed)
        np.random.seed(seed)


def make_dataloader(
    dataset: Dataset | IterableDataset,
    collator: Callable[[list[Any]], dict[str, Any]],
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = True,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling and worker RNGs follow from `seed`.

    Args:
        dataset: a map-style or iterable dataset (for an iterable one `shuffle` is ignored: the stream's order is
            the source's).
        collator: e.g. ``SkipCountingCollator(LongCLIPCollator(processor))``.
        batch_size (`int`): examples per batch, before bad ones are dropped.
        shuffle (`bool`, defaults to `True`): reshuffle every epoch with a generator seeded by `seed`.
        num_workers (`int`, defaults to 0): worker processes.
        seed (`int`, defaults to 0): the same seed gives the same order and the same worker RNG streams.
        drop_last (`bool`, defaults to `True`): drop the incomplete last batch (contrastive losses prefer full ones).
        persistent_workers (`bool`, *optional*): keep workers between epochs; defaults to ``num_workers > 0``.
        prefetch_factor (`int`, *optional*): batches prefetched per worker (torch's default when `None`).
        rank (`int`, defaults to 0): the process index, mixed into worker seeds (not into the shuffle order).

    Returns:
        `torch.utils.data.DataLoader`; ``pin_memory`` is on only when CUDA is available.
    """
    iterable = isinstance(dataset, IterableDataset)
    if iterable and shuffle:
        logger.info("make_dataloader: shuffle ignored for an iterable dataset (shuffle the source instead)")
        shuffle = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collator,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_SeedWorker(rank),
        generator=generator,
        **kwargs,
    )


__all__ = [
    "CAPTION_REASONS",
    "BadSampleError",
    "IterableLongCaptionDataset",
    "LongCaptionDataset",
    "RecordColumns",
    "SkipCounter",
    "SkipCountingCollator",
    "SkippedSample",
    "ValidationReport",
    "check_caption",
    "make_dataloader",
    "prepare_sample",
    "shard_position",
    "validate_records",
]
