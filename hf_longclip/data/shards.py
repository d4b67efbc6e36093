"""webdataset tar shards as a training source (`TarShardSource`, `TarShardDataset`) and the writer behind
``hf-longclip make-shards`` (`write_shards`, `make_shards`).

A shard is a tar file whose members are grouped into samples by key (``<key>.jpg`` + ``<key>.txt`` / ``<key>.json``).
Shards are split over (process, DataLoader worker) slots, shuffled with a seeded buffer, and a resumed iterator skips
the samples an interrupted run had consumed without decoding them. See docs/data.md (webdataset shards).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ..text.hierarchy import HIERARCHY_FIELDS
from .dataset import (
    SkippedSample,
    check_caption,
    normalise_record_id,
    prepare_sample,
    shard_position,
)
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, BadImageError, _read_source
from .sources import READ_ERROR_KEY

logger = logging.getLogger(__name__)

#: Image member extensions, in the order one is picked when a sample holds several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

#: Reasons a shard sample is skipped (next to those of `prepare_sample`): a caption without an image member, an
#: image without a ``.txt`` / ``.json`` caption, and a shard that cannot be opened or ends early (truncated).
SHARD_REASONS = ("missing_image", "missing_caption", "bad_shard")

#: Reason of the placeholders a resumed iterator yields for the samples it skips without decoding. They only fill
#: batches that the trainer reads and drops when it resumes inside an epoch (`TarShardDataset.skip_batches`).
FAST_FORWARD = "fast_forward"

#: Samples each DataLoader worker holds in its shuffle buffer by default.
DEFAULT_SHUFFLE_BUFFER = 1000

_TAR_SUFFIX = re.compile(r"\.(tar|tgz|tar\.gz)$", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_SHARD_NAME = re.compile(r"^\d{5,}\.tar$")
_PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


# ----------------------------------------------------------------------------------------------- shard names
def looks_like_shards(path: str | os.PathLike) -> bool:
    """Whether a ``--train_data`` value names webdataset shards: a ``pipe:`` command, or a path / URL (brace ranges
    and ``::``-joined lists included) ending in ``.tar``, ``.tgz`` or ``.tar.gz``."""
    text = os.fspath(path).strip()
    if text.startswith("pipe:"):
        return True
    parts = [part.strip() for part in text.split("::") if part.strip()]
    return bool(parts) and all(_TAR_SUFFIX.search(re.sub(r"[?#].*$", "", part)) for part in parts)


def _is_local(url: str) -> bool:
    return url.startswith("file:") or not _SCHEME.match(url) or (len(url) > 1 and url[1] == ":")  # C:\... paths


def _local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def expand_shard_spec(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """The shard URLs a spec names, in order.

    Accepts a list of URLs, a folder (its ``*.tar`` / ``*.tar.gz`` / ``*.tgz`` files, sorted), or a string that
    webdataset expands: brace ranges (``shards/{00000..00099}.tar``), ``::``-joined lists, ``pipe:`` commands and
    URLs. Raises `ValueError` when the spec names nothing, or names local files of which some do not exist (the
    message lists them: a wrong brace range is a typo, not bad data).
    """
    if isinstance(spec, (list, tuple)):
        urls = [os.fspath(url) for url in spec]
        text = ", ".join(urls[:3]) + (" ..." if len(urls) > 3 else "")
    else:
        text = os.fspath(spec).strip()
        if os.path.isdir(text):
            urls = sorted(
                path for pattern in ("*.tar", "*.tar.gz", "*.tgz") for path in glob.glob(os.path.join(text, pattern))
            )
            if not urls:
                raise ValueError(f"{text}: a folder without .tar shards")
        else:
            from ..extras import require

            require("webdataset", "train", "reading webdataset shards")
            from webdataset.shardlists import expand_urls

            urls = expand_urls(text)
    if not urls:
        raise ValueError(f"{text!r} names no shard")
    missing = [url for url in urls if _is_local(url) and not os.path.exists(_local_path(url))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} of the {len(urls)} shards of {text!r} do not exist: {shown}")
    return urls


def open_shard(url: str):
    """A binary stream of one shard: local paths (and ``file:`` URLs) with `open`, anything else with webdataset's
    ``gopen`` (``pipe:``, ``http(s)://`` through curl, ...)."""
    if _is_local(url):
        return open(_local_path(url), "rb")
    from ..extras import require

    webdataset = require("webdataset", "train", "reading webdataset shards from URLs")
    return webdataset.gopen(url, "rb")


# ----------------------------------------------------------------------------------------------- reading a shard
def _split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000123.seg.png"`` -> ``("dir/000123", "seg.png")`` (webdataset's rule: the key ends at the first dot of
    the file name); None for names without an extension and hidden files."""
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _bad_shard(url: str, detail: str) -> SkippedSample:
    return SkippedSample(url, "bad_shard", url, detail)


def iter_shard(url: str, max_member_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[dict | SkippedSample]:
    """The samples of one shard, in order: ``{"__key__", "__url__", ext: bytes, ...}`` per group of consecutive
    members sharing a key.

    A shard that cannot be opened or read gives one ``bad_shard`` `SkippedSample` (after the samples read before the
    problem; the sample being read when the data ended is dropped, since its members may be incomplete). A shard
    that ends without tar's end-of-archive blocks (cut at a member boundary) counts as truncated too. A member larger
    than `max_member_bytes` is not read: its sample carries ``__too_large__`` and is skipped as ``too_large``.
    """
    try:
        stream = open_shard(url)
    except Exception as error:  # noqa: BLE001 - any failure to open is this shard's problem, reported with its name
        yield _bad_shard(url, f"cannot open: {error}")
        return
    current: dict[str, Any] | None = None
    problem = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = _split_member_name(info.name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and (key != current["__key__"] or ext in current):
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if max_member_bytes is not None and info.size > max_member_bytes:
                    current.setdefault("__too_large__", []).append(f"{info.name} ({info.size} bytes)")
                    continue  # a stream skips the unread data by itself
                current[ext] = tar.extractfile(info).read()
            # tar ends with zero blocks; a stream cut at a header (or at a member boundary) just stops: tell them apart
            read = getattr(tar.fileobj, "pos", None)
            if read is not None and read - tar.offset < tarfile.BLOCKSIZE:
                where = f"in sample {current['__key__']} (dropped)" if current else "at its start"
                problem = f"truncated {where}: no end-of-archive blocks"
                current = None
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as error:
        where = f"in sample {current['__key__']} (dropped)" if current else "before its first sample"
        problem = f"unreadable {where}: {error}"
        current = None
    finally:
        try:
            stream.close()  # a pipe: reports its command's exit status here
        except Exception as error:  # noqa: BLE001
            problem = problem or f"cannot be read to the end: {error}"
            current = None
    if current is not None:
        yield current
    if problem is not None:
        yield _bad_shard(url, problem)


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8-sig")


def _hierarchy(meta: Mapping[str, Any]) -> tuple[dict[str, list] | None, str | None]:
    """The beta-CLIP hierarchy of a ``.json`` member (under ``hierarchy``, or its fields at the top level)."""
    source = meta.get("hierarchy")
    if source is None:
        if not all(name in meta for name in HIERARCHY_FIELDS):
            return None, None
        source = meta
    if not isinstance(source, Mapping) or not all(isinstance(source.get(n), list) for n in HIERARCHY_FIELDS):
        return None, f"hierarchy is not a mapping of the lists {', '.join(HIERARCHY_FIELDS)}"
    lengths = {len(source[name]) for name in HIERARCHY_FIELDS[1:]}
    if len(lengths) != 1:
        return None, "hierarchy: phrases, phrase_sentence and phrase_kind differ in length"
    return {name: list(source[name]) for name in HIERARCHY_FIELDS}, None


def shard_record(sample: Mapping[str, Any]) -> dict[str, Any] | SkippedSample:
    """A sample of `iter_shard` as a training record ``{"image": bytes, "caption", "short_caption", "id",
    "__member__"}`` (plus beta-CLIP's hierarchy fields when the ``.json`` member has them), or a `SkippedSample`.

    The caption is the ``.json`` member's ``caption`` when it has one, else the ``.txt`` member. The ``.json`` member
    may also give ``short_caption``, ``id`` and ``hierarchy`` (`parse_hierarchies`' fields). A ``.json`` or ``.txt``
    member that is not UTF-8 / JSON is skipped as ``bad_record``.
    """
    key, url = sample["__key__"], sample["__url__"]
    where = f"{url}:{key}"
    if sample.get("__too_large__"):
        members = ", ".join(sample["__too_large__"])
        return SkippedSample(where, "too_large", where, f"member over the byte limit: {members}")
    meta: Any = {}
    try:
        if "json" in sample:
            meta = json.loads(_decode_text(sample["json"]))
        text = _decode_text(sample["txt"]) if "txt" in sample else None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return SkippedSample(where, "bad_record", where, f"unreadable .json / .txt member: {error}")
    if not isinstance(meta, Mapping):
        return SkippedSample(where, "bad_record", where, f".json member is {type(meta).__name__}, not an object")
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
    if image_ext is None:
        return SkippedSample(where, "missing_image", where, f"no image member (has {members or 'nothing'})")
    if "caption" not in meta and text is None:
        return SkippedSample(where, "missing_caption", where, f"no .txt or .json caption member (has {members})")
    hierarchy, problem = _hierarchy(meta)
    if problem:
        return SkippedSample(where, "bad_record", where, problem)
    record = {
        "image": sample[image_ext],
        "caption": meta["caption"] if "caption" in meta else text,
        "short_caption": meta.get("short_caption"),
        "id": meta.get("id"),
        "__member__": f"{key}.{image_ext}",
    }
    if hierarchy:
        record.update(hierarchy)
    return record


# ----------------------------------------------------------------------------------------------- the source
class TarShardSource:
    """webdataset shards as `open_training_source` returns them (format ``webdataset``): the expanded shard list.

    It has no length (a stream; the trainer needs ``max_steps``) and no rows to index. `dataset` builds the
    `TarShardDataset` the trainer reads; `records` reads every shard in order without decoding (for inspection).

    Args:
        spec: what `expand_shard_spec` takes (``"shards/{00000..00099}.tar"``, a folder, a list, ``pipe:...``).
    """

    def __init__(self, spec: str | os.PathLike | Sequence[str]):
        self.spec = spec if isinstance(spec, (list, tuple)) else os.fspath(spec)
        self.urls = expand_shard_spec(spec)

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.urls)} shards: {self.urls[0]} ...)"

    def take(self, count: int):
        raise ValueError(
            "max_train_samples cannot cut webdataset shards (their samples are split over processes and workers); "
            "train on fewer shards instead, e.g. shards/{00000..00009}.tar"
        )

    def __getitem__(self, item):
        # a ValueError (one line from the trainer), e.g. for shards given as --eval_data
        raise ValueError("webdataset shards are a training stream and cannot be indexed; give held-out data as a "
                         "JSONL/CSV/ShareGPT4V file")

    def records(self, max_member_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[dict | SkippedSample]:
        """Every sample of every shard, in shard order, as `shard_record` gives it (images stay encoded bytes)."""
        for url in self.urls:
            for item in iter_shard(url, max_member_bytes):
                yield item if isinstance(item, SkippedSample) else shard_record(item)

    def dataset(self, transform: Callable | None = None, **kwargs: Any) -> TarShardDataset:
        """`TarShardDataset` over these shards (keyword arguments as there)."""
        return TarShardDataset(self.urls, transform, **kwargs)


def _seeded_rng(*parts: Any) -> random.Random:
    """A `random.Random` seeded from `parts` (stable across processes and Python runs, unlike `hash`)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: hold `size` items, emit a random one for each new item, then the rest in random order."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class TarShardDataset(IterableDataset):
    r"""
    Training samples from webdataset shards, split over processes and DataLoader workers, shuffled, resumable.

    **Split.** Each epoch the shard list is permuted (seeded by `seed` and the epoch) and dealt to the
    ``world_size x num_workers`` (process, worker) slots: slot ``rank * num_workers + worker`` reads shards
    ``slot, slot + slots, ...`` of the permutation, so every sample is read by exactly one slot. With fewer shards
    than slots, every slot reads every shard and keeps every ``slots``-th sample (still each sample exactly once,
    but each shard is read ``slots`` times: make at least that many shards).

    **Order.** Within a slot, samples pass a shuffle buffer of `shuffle_buffer` samples seeded by (seed, epoch,
    slot). The order is a function of (seed, epoch, processes, workers): not of timing, prefetching or restarts.

    **Resume.** `skip_batches` before creating an epoch's iterator: the trainer then reads and drops that many
    batches (as for any stream), and every worker replaces those of its samples that certainly fall in them by
    `FAST_FORWARD` placeholders, which are neither decoded nor counted.

    Bad samples come back as `SkippedSample` (keys ``"<shard>:<key>"``; reasons of `SHARD_REASONS` and of
    `prepare_sample`), marked strict when `strict`. Do not pass the DataLoader through ``accelerator.prepare``.

    Args:
        urls (`Sequence[str]`): shard URLs (`expand_shard_spec`).
        transform (*optional*): PIL image -> tensor, called with ``rng=`` (a function of seed, epoch, shard, key).
        rank / world_size (`int`): this process's place.
        seed (`int`, defaults to 0): seed of the shard permutation, the shuffle buffers and the per-sample RNG.
        shuffle (`bool`, defaults to `True`): permute shards and shuffle samples; `False` reads each slot's shards in
            the given order.
        shuffle_buffer (`int`, defaults to 1000): samples per worker's buffer (memory: about that many encoded
            images); 0 or 1: no buffer.
        strict / max_image_pixels / max_image_bytes / passthrough: as in `LongCaptionDataset`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        strict: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
        passthrough: Sequence[str] = (),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not urls:
            raise ValueError("no shards given")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = list(urls)
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.strict = strict
        self.max_image_pixels, self.max_image_bytes = max_image_pixels, max_image_bytes
        self.passthrough = tuple(passthrough)
        self.epoch = 0
        self.skip = (0, 1)  # (batches, batch size) the next iterator's reader drops

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iterator reads (shard permutation, buffers and augmentations follow from it)."""
        self.epoch = epoch

    def skip_batches(self, count: int, batch_size: int) -> None:
        """Announce that the reader of the next iterator drops its first `count` batches of `batch_size` (resuming
        at a step inside an epoch).

        The reader must still read them: with DataLoader workers, batch ``j`` of worker ``w`` comes out in position
        ``j * workers + w`` while all workers still have data, and earlier once some have run out, never later. So
        each worker fast-forwards (no decoding) over its batches with ``j * workers + w < count``, and those batches
        are certainly among the dropped ones; the few that come out earlier because a worker ran out are read in full
        and dropped too. The batches after `count` are exactly those of an uninterrupted iterator.
        """
        if count < 0 or batch_size < 1:
            raise ValueError(f"need count >= 0 and batch_size >= 1, got {count}, {batch_size}")
        self.skip = (count, batch_size)

    def epoch_shards(self) -> list[tuple[int, str]]:
        """``(index in urls, url)`` in this epoch's order."""
        order = list(enumerate(self.urls))
        if self.shuffle:
            _seeded_rng("shards", self.seed, self.epoch).shuffle(order)
        return order

    def slot_items(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict | SkippedSample]:
        """What slot (rank, `worker`) reads this epoch, in order (shuffled, undecoded): `iter_shard` samples tagged
        with ``__shard__`` (their shard's index in `urls`), and ``bad_shard`` skips."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        order = self.epoch_shards()
        shared = len(order) < slots
        if shared and slot == 0:
            logger.warning(
                "%d shards for %d processes x %d workers: every worker reads every shard and keeps every %d-th "
                "sample (make at least %d shards to read each once)", len(order), self.world_size, num_workers,
                slots, slots,
            )

        def items() -> Iterator[dict | SkippedSample]:
            position = 0
            for index, url in (order if shared else order[slot::slots]):
                for item in iter_shard(url, self.max_image_bytes):
                    if shared:
                        position += 1
                        if (position - 1) % slots != slot:
                            continue
                    if not isinstance(item, SkippedSample):
                        item["__shard__"] = index
                    yield item

        if not self.shuffle:
            return items()
        return _shuffled(items(), self.shuffle_buffer, _seeded_rng("buffer", self.seed, self.epoch, slot))

    def _fast_forward_items(self, worker: int, num_workers: int) -> int:
        count, batch_size = self.skip
        if count <= worker:
            return 0
        return (count - worker + num_workers - 1) // num_workers * batch_size

    def prepare(self, item: dict | SkippedSample) -> dict[str, Any] | SkippedSample:
        """A sample of `slot_items` as a training example (decoded and transformed), or a `SkippedSample`."""
        sample = item if isinstance(item, SkippedSample) else self._example(item)
        return replace(sample, strict=True) if self.strict and isinstance(sample, SkippedSample) else sample

    def _example(self, item: dict) -> dict[str, Any] | SkippedSample:
        record = shard_record(item)
        if isinstance(record, SkippedSample):
            return record
        where = f"{item['__url__']}:{item['__key__']}"
        rng = _seeded_rng("sample", self.seed, self.epoch, item["__shard__"], item["__key__"])
        example = prepare_sample(
            record, where, self.transform, max_image_pixels=self.max_image_pixels, default_id=item["__key__"],
            passthrough=self.passthrough, rng=None if self.transform is None else rng,
            max_image_bytes=self.max_image_bytes,
        )
        if isinstance(example, SkippedSample):
            return replace(example, source=record["__member__"])
        return example

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        worker, num_workers = shard_position()
        fast_forward = self._fast_forward_items(worker, num_workers)
        for position, item in enumerate(self.slot_items(worker, num_workers)):
            if position < fast_forward:
                yield SkippedSample(position, FAST_FORWARD)
            else:
                yield self.prepare(item)


def open_shards(spec: str | os.PathLike | Sequence[str]) -> TarShardSource:
    """`TarShardSource` of `spec` (what `open_training_source` returns for the ``webdataset`` format)."""
    return TarShardSource(spec)


# ----------------------------------------------------------------------------------------------- writing
@dataclass
class ShardWriteReport:
    """What `write_shards` did.

    Args:
        out_dir (`Path`): the folder.
        shards (`list[Path]`): the shards written, in order.
        samples (`int`): samples written.
        skipped (`dict[str, int]`): records left out, per reason.
        examples (`list[str]`): the first few records left out, described.
    """

    out_dir: Path
    shards: list[Path] = field(default_factory=list)
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        """The ``--train_data`` value naming the shards (a brace range)."""
        if not self.shards:
            return ""
        if len(self.shards) == 1:
            return str(self.shards[0])
        first, last = self.shards[0].stem, self.shards[-1].stem
        return str(self.out_dir / f"{{{first}..{last}}}.tar")

    def summary(self) -> str:
        """A few lines: shards and samples written, records skipped per reason, the ``--train_data`` value."""
        skipped = sum(self.skipped.values())
        lines = [f"wrote {len(self.shards)} shard(s), {self.samples} samples, to {self.out_dir}"]
        if skipped:
            parts = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
            lines.append(f"skipped {skipped} record(s): {parts}")
            lines += [f"  {example}" for example in self.examples]
        else:
            lines.append("skipped 0 records")
        if self.shards:
            lines.append(f"train with: --train_data '{self.spec}'")
        return "\n".join(lines)


def _image_bytes(source: Any, max_image_bytes: int | None) -> tuple[bytes, str]:
    """The encoded bytes of an image source and its member extension (`BadImageError` when unusable)."""
    data, path, image = _read_source(source, max_image_bytes)
    if image is not None:  # an in-memory PIL image: store it as PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), "png"
    if not data:
        raise BadImageError("empty", f"{path or 'image'} has 0 bytes")
    suffix = Path(str(path)).suffix.lower().lstrip(".") if path else ""
    if suffix in IMAGE_EXTENSIONS:
        return data, suffix
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            found = _PIL_FORMATS.get(opened.format or "")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise BadImageError("corrupt", f"{path or 'image bytes'}: {error}") from None
    if found is None:
        raise BadImageError("corrupt", f"{path or 'image bytes'}: unsupported format")
    return data, found


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _check_record(record: Any, max_image_bytes: int | None) -> tuple[str, str] | None:
    """``(reason, detail)`` for a record `write_shards` leaves out before reading its image, else None."""
    from .images import image_source_exists

    if not isinstance(record, Mapping):
        return "bad_record", f"record is {type(record).__name__}"
    if record.get(READ_ERROR_KEY):
        return "bad_record", str(record[READ_ERROR_KEY])
    _, reason = check_caption(record.get("caption"))
    if reason:
        return reason, f"caption {record.get('caption')!r:.60}"
    _, reason = normalise_record_id(record.get("id"))
    if reason:
        return reason, f"id {record.get('id')!r:.60}"
    reason = image_source_exists(record.get("image"), max_image_bytes)
    if reason:
        return reason, f"image {record.get('image')!r:.120}"
    return None


def write_shards(
    records: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10000,
    *,
    parse_hierarchy: bool = False,
    workers: int = 1,
    shuffle_seed: int | None = 0,
    overwrite: bool = False,
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
    progress: bool = False,
    max_examples: int = 5,
) -> ShardWriteReport:
    """Write caption records as webdataset shards ``00000.tar, 00001.tar, ...`` in `out_dir`.

    Each sample is ``<key>.<ext>`` (the image file's bytes as they are, not re-encoded), ``<key>.txt`` (the caption)
    and ``<key>.json`` (``caption``, ``id``, ``short_caption`` when the record has one, ``hierarchy`` with
    `parse_hierarchy`). Keys are the samples' positions (``000000000``, ...). Records with a bad caption or id or a
    missing, empty, non-regular or oversized image file are left out and counted; image contents are not decoded
    (a corrupt image is skipped when training reads it). The samples are spread evenly: ``ceil(n /
    samples_per_shard)`` shards whose sizes differ by at most one. Each shard is written to a temporary name in
    `out_dir` and renamed when complete, so a shard name never holds a partial file.

    Args:
        records: caption records (`open_training_source`'s).
        out_dir: the folder (created).
        samples_per_shard (`int`, defaults to 10000): the most samples in a shard.
        parse_hierarchy (`bool`): parse beta-CLIP's caption hierarchy once with spaCy (`parse_hierarchies`) and
            store it in the ``.json`` members (needs the ``text`` extra).
        workers (`int`): spaCy processes for that parse.
        shuffle_seed (`int`, *optional*, defaults to 0): shuffle the records before writing (so shards mix the
            source's parts); `None` keeps their order.
        overwrite (`bool`): replace shards already in `out_dir` (and delete numbered shards beyond the new ones);
            otherwise a folder holding shards is refused.
        max_image_bytes (`int`, *optional*): larger image files are left out (``too_large``).
        progress (`bool`): show progress bars.

    Returns:
        `ShardWriteReport`.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if _SHARD_NAME.match(p.name))
    if existing and not overwrite:
        raise ValueError(f"{out} already holds shards ({existing[0].name}, ...); pass overwrite (--overwrite) to "
                         "replace them, or choose another folder")
    report = ShardWriteReport(out)
    skipped: Counter[str] = Counter()

    def skip(index: int, reason: str, detail: str) -> None:
        skipped[reason] += 1
        if len(report.examples) < max_examples:
            report.examples.append(f"record {index}: {reason} ({detail})")

    kept = []
    for index, record in enumerate(records):
        problem = _check_record(record, max_image_bytes)
        if problem:
            skip(index, *problem)
        else:
            kept.append((index, record))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(kept)
    hierarchies: list[dict[str, list]] | None = None
    if parse_hierarchy and kept:
        from ..extras import require
        from ..text.hierarchy import parse_hierarchies

        require("spacy", "text", "make-shards --parse-hierarchy")
        hierarchies = parse_hierarchies([r["caption"] for _, r in kept], n_process=workers, progress=progress)

    count = math.ceil(len(kept) / samples_per_shard)
    width = max(5, len(str(count - 1))) if count else 5
    key_width = max(9, len(str(len(kept) - 1))) if kept else 9
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(kept), desc="writing shards", unit="sample")
    for shard in range(count):
        start, stop = shard * len(kept) // count, (shard + 1) * len(kept) // count
        final = out / f"{shard:0{width}d}.tar"
        temporary = out / f".{final.name}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as handle:
                with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    for position in range(start, stop):
                        index, record = kept[position]
                        try:
                            data, ext = _image_bytes(record["image"], max_image_bytes)
                        except BadImageError as error:
                            skip(index, error.reason, error.detail)
                            continue
                        key = f"{position:0{key_width}d}"
                        caption = record["caption"]
                        meta: dict[str, Any] = {"caption": caption, "id": normalise_record_id(record.get("id"))[0]}
                        short = record.get("short_caption")
                        if isinstance(short, str) and short.strip():
                            meta["short_caption"] = short
                        if hierarchies is not None:
                            meta["hierarchy"] = hierarchies[position]
                        _add_member(tar, f"{key}.{ext}", data)
                        _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                        _add_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                        report.samples += 1
                        if bar is not None:
                            bar.update(1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        report.shards.append(final)
    if bar is not None:
        bar.close()
    if overwrite:
        for stale in existing:
            if stale not in report.shards:
                stale.unlink(missing_ok=True)
    report.skipped = dict(sorted(skipped.items()))
    return report


def make_shards(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    samples_per_shard: int = 10000,
    *,
    data_format: str = "auto",
    image_root: str | os.PathLike | None = None,
    split: str = "train",
    holdout: int = 1000,
    image_column: str = "image",
    caption_column: str = "caption",
    short_caption_column: str | None = "short_caption",
    **write_kwargs: Any,
) -> ShardWriteReport:
    """Read a ShareGPT4V JSON or a caption table (`open_training_source`; a ShareGPT4V file gives its ``split``,
    by default the training entries after the ``holdout`` head, as the trainer reads it) and `write_shards` it."""
    from .sources import TrainingSourceSpec, open_training_source

    spec = TrainingSourceSpec(
        path=os.fspath(input_path), format=data_format,
        image_root=None if image_root is None else os.fspath(image_root),
        split=split, holdout=holdout, image_column=image_column, caption_column=caption_column,
        short_caption_column=short_caption_column,
    )
    records = open_training_source(spec)
    if isinstance(records, TarShardSource):
        raise ValueError(f"{input_path} is already webdataset shards")
    return write_shards(records, out_dir, samples_per_shard, **write_kwargs)


__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "FAST_FORWARD",
    "IMAGE_EXTENSIONS",
    "SHARD_REASONS",
    "ShardWriteReport",
    "TarShardDataset",
    "TarShardSource",
    "expand_shard_spec",
    "iter_shard",
    "looks_like_shards",
    "make_shards",
    "open_shard",
    "open_shards",
    "shard_record",
    "write_shards",
]
