"""Torch datasets over caption records that skip bad samples and count them, and a seeded DataLoader.

A bad sample (an unreadable image, an empty or non-string caption, an unusable id, a malformed line of the source
file) becomes a `SkippedSample` instead of an exception; `SkipCountingCollator` drops those from the batch and
reports ``batch["skipped"] = {reason: [sample key, ...]}``, which the trainer pops, accumulates in a `SkipCounter`
(distinct samples and visits per reason) and logs. With ``strict=True`` the dataset marks its bad samples as strict
failures instead, and `SkipCountingCollator` turns a batch holding one into ``{"skipped": ..., "strict_error":
"bad sample at index ... (image ...): reason"}``: the same one line whether or not DataLoader workers are used (an
exception raised inside a worker would come back wrapped in torch's multi-line re-raise). The training loop raises
``ValueError(batch["strict_error"])``.
"""

from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..text.sentences import first_sentence, normalise_caption
from .images import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImageError,
    describe_image_source,
    image_source_exists,
    load_image,
)
from .sources import READ_ERROR_KEY, generated_id_base, resolve_image_path

logger = logging.getLogger(__name__)

#: Caption problems, next to the image reasons of `BAD_IMAGE_REASONS`.
CAPTION_REASONS = ("empty_caption", "non_string_caption")

#: Record problems: ``bad_record`` (a line of the source file that could not be read, see `READ_ERROR_KEY`) and
#: ``invalid_id`` (an id that is neither an integer nor a string).
RECORD_REASONS = ("bad_record", "invalid_id")

_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder a dataset returns for a bad sample (picklable, so it crosses DataLoader workers).

    Args:
        index: the record's index (map-style) or position in the shard's stream (iterable).
        reason (`str`): a `BadImageError` reason, one of `CAPTION_REASONS` or one of `RECORD_REASONS`.
        source (`str`): the image source, described (a path, or ``<N bytes>``).
        detail (`str`): a human-readable explanation.
        key (*optional*): what identifies the sample for counting distinct bad samples (`SkipCounter`); `index`
            when `None`. Streams whose positions are not unique set it (the record's id, or rank-worker-position).
        strict (`bool`): the dataset runs in strict mode: this sample must stop training
            (`SkipCountingCollator` reports it as ``batch["strict_error"]``).
    """

    index: Any
    reason: str
    source: str = ""
    detail: str = ""
    key: Any = None
    strict: bool = False

    @property
    def sample_key(self) -> Any:
        """The key distinct bad samples are counted by: `key`, else `index`."""
        return self.index if self.key is None else self.key

    def message(self) -> str:
        """The one-line strict-mode message: ``bad sample at index 17 (image /data/empty.png): empty``."""
        return str(BadSampleError.from_skipped(self))


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


def normalise_record_id(value: Any) -> tuple[Any, str | None]:
    """``(id, None)`` for a usable record id, ``(None, None)`` for a missing one, ``(None, "invalid_id")`` otherwise.

    Usable: an integer in the 64-bit range (NumPy integers and integral floats such as ``7.0`` become `int`), or a
    non-empty string (FineLIP hashes strings, see `stable_image_id`). Missing: `None`, NaN (how pandas writes a
    missing number) and empty or whitespace-only strings; the dataset then generates the id. Anything else (a bool,
    ``1.5``, a list, a dict, bytes, an integer beyond 64 bits) is invalid: the sample is skipped and counted.
    """
    if value is None:
        return None, None
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, None)
    if isinstance(value, (bool, np.bool_)):
        return None, "invalid_id"
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return None, None
        if not math.isfinite(value) or not value.is_integer():
            return None, "invalid_id"
        value = int(value)
    else:
        return None, "invalid_id"
    if not _INT64[0] <= value <= _INT64[1]:
        return None, "invalid_id"
    return value, None


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
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
) -> dict[str, Any] | SkippedSample:
    """Turn one record into a training example, or a `SkippedSample` if its data is bad.

    Cheap checks come first: a record the reader could not parse (`READ_ERROR_KEY`, reason ``bad_record``), the
    caption, the id (`normalise_record_id`, reason ``invalid_id``); then the image is loaded with `load_image` and
    transformed. The short caption is the record's own when it is a non-empty string, else the long caption's first
    sentence. `default_id` is the id of a record without one.

    `passthrough` names record keys copied into the example as they are (e.g. beta-CLIP's parsed ``sentences`` /
    ``phrases``). `rng`, when given, is passed to the transform (``transform(image, rng=rng)``) so random
    augmentations can be a function of the sample rather than of a shared RNG stream.

    Returns:
        ``{"pixel_values", "caption", "short_caption", "id"}`` (``"image"``, a PIL image, instead of
        ``"pixel_values"`` when `transform` is `None`: the collator then runs the processor), or a `SkippedSample`.
    """
    if not isinstance(record, Mapping):
        return SkippedSample(index, "bad_record", "", f"record is {type(record).__name__}, not a mapping")
    image_source = record.get(columns.image)
    read_error = record.get(READ_ERROR_KEY)
    if read_error:
        return SkippedSample(index, "bad_record", describe_image_source(image_source), str(read_error))
    caption, reason = check_caption(record.get(columns.caption))
    if reason is not None:
        detail = f"caption is {record.get(columns.caption)!r:.60}"
        return SkippedSample(index, reason, describe_image_source(image_source), detail)
    raw_id = record.get(columns.id) if columns.id else None
    ident, reason = normalise_record_id(raw_id)
    if reason is not None:
        return SkippedSample(index, reason, describe_image_source(image_source), f"id is {raw_id!r:.60}")
    image_source = resolve_image_path(image_source, image_root)
    try:
        image = load_image(image_source, max_image_pixels=max_image_pixels, max_image_bytes=max_image_bytes)
    except BadImageError as error:
        return SkippedSample(index, error.reason, describe_image_source(image_source), error.detail)
    short = record.get(columns.short_caption) if columns.short_caption else None
    short = normalise_caption(short) if isinstance(short, str) else ""
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
        records: a sequence of mappings (e.g. from `read_sharegpt4v`; a memory-mapped `RecordIndex` from
            `hf_longclip.data.index`) or a `datasets.Dataset`.
        transform (*optional*): PIL image -> ``(3, H, W)`` tensor (see `transforms`); `None` returns the PIL image
            as ``"image"`` for the collator's processor.
        image_column / caption_column / short_caption_column / id_column (`str`): record keys. Without an id the
            record's index is its id (what FineLIP's duplicate-image mask uses), shifted past the largest integer id
            of the records that have one, so a generated id never equals an explicit one.
        strict (`bool`, defaults to `False`): a bad sample comes back as a `SkippedSample` with ``strict=True``,
            which `SkipCountingCollator` turns into ``batch["strict_error"]`` (the training loop then stops with that
            one line). Nothing is raised inside `__getitem__`, so DataLoader workers do not wrap the message.
        max_image_pixels (`int`, *optional*): see `load_image`.
        max_image_bytes (`int`, *optional*, defaults to 256 MiB): see `load_image`.
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
        max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    ):
        self.records = records
        self.transform = transform
        self.columns = RecordColumns(image_column, caption_column, short_caption_column, id_column)
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.image_root = image_root
        self.passthrough = tuple(passthrough)
        self.seed = seed
        self.epoch = 0
        self._id_base: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the per-sample augmentation RNG (with `seed`); set it before creating each epoch's iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def generated_id(self, index: int) -> int:
        """The id of record `index` when it has none: the index, shifted past every integer id in the records (the
        records are scanned once, at the first record without an id)."""
        if self._id_base is None:
            self._id_base = _records_id_base(self.records, self.columns.id)
        return self._id_base + index

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        index = int(index)
        record = self.records[index]
        sample = prepare_sample(
            record,
            index,
            self.transform,
            self.columns,
            self.max_image_pixels,
            self.image_root,
            default_id=None if _has_id(record, self.columns.id) else self.generated_id(index),
            passthrough=self.passthrough,
            rng=None if self.seed is None else sample_rng(self.seed, self.epoch, index),
            max_image_bytes=self.max_image_bytes,
        )
        if self.strict and isinstance(sample, SkippedSample):
            return replace(sample, strict=True)
        return sample


def _has_id(record: Any, id_column: str | None) -> bool:
    """Whether `record` states an id (a valid or an invalid one: only records without any get a generated id)."""
    if id_column is None or not isinstance(record, Mapping):
        return False
    return normalise_record_id(record.get(id_column)) != (None, None)


def _records_id_base(records: Any, id_column: str | None) -> int:
    """`generated_id_base` of a record collection's id column (0 without one)."""
    if id_column is None:
        return 0
    if _is_map_style(records):
        return generated_id_base(records[id_column]) if id_column in records.column_names else 0
    return generated_id_base(r.get(id_column) for r in records if isinstance(r, Mapping))


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
      nothing else; the index is the default id (shifted past the largest integer id, as in `LongCaptionDataset`).
    * A `datasets.IterableDataset` is split across processes with `datasets.distributed.split_dataset_by_node`,
      and `datasets` itself then splits it across DataLoader workers by shard files (it does so whenever it is
      iterated inside a worker). Workers beyond the dataset's ``num_shards`` get no data, so keep
      ``num_workers <= dataset.num_shards / world_size``. Rows without an id get ``"<rank>-<worker>-<n>"``.
    * Any other iterable (or a zero-argument callable returning one, re-called every epoch) is read by every shard,
      which keeps every ``n``-th record; its position in the stream is the default id. A stream cannot be scanned
      ahead, so give every streamed record an id, or none, to keep generated ids apart from explicit ones.

    Do not pass the DataLoader over this dataset through ``accelerator.prepare``: Accelerate would shard it a second
    time (``IterableDatasetShard``) or dispatch batches from rank 0. Move batches to the device yourself.

    Args:
        records: see above.
        transform / columns / strict / max_image_pixels / max_image_bytes / image_root: as in
            `LongCaptionDataset` (strict: bad samples come back marked, for `SkipCountingCollator`).
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
        max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.records = records
        self.transform = transform
        self.columns = RecordColumns(image_column, caption_column, short_caption_column, id_column)
        self.strict = strict
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.image_root = image_root
        self.rank = rank
        self.world_size = world_size
        self.passthrough = tuple(passthrough)
        self.epoch = 0
        self._id_base: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the source (a shuffled `datasets.IterableDataset` reshuffles per epoch)."""
        self.epoch = epoch
        if hasattr(self.records, "set_epoch"):
            self.records.set_epoch(epoch)

    def skip_batches(self, count: int, batch_size: int) -> None:
        """The reader of the next iterator drops its first `count` batches (resuming inside an epoch). Nothing to
        prepare here: they are read in full. (`shards.TarShardDataset` skips them without decoding.)"""

    def _indexed_records(self) -> Iterator[tuple[Any, Any, Mapping[str, Any], bool]]:
        """``(index, default id, record, whether index is unique)`` for this (rank, worker)'s shard."""
        worker, num_workers = shard_position()
        shard, num_shards = self.rank * num_workers + worker, self.world_size * num_workers
        records = self.records
        if _is_hf_iterable(records):
            from datasets.distributed import split_dataset_by_node

            # datasets shards by worker itself inside DataLoader workers; we only split by process.
            if self.world_size > 1:
                records = split_dataset_by_node(records, rank=self.rank, world_size=self.world_size)
            for position, record in enumerate(records):
                yield position, f"{self.rank}-{worker}-{position}", record, False
            return
        if isinstance(records, Sequence) or _is_map_style(records):
            for index in range(shard, len(records), num_shards):
                record = records[index]
                if _has_id(record, self.columns.id):
                    yield index, None, record, True
                    continue
                if self._id_base is None:  # scanned once per process, at the first record without an id
                    self._id_base = _records_id_base(records, self.columns.id)
                yield index, self._id_base + index, record, True
            return
        if callable(records):
            records = records()
        for index, record in itertools.islice(enumerate(records), shard, None, num_shards):
            yield index, index, record, True

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        for index, default_id, record, unique in self._indexed_records():
            sample = prepare_sample(
                record, index, self.transform, self.columns, self.max_image_pixels, self.image_root, default_id,
                passthrough=self.passthrough, max_image_bytes=self.max_image_bytes,
            )
            if isinstance(sample, SkippedSample):
                if not unique:  # positions restart in every worker: count the record by its id instead
                    ident = record.get(self.columns.id) if self.columns.id and isinstance(record, Mapping) else None
                    ident = normalise_record_id(ident)[0]
                    sample = replace(sample, key=default_id if ident is None else ident)
                if self.strict:
                    sample = replace(sample, strict=True)
            yield sample


def _is_map_style(records: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(records, datasets.Dataset)


def _counter_key(key: Any) -> int | str:
    """A sample key as JSON keeps it: an int (NumPy integers too) or a string (anything else, bools included, as
    its ``str``)."""
    if isinstance(key, numbers.Integral) and not isinstance(key, (bool, np.bool_)):
        return int(key)
    return key if isinstance(key, str) else str(key)


def _key_order(key: int | str) -> tuple[bool, Any]:
    return isinstance(key, str), key


class SkipCounter:
    """Counts skipped samples over a run: distinct bad samples and visits (reads of them), per reason.

    A bad record read once per epoch for two epochs is one distinct sample and two visits. Samples are told apart by
    the keys `SkipCountingCollator` reports in ``batch["skipped"]`` (the dataset index; for a stream, the record's
    id), so counters of several processes merge exactly (a union of keys).

    `update` accepts three forms, per reason:

    * a list of sample keys, one per visit: what ``batch["skipped"]`` holds;
    * ``{"samples": [keys], "visits": n, "unidentified": m}``: what `as_dict` returns (checkpoints, other processes);
    * a plain count ``n``: the format of older checkpoints, n visits of samples whose keys are unknown (counted as n
      distinct samples: the best that can be said).

    Example:

    ```python
    >>> counter = SkipCounter()
    >>> counter.update({"corrupt": [3, 8]})
    >>> counter.update({"corrupt": [3], "empty_caption": [5]})
    >>> counter.summary()
    'skipped 3 distinct samples (4 visits): corrupt 2 (3 visits), empty_caption 1 (1 visit)'
    >>> SkipCounter(counter.as_dict()).as_dict() == counter.as_dict()
    True
    ```
    """

    def __init__(self, counts: Mapping[str, Any] | None = None):
        self._samples: dict[str, set[int | str]] = {}
        self._visits: Counter[str] = Counter()
        self._unidentified: Counter[str] = Counter()
        self.update(counts)

    def update(self, counts: Mapping[str, Any] | None) -> None:
        """Add one batch's ``skipped`` entry, another counter's `as_dict`, or an old ``{reason: count}`` dict;
        `None` is a no-op."""
        for reason, value in (counts or {}).items():
            reason = str(reason)
            if isinstance(value, Mapping):
                keys = [_counter_key(k) for k in value.get("samples") or ()]
                visits = int(value.get("visits", len(keys)))
                unidentified = int(value.get("unidentified", 0))
            elif isinstance(value, (list, tuple, set, frozenset)):
                keys = [_counter_key(k) for k in value]
                visits, unidentified = len(keys), 0
            elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
                keys, visits, unidentified = [], int(value), int(value)
            else:
                raise TypeError(f"skip counts for {reason!r}: expected keys, a count or a mapping, got {value!r:.80}")
            if visits < 0 or unidentified < 0:
                raise ValueError(f"skip counts for {reason!r} are negative: {value!r:.80}")
            if not (keys or visits or unidentified):
                continue
            self._samples.setdefault(reason, set()).update(keys)
            self._visits[reason] += visits
            self._unidentified[reason] += unidentified

    def reset(self) -> None:
        """Forget everything (e.g. after handing the counts to another process's counter)."""
        self._samples.clear()
        self._visits.clear()
        self._unidentified.clear()

    def _reasons(self) -> list[str]:
        return sorted(set(self._samples) | set(self._visits))

    @property
    def total(self) -> int:
        """Distinct samples skipped so far (however often each was read)."""
        keys = set().union(*self._samples.values()) if self._samples else set()
        return len(keys) + sum(self._unidentified.values())

    @property
    def visits(self) -> int:
        """Skips so far, counting every read of a bad sample (one per epoch it was drawn in)."""
        return sum(self._visits.values())

    def samples_by_reason(self) -> dict[str, int]:
        """Distinct samples per reason, sorted by reason."""
        return {r: len(self._samples.get(r, ())) + self._unidentified[r] for r in self._reasons()}

    def visits_by_reason(self) -> dict[str, int]:
        """Visits per reason, sorted by reason."""
        return {r: self._visits[r] for r in self._reasons()}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Everything counted, as plain JSON-able data: ``{reason: {"samples": [sorted keys], "visits": n}}`` (plus
        ``"unidentified": m`` where old-format counts were loaded). `SkipCounter(as_dict())` rebuilds the counter,
        and `update(as_dict())` of another process's counter merges it."""
        result = {}
        for reason in self._reasons():
            entry: dict[str, Any] = {
                "samples": sorted(self._samples.get(reason, ()), key=_key_order),
                "visits": self._visits[reason],
            }
            if self._unidentified[reason]:
                entry["unidentified"] = self._unidentified[reason]
            result[reason] = entry
        return result

    def summary(self) -> str:
        """One line for the log, e.g. ``"skipped 20 distinct samples (32 visits): corrupt 2 (4 visits), ..."``."""
        total = self.total
        if not total and not self.visits:
            return "skipped 0 samples"
        visits = self.visits_by_reason()
        parts = ", ".join(
            f"{reason} {count} ({_plural(visits[reason], 'visit')})"
            for reason, count in self.samples_by_reason().items()
        )
        noun = "sample" if total == 1 else "samples"
        return f"skipped {total} distinct {noun} ({_plural(self.visits, 'visit')}): {parts}"

    def __repr__(self) -> str:
        return f"SkipCounter(samples={self.samples_by_reason()}, visits={self.visits_by_reason()})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class SkipCountingCollator:
    """Wrap a variant collator: drop `SkippedSample` entries, collate the rest, report the dropped ones.

    The batch gets ``batch["skipped"] = {reason: [sample key, ...]}`` (plain data, possibly empty; one key per bad
    sample of the batch, the dataset index unless the dataset set another key): pop it before calling the model and
    feed it to `SkipCounter.update`. When every example of a batch is bad the result is ``{"skipped": {...}}`` with
    no tensors; the trainer should skip that step. (Batches can therefore be smaller than the batch size; the
    contrastive losses handle any size >= 1.)

    When a skipped sample comes from a strict dataset (``SkippedSample.strict``), the batch is not collated: the
    result is ``{"skipped": {...}, "strict_error": "bad sample at index 17 (image /data/empty.png): empty"}``, the
    first strict sample's one-line message (`SkippedSample.message`), whether the batch was built in the main
    process or in a DataLoader worker. The training loop must check ``batch.get("strict_error")`` first and stop.

    Args:
        collator: the variant's collator (e.g. `LongCLIPCollator`).
    """

    def __init__(self, collator: Callable[[list[Mapping[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        good: list[Any] = []
        skipped: dict[str, list[Any]] = {}
        strict_error = None
        for example in examples:
            if not isinstance(example, SkippedSample):
                good.append(example)
                continue
            skipped.setdefault(example.reason, []).append(example.sample_key)
            if example.strict and strict_error is None:
                strict_error = example.message()
        skipped = dict(sorted(skipped.items()))
        if strict_error is not None:
            return {"skipped": skipped, "strict_error": strict_error}
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
        checked_files (`bool`): whether image files were checked (exist, are regular files, are not empty), or
            only captions, ids and unreadable lines.
    """

    total: int
    bad: dict[str, int] = field(default_factory=dict)
    examples: list[SkippedSample] = field(default_factory=list)
    checked_files: bool = True

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def summary(self) -> str:
        """What was checked and what was found, e.g. ``"checked 1000 records (captions only; image files and
        contents are checked as they are read): 3 bad: empty_caption=1, missing=2"``."""
        if self.checked_files:
            scope = ("captions; image files exist, are regular files and are not empty; image contents are checked "
                     "as they are read")
        else:
            scope = "captions only; image files and contents are checked as they are read"
        head = f"checked {self.total} {'record' if self.total == 1 else 'records'} ({scope})"
        if not self.num_bad:
            return f"{head}: none bad"
        parts = ", ".join(f"{reason}={count}" for reason, count in sorted(self.bad.items()))
        return f"{head}: {self.num_bad} bad: {parts}"


def validate_records(
    records: Iterable[Mapping[str, Any]],
    strict: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    check_files: bool = True,
    image_root: str | os.PathLike | None = None,
    max_examples: int = 10,
    id_column: str | None = "id",
    max_image_bytes: int | None = None,
) -> ValidationReport:
    """Cheap up-front check of records, without decoding images: lines the reader could not parse
    (``bad_record``), captions are non-empty strings, ids are integers or strings, and (with `check_files`) image
    files exist, are regular files and are not empty. Run at start-up so ``--strict`` fails before training, not
    hours in. Image contents (corrupt, truncated, too many pixels) are only checked as images are read in training.

    Args:
        records: the records: a list of mappings, or a `datasets.Dataset` (its caption column is read in one go; its
            images are checked only when they are path strings).
        strict (`bool`, defaults to `False`): raise `BadSampleError` on the first bad record; otherwise only count.
        image_column / caption_column / id_column (`str`): record keys.
        check_files (`bool`, defaults to `True`): stat each image path (one ``stat`` per record, nothing opened: a
            FIFO or device is reported as ``not_a_file`` without blocking; on a slow network filesystem with
            millions of files, consider `False`).
        image_root (*optional*): as in `LongCaptionDataset`.
        max_examples (`int`, defaults to 10): bad records kept in the report.
        max_image_bytes (`int`, *optional*): with `check_files`, also report files larger than this as
            ``too_large`` (pass the dataset's limit).

    Returns:
        `ValidationReport`.
    """
    from .index import is_record_index

    if is_record_index(records) and (image_column, caption_column, id_column) == ("image", "caption", "id"):
        # reads no record without check_files: the index judged lines, captions and ids when it was built
        return records.validate(strict, check_files, image_root, max_examples, max_image_bytes)
    report_counts: Counter[str] = Counter()
    examples: list[SkippedSample] = []
    total = 0
    pairs = _image_caption_pairs(records, image_column, caption_column, id_column)
    for index, (image, caption, check_image, ident, read_error) in enumerate(pairs):
        total += 1
        source = resolve_image_path(image, image_root)
        reason = "bad_record" if read_error else None
        if reason is None:
            _, reason = check_caption(caption)
        if reason is None:
            _, reason = normalise_record_id(ident)
        if reason is None and check_files and check_image:
            reason = image_source_exists(source, max_image_bytes)
        if reason is None:
            continue
        bad = SkippedSample(index, reason, describe_image_source(source), str(read_error) if read_error else "")
        if strict:
            raise BadSampleError.from_skipped(bad)
        report_counts[reason] += 1
        if len(examples) < max_examples:
            examples.append(bad)
    return ValidationReport(total, dict(sorted(report_counts.items())), examples, checked_files=check_files)


def _image_caption_pairs(
    records: Any, image_column: str, caption_column: str, id_column: str | None = None
) -> Iterator[tuple[Any, Any, bool, Any, Any]]:
    """``(image, caption, whether to check the image, id, read error)`` per record.

    A `datasets.Dataset` is read column-wise (row access would fetch every column), and its images are checked only
    when they are path strings: embedded image bytes would mean reading the whole dataset, and `load_image` catches
    bad ones at training time anyway.
    """
    if _is_map_style(records):
        import datasets

        captions = records[caption_column]
        columns = records.column_names
        ids = records[id_column] if id_column and id_column in columns else itertools.repeat(None)
        errors = records[READ_ERROR_KEY] if READ_ERROR_KEY in columns else itertools.repeat(None)
        if isinstance(records.features.get(image_column), datasets.Value):
            images, check = records[image_column], True
        else:
            images, check = itertools.repeat(None), False
        for image, caption, ident, error in zip(images, captions, ids, errors):
            yield image, caption, check, ident, error
        return
    if _is_hf_iterable(records):
        raise TypeError("validate_records would consume a streamed dataset; validate a list or a datasets.Dataset")
    for record in records:
        if not isinstance(record, Mapping):
            yield None, None, False, None, f"record is {type(record).__name__}, not a mapping"
            continue
        ident = record.get(id_column) if id_column else None
        yield record.get(image_column), record.get(caption_column), True, ident, record.get(READ_ERROR_KEY)


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
    "RECORD_REASONS",
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
    "normalise_record_id",
    "prepare_sample",
    "shard_position",
    "validate_records",
]
