"""A memory-mapped record index of ShareGPT4V and caption-table files: built once, cached, shared by processes.

`open_record_index` streams a file through the same per-record code as `read_sharegpt4v` / `read_caption_table`
into an Arrow IPC file in the cache folder (written to a temporary name, then renamed: a reader never sees a partial
file) and returns a `RecordIndex`, a read-only sequence whose item ``i`` is the record the in-memory reader gives at
``i``, fetched in O(1) from the memory map. Every process (DDP ranks, DataLoader workers) maps the same file, so the
operating system's page cache holds it once. See docs/data.md (Large data sets: the record index).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import normalise_record_id
from .sources import (
    _LOGGED_READ_ERRORS,
    READ_ERROR_KEY,
    TrainingSourceSpec,
    _checked_table_rows,
    _is_missing_id,
    _log_read_problems,
    _read_json_file,
    _sharegpt4v_record,
    _table_record,
    detect_format,
    generated_id_base,
    read_sharegpt4v,
    resolve_image_path,
)

logger = logging.getLogger(__name__)

#: Bumped whenever the layout or the reading rules change: older index files are then rebuilt, never misread.
INDEX_FORMAT_VERSION = 1

#: ``record_index="auto"`` indexes files of at least this many bytes (about 15k ShareGPT4V entries). Below it, the
#: list of dicts costs under ~50 MB per process and loads in well under a second, so a cache file is not worth
#: writing; above it, every process (and, through copy-on-write, every DataLoader worker) would hold its own copy.
INDEX_MIN_BYTES = 16 * 2**20

#: Environment variable naming the cache folder (see `default_index_dir`).
INDEX_DIR_ENV = "HF_LONGCLIP_INDEX_DIR"

#: Values of ``record_index`` (`TrainingSourceSpec`, ``--record_index``).
RECORD_INDEX_MODES = ("auto", "always", "never")

#: Formats the index reads (``jsonl`` with a ``.json`` name is the JSON-list table, as in `open_training_source`).
INDEXED_FORMATS = ("sharegpt4v", "jsonl", "json", "csv", "tsv")

_FIELDS = ("image", "caption", "short_caption", "id", READ_ERROR_KEY)
_GENERATED_ID = 1 << len(_FIELDS)  # flag: the id is ``id_base + row`` (bits 0-4: that field holds JSON text)
_ID_FIELD = _FIELDS.index("id")
#: Per-record validation codes (what `validate_records` finds without opening files); 0 = fine.
_REASONS = ("", "bad_record", "empty_caption", "non_string_caption", "invalid_id")
_CODE = {reason: code for code, reason in enumerate(_REASONS)}
_INT64_MAX = 2**63 - 1
_META_KEY = b"hf_longclip_index"
_BATCH_ROWS = 65536
_BATCH_BYTES = 256 * 2**20
_ITER_ROWS = 4096  # rows converted at a time when iterating
_DIGEST_BYTES = 2**20
_JSON_CHUNK = 2**22  # characters read at a time by the streaming JSON-list parser
_MAX_ELEMENT_CHARS = 64 * _JSON_CHUNK  # an entry larger than this: parse the file whole instead
_STALE_TEMP_SECONDS = 3600
_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as the json module skips it


def _schema():
    import pyarrow as pa

    return pa.schema(
        [(name, pa.large_string()) for name in _FIELDS] + [("flags", pa.uint8()), ("reason", pa.uint8())]
    )


def default_index_dir() -> Path:
    """Where record indexes are cached: ``$HF_LONGCLIP_INDEX_DIR``, else ``$XDG_CACHE_HOME/hf_longclip/index``,
    else ``~/.cache/hf_longclip/index``."""
    configured = os.environ.get(INDEX_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hf_longclip" / "index"


def use_record_index(path: str | os.PathLike, mode: str = "auto") -> bool:
    """Whether `open_training_source` reads `path` through a `RecordIndex`: ``"always"``, ``"never"``, or
    (``"auto"``) when the file has at least `INDEX_MIN_BYTES` and pyarrow is installed."""
    if mode not in RECORD_INDEX_MODES:
        raise ValueError(f"record_index must be one of {RECORD_INDEX_MODES}, got {mode!r}")
    if mode == "never":
        return False
    if mode == "always":
        from ..extras import require

        require("pyarrow", "train", "the record index (record_index='always')")
        return True
    try:
        size = os.stat(path).st_size
    except (OSError, ValueError):
        return False  # the reader raises its own error
    if size < INDEX_MIN_BYTES:
        return False
    try:
        import pyarrow  # noqa: F401  (installed?)
    except ImportError:
        logger.info("%s: pyarrow is not installed, reading it into memory (no record index)", path)
        return False
    return True


# ------------------------------------------------------------------------------------------------ streaming JSON
class _NotStreamable(Exception):
    """The streaming parser stopped (invalid JSON, not a list, not UTF-8, an enormous entry): read the file whole
    instead, which raises the reader's own error (or reads what this parser would not)."""


def _iter_json_list(path: str | os.PathLike, chunk_chars: int = _JSON_CHUNK) -> Iterator[Any]:
    """The entries of a file holding one JSON list, parsed one at a time with the json module's own decoder, so
    memory stays at about one chunk. Anything `json.load` would reject raises `_NotStreamable`."""
    scan = json.JSONDecoder().raw_decode
    try:
        handle = open(path, encoding="utf-8-sig")
    except OSError:
        raise _NotStreamable from None
    buffer, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buffer, pos, eof
        if eof:
            return False
        try:
            chunk = handle.read(chunk_chars)
        except UnicodeDecodeError:
            raise _NotStreamable from None
        eof = len(chunk) < chunk_chars
        buffer, pos = buffer[pos:] + chunk, 0
        return bool(chunk)

    def peek() -> str:  # the next character after whitespace ("" at the end of the file)
        nonlocal pos
        while True:
            pos = _WHITESPACE.match(buffer, pos).end()
            if pos < len(buffer):
                return buffer[pos]
            if not more():
                return ""

    with handle:
        if peek() != "[":
            raise _NotStreamable
        pos += 1
        if peek() == "]":
            pos += 1
        else:
            while True:  # pos: the start of an entry
                try:
                    decoded, end = scan(buffer, pos)
                except json.JSONDecodeError:
                    # Most likely the entry runs past the buffer: read on (up to a bound), else give up.
                    if len(buffer) - pos > _MAX_ELEMENT_CHARS or not more():
                        raise _NotStreamable from None
                    continue
                # Accept an entry only when the "," or "]" after it is in the buffer: a number cut by the chunk
                # boundary ("12" of "123", "-45" of "-45.5") decodes without error.
                after = _WHITESPACE.match(buffer, end).end()
                following = buffer[after] if after < len(buffer) else ""
                if following not in (",", "]"):  # "" too: the buffer ended
                    if eof or len(buffer) - pos > _MAX_ELEMENT_CHARS:
                        raise _NotStreamable
                    more()
                    continue
                yield decoded
                pos = after + 1
                if following == "]":
                    break
                peek()
        if peek() != "":  # "Extra data" for json.load
            raise _NotStreamable


# ------------------------------------------------------------------------------------------------ building
def _encode(value: Any) -> tuple[str | None, bool]:
    """A field as stored: a string as it is, `None` as null, anything else (a number, a list, a string holding
    unpaired surrogates) as JSON text, flagged."""
    if value is None:
        return None, False
    if isinstance(value, str):
        return value, False
    return json.dumps(value, ensure_ascii=False), True


def _reason_code(record: Mapping[str, Any], generated_id: bool) -> int:
    """What `validate_records` says of `record` before any file check, in its order: unreadable line, caption, id
    (a generated id is valid; `_MappedIndex.all_reasons` handles the corner case of one beyond 64 bits)."""
    if record.get(READ_ERROR_KEY):
        return _CODE["bad_record"]
    caption = record.get("caption")
    if not isinstance(caption, str):
        return _CODE["non_string_caption"]
    # `check_caption` tests " ".join(caption.split()) for emptiness; str.split and str.isspace share one definition
    # of whitespace, so this is the same test without building the joined string.
    if not caption or caption.isspace():
        return _CODE["empty_caption"]
    if not generated_id and normalise_record_id(record.get("id"))[1] is not None:
        return _CODE["invalid_id"]
    return 0


class _IndexWriter:
    """Writes records to an Arrow IPC file in batches; `close` appends an empty batch carrying the metadata."""

    def __init__(self, path: Path):
        import pyarrow as pa
        from pyarrow import ipc

        self._pa = pa
        self.schema = _schema()
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = ipc.new_file(self._sink, self.schema)
        self._pending: list[tuple[Mapping[str, Any], bool]] = []
        self._pending_bytes = 0
        self.rows = 0

    def add(self, record: Mapping[str, Any], generated_id: bool) -> None:
        self._pending.append((record, generated_id))
        caption = record.get("caption")
        self._pending_bytes += len(caption) if type(caption) is str else 0
        self.rows += 1
        if len(self._pending) >= _BATCH_ROWS or self._pending_bytes >= _BATCH_BYTES:
            self.flush()

    def _column(self, bit: int, flags: list[int]):
        """Field `bit` of the pending records as an Arrow array, converted column-wise (JSON text where needed)."""
        pa = self._pa
        name = _FIELDS[bit]
        if bit == _ID_FIELD:
            values = [None if generated else record.get(name) for record, generated in self._pending]
        else:
            values = [record.get(name) for record, _ in self._pending]
        for row in [row for row, value in enumerate(values) if value is not None and type(value) is not str]:
            values[row], _ = _encode(values[row])
            flags[row] |= 1 << bit
        try:
            return pa.array(values, type=pa.large_string())
        except UnicodeEncodeError:
            # Unpaired surrogates (an escaped "\ud800" in a JSON string) are not UTF-8: store such values as ASCII
            # JSON text, flagged, which round-trips them exactly.
            for row, value in enumerate(values):
                if value is None:
                    continue
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    values[row] = json.dumps(json.loads(value) if flags[row] & (1 << bit) else value)
                    flags[row] |= 1 << bit
            return pa.array(values, type=pa.large_string())

    def flush(self) -> None:
        if not self._pending:
            return
        pa = self._pa
        flags = [_GENERATED_ID if generated else 0 for _, generated in self._pending]
        reasons = [_reason_code(record, generated) for record, generated in self._pending]
        strings = [self._column(bit, flags) for bit in range(len(_FIELDS))]
        batch = pa.record_batch(
            [*strings, pa.array(flags, type=pa.uint8()), pa.array(reasons, type=pa.uint8())], schema=self.schema
        )
        self._writer.write_batch(batch)
        self._pending, self._pending_bytes = [], 0

    def close(self, meta: Mapping[str, Any]) -> None:
        self.flush()
        empty = self._pa.record_batch([[] for _ in self.schema], schema=self.schema)
        self._writer.write_batch(empty, custom_metadata={_META_KEY: json.dumps(meta).encode("utf-8")})
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._sink.close()


def _sharegpt4v_items(path: Path, stream: bool) -> Iterator[tuple[dict[str, Any], bool]]:
    """``(record, id is generated)`` per entry of a ShareGPT4V file, image paths not yet resolved (every id is the
    entry's index)."""
    if stream:
        entries: Iterable[Any] = _iter_json_list(path)
    else:
        entries = _read_json_file(path, "ShareGPT4V")
        if not isinstance(entries, list):
            read_sharegpt4v(path, split="all")  # raises the reader's own error
            raise ValueError(f"{path}: a ShareGPT4V file is a JSON list")  # pragma: no cover
    for index, entry in enumerate(entries):
        yield _sharegpt4v_record(entry, index, None), True


def _json_table_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """The rows `_iter_table_rows` gives for a ``.json`` table, streamed."""
    for number, row in enumerate(_iter_json_list(path)):
        if isinstance(row, Mapping):
            yield f"entry {number}", dict(row), None
        else:
            yield f"entry {number}", None, f"expected a JSON object, got {type(row).__name__}"


class _TableState:
    def __init__(self):
        self.id_base = 0
        self.problems: list[str] = []
        self.num_problems = 0


def _table_items(path: Path, options: Mapping[str, Any], state: _TableState, stream: bool):
    """``(record, id is generated)`` per row of a caption table, as `read_caption_table` makes them; `state`
    collects the id base and the unreadable rows."""
    kind, id_column = options["kind"], options["id_column"]
    rows = _json_table_rows(path) if kind == "json" and stream else None
    generated = object()
    for where, row, problem in _checked_table_rows(
        path, kind, options["image_column"], options["caption_column"], rows=rows
    ):
        if row is None:
            state.num_problems += 1
            if len(state.problems) < _LOGGED_READ_ERRORS:
                state.problems.append(f"{where} ({problem})")
        elif id_column:
            ident = row.get(id_column)
            if not _is_missing_id(ident):
                state.id_base = max(state.id_base, generated_id_base((ident,)))
        record = _table_record(
            path, where, row, problem, generated, None, options["image_column"],
            options["caption_column"], options["short_caption_column"], id_column,
        )
        yield record, record["id"] is generated


def _write_index(tmp: Path, source: Path, options: Mapping[str, Any], key: Mapping[str, Any]) -> None:
    """Build the index of `source` into `tmp`: streamed when the file allows it, else read whole (which raises the
    reader's error for a broken file)."""
    for stream in (True, False):
        started = time.perf_counter()
        writer = _IndexWriter(tmp)
        state = _TableState()
        # The records form no reference cycles; without this the cyclic collector, triggered by every few hundred
        # new dicts, walks all pending records again and again (over half of the build's time, measured).
        collecting = gc.isenabled()
        gc.disable()
        try:
            if options["kind"] == "sharegpt4v":
                items = _sharegpt4v_items(source, stream)
            else:
                items = _table_items(source, options, state, stream)
            for record, generated in items:
                writer.add(record, generated)
        except _NotStreamable:
            writer.abort()
            continue
        except BaseException:
            writer.abort()
            raise
        finally:
            if collecting:
                gc.enable()
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "key": dict(key),
            "num_rows": writer.rows,
            "id_base": state.id_base,
            "num_read_problems": state.num_problems,
            "read_problems": state.problems,
            "build_seconds": round(time.perf_counter() - started, 3),
            "streamed": stream,
        }
        writer.close(meta)
        return
    raise AssertionError("unreachable: the whole-file read either raises or returns")  # pragma: no cover


def _fingerprint(path: Path) -> dict[str, Any]:
    """What identifies the file's contents cheaply: size, modification time, and a digest of its first and last MiB."""
    info = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(_DIGEST_BYTES))
        if info.st_size > _DIGEST_BYTES:
            handle.seek(max(_DIGEST_BYTES, info.st_size - _DIGEST_BYTES))
            digest.update(handle.read(_DIGEST_BYTES))
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "head_tail_blake2b": digest.hexdigest()}


def _short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on ``<index>.lock`` while building, so processes of one machine build once and the others
    wait (correctness does not depend on it: the file is published by an atomic rename)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: concurrent builders each write their own temporary file
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_writable(folder: Path, source: Path) -> None:
    """Create the cache folder, or say plainly what to do when it cannot be written (a read-only home on a cluster)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK | os.X_OK) else "not writable"
    except OSError as error:
        problem = str(error)
    if problem:
        raise OSError(
            f"cannot write the record index of {source} in {folder} ({problem}); set index_dir (--index_dir) or "
            f"${INDEX_DIR_ENV} to a writable folder, or read the file into memory with record_index='never'"
        )


def _prune(folder: Path, prefix: str, keep: Path) -> None:
    """Remove older versions of this source's index (same file and options, other contents) and temporary files
    left by killed builds. An index still mapped by a running process stays readable after the unlink (POSIX)."""
    now = time.time()
    for candidate in folder.glob(f"{prefix}-*"):
        if candidate == keep or candidate.name == keep.name + ".lock":
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
    for candidate in folder.glob(f".{prefix}-*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - candidate.stat().st_mtime > _STALE_TEMP_SECONDS:
                candidate.unlink()


def _process_rss_mib() -> float | None:
    """This process's resident memory now (Linux), in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def open_record_index(
    path: str | os.PathLike,
    file_format: str | None = None,
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    short_caption_column: str | None = "short_caption",
    id_column: str | None = "id",
    index_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
) -> RecordIndex:
    """The `RecordIndex` of a ShareGPT4V file or caption table, built on first use and reused after.

    The index holds every record of the file (for ShareGPT4V, ``split="all"``: take the train / holdout split with
    `RecordIndex.sharegpt4v_split`), identical to what `read_sharegpt4v` / `read_caption_table` return with the same
    options. It is cached in `index_dir` under a name derived from the file's absolute path and the reader options,
    and is rebuilt when the file's size, modification time, or first or last MiB change. Building writes a temporary
    file and renames it into place, so concurrent builders are safe and a killed build leaves nothing that is read.

    Args:
        path: the file.
        file_format (`str`, *optional*): ``"sharegpt4v"``, ``"jsonl"``, ``"json"``, ``"csv"`` or ``"tsv"``; by
            default as `detect_format` says.
        image_root / image_column / caption_column / short_caption_column / id_column: as in the readers (the
            columns apply to tables).
        index_dir (*optional*): the cache folder (default: `default_index_dir`).
        rebuild (`bool`, defaults to `False`): build again even if a valid index exists.

    Returns:
        `RecordIndex`.

    Raises:
        `ValueError`: what the reader raises for the file (invalid JSON, a missing column, ...).
    """
    from ..extras import require

    require("pyarrow", "train", "the record index")
    started = time.perf_counter()
    source = Path(path)
    kind = file_format or detect_format(source)
    if kind == "jsonl" and source.suffix.lower() == ".json":
        kind = "json"
    if kind not in INDEXED_FORMATS:
        raise ValueError(f"{source}: the record index reads {INDEXED_FORMATS}, not {kind!r}")
    # Image paths are stored as the file gives them and joined onto the root as records are read (the readers'
    # `resolve_image_path`, so the same strings), so one index serves every image_root.
    root = os.fspath(source.parent if image_root is None else image_root)
    table = kind != "sharegpt4v"
    options = {
        "kind": kind,
        "path": str(source),  # as given: read errors name the file this way
        "absolute_path": os.path.abspath(source),
        "image_column": image_column if table else None,
        "caption_column": caption_column if table else None,
        "short_caption_column": short_caption_column if table else None,
        "id_column": id_column if table else None,
    }
    folder = Path(index_dir) if index_dir is not None else default_index_dir()
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", source.name)[:60]
    prefix = f"{stem}-{_short_hash({'version': INDEX_FORMAT_VERSION, **options})}"

    built = False
    for _attempt in range(3):
        fingerprint = _fingerprint(source)
        key = {"version": INDEX_FORMAT_VERSION, **options, **fingerprint}
        file = folder / f"{prefix}-{_short_hash(fingerprint)}.arrow"
        index = None if rebuild else RecordIndex._load(file, key, root)
        if index is not None:
            break
        _check_writable(folder, source)
        with _build_lock(file):
            index = None if rebuild else RecordIndex._load(file, key, root)  # another process may have built it
            if index is None:
                tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    _write_index(tmp, source, options, key)
                    if _fingerprint(source) != fingerprint:
                        logger.warning("%s changed while it was being indexed; indexing it again", source)
                        continue
                    os.replace(tmp, file)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
                built, rebuild = True, False
                _prune(folder, prefix, file)
                index = RecordIndex._load(file, key, root)
                if index is None:
                    raise RuntimeError(f"{file}: the record index just built cannot be read back")
        break
    else:
        raise ValueError(f"{source} kept changing while it was being indexed; index it when it is complete")

    seconds = time.perf_counter() - started
    index.info = {"file": str(index.file), "bytes": index.file.stat().st_size, "built": built,
                  "seconds": seconds, "build_seconds": index.meta["build_seconds"]}
    rss = _process_rss_mib()
    logger.info(
        "record index of %s: %d records, %.1f MiB memory-mapped (shared between processes) from %s; %s in %.2f s%s",
        source, len(index), index.info["bytes"] / 2**20, index.file, "built" if built else "opened", seconds,
        "" if rss is None else f"; process RSS {rss:.0f} MiB",
    )
    _log_read_problems(source, index.meta["read_problems"], index.meta["num_read_problems"])
    return index


def open_indexed_source(spec: TrainingSourceSpec, kind: str) -> RecordIndex:
    """What `open_training_source` returns for a ShareGPT4V file or a table read through the index: the same records
    (ShareGPT4V: the spec's split) as a `RecordIndex`."""
    if kind == "sharegpt4v":
        _check_split(spec.split, spec.holdout)
        index = open_record_index(spec.path, "sharegpt4v", image_root=spec.image_root, index_dir=spec.index_dir)
        return index.sharegpt4v_split(spec.split, spec.holdout)
    return open_record_index(
        spec.path, kind, image_root=spec.image_root, image_column=spec.image_column,
        caption_column=spec.caption_column, short_caption_column=spec.short_caption_column,
        id_column=spec.id_column, index_dir=spec.index_dir,
    )


def _check_split(split: str, holdout: int) -> None:
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")


# ------------------------------------------------------------------------------------------------ reading
class _MappedIndex:
    """The memory-mapped batches of one index file, shared by all views of it."""

    def __init__(self, file: Path, batches: list, meta: dict[str, Any], root: str | None):
        self.file = file
        self.meta = meta
        self.root = root
        self.id_base = int(meta["id_base"])
        self.starts: list[int] = []
        self.columns: list[tuple] = []
        self.flags: list[np.ndarray] = []
        self.reasons: list[np.ndarray] = []
        start = 0
        for batch in batches:
            self.starts.append(start)
            self.columns.append(tuple(batch.column(i) for i in range(len(_FIELDS))))
            # zero-copy views of the mapped bytes (uint8 without nulls)
            self.flags.append(batch.column(len(_FIELDS)).to_numpy(zero_copy_only=True))
            self.reasons.append(batch.column(len(_FIELDS) + 1).to_numpy(zero_copy_only=True))
            start += batch.num_rows
        self.num_rows = start
        self._all_reasons: np.ndarray | None = None

    def _decode(self, values: list[Any], flags: int, row: int) -> dict[str, Any]:
        for bit, value in enumerate(values):
            if flags & (1 << bit) and value is not None:
                values[bit] = json.loads(value)
        if flags & _GENERATED_ID:
            values[_ID_FIELD] = self.id_base + row
        image = values[0]
        record = {"image": resolve_image_path(image, self.root) if type(image) is str else image,
                  "caption": values[1], "short_caption": values[2], "id": values[3]}
        if values[4] is not None:
            record[READ_ERROR_KEY] = values[4]
        return record

    def record(self, row: int) -> dict[str, Any]:
        batch = bisect.bisect_right(self.starts, row) - 1
        offset = row - self.starts[batch]
        values = [column[offset].as_py() for column in self.columns[batch]]
        return self._decode(values, int(self.flags[batch][offset]), row)

    def records(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows ``start`` to ``stop`` (exclusive), converted `_ITER_ROWS` at a time."""
        batch = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < stop and batch < len(self.starts):
            first = start - self.starts[batch]
            count = min(stop - start, len(self.flags[batch]) - first, _ITER_ROWS)
            if count > 0:
                columns = [column.slice(first, count).to_pylist() for column in self.columns[batch]]
                flags = self.flags[batch][first : first + count].tolist()
                for i in range(count):
                    yield self._decode([column[i] for column in columns], flags[i], start + i)
                start += count
            if start - self.starts[batch] >= len(self.flags[batch]):
                batch += 1

    def all_reasons(self) -> np.ndarray:
        """The validation code of every row (generated ids beyond 64 bits, a corner case, counted as invalid)."""
        if self._all_reasons is None:
            codes = np.concatenate(self.reasons) if self.reasons else np.zeros(0, np.uint8)
            if self.num_rows and self.id_base + self.num_rows - 1 > _INT64_MAX:
                flags = np.concatenate(self.flags)
                rows = np.arange(self.num_rows, dtype=object) + self.id_base
                overflow = (flags & _GENERATED_ID).astype(bool) & (rows > _INT64_MAX).astype(bool) & (codes == 0)
                codes = np.where(overflow, _CODE["invalid_id"], codes).astype(np.uint8)
            self._all_reasons = codes
        return self._all_reasons


def _load_mapped(file: Path, expected_key: Mapping[str, Any] | None, root: str | None) -> _MappedIndex | None:
    """The index in `file`, or None when it is missing, incomplete, corrupt, of another format version or built
    from another file or with other options."""
    import pyarrow as pa
    from pyarrow import ipc

    try:
        reader = ipc.open_file(pa.memory_map(str(file), "r"))
        count = reader.num_record_batches
        if count < 1 or reader.schema != _schema():
            return None
        last = reader.get_batch_with_custom_metadata(count - 1)
        meta = json.loads((last.custom_metadata or {})[_META_KEY])
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            return None
        if expected_key is not None and meta.get("key") != dict(expected_key):
            return None
        batches = [reader.get_batch(i) for i in range(count - 1)]
        if sum(batch.num_rows for batch in batches) != meta["num_rows"]:
            return None
        return _MappedIndex(file, batches, meta, root)
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def _reopen(file: str, key: Mapping[str, Any] | None, root: str | None, rows: range | np.ndarray) -> RecordIndex:
    mapped = _load_mapped(Path(file), key, root)
    if mapped is None:
        raise FileNotFoundError(f"{file}: the record index is gone or was rebuilt from a changed file")
    return RecordIndex(mapped, rows)


class RecordIndex(Sequence):
    """Read-only, memory-mapped records of a ShareGPT4V file or caption table (see `open_record_index`).

    ``index[i]`` is the record dict the in-memory reader gives at ``i`` (same keys, values and types, including
    `READ_ERROR_KEY` on unreadable rows); slices, `select` and `sharegpt4v_split` give views without copying.
    Pickling (DataLoader workers started with ``spawn``) sends the file name, and the worker maps the same file.
    Use it wherever a list of records goes: `LongCaptionDataset`, `IterableLongCaptionDataset`, `validate_records`.

    Attributes:
        file (`Path`): the index file.
        meta (`dict`): what the build recorded (number of rows, unreadable rows, build seconds, the cache key).
        info (`dict`): set by `open_record_index`: ``bytes``, ``built``, ``seconds`` (this open), ``build_seconds``.
    """

    def __init__(self, mapped: _MappedIndex, rows: range | np.ndarray | None = None):
        self._mapped = mapped
        self._rows = range(mapped.num_rows) if rows is None else rows
        self.info: dict[str, Any] = {}

    @classmethod
    def _load(cls, file: Path, key: Mapping[str, Any] | None, root: str | None) -> RecordIndex | None:
        mapped = _load_mapped(file, key, root)
        return None if mapped is None else cls(mapped)

    @property
    def file(self) -> Path:
        return self._mapped.file

    @property
    def meta(self) -> dict[str, Any]:
        return self._mapped.meta

    def __len__(self) -> int:
        return len(self._rows)

    def _view(self, rows: range | np.ndarray) -> RecordIndex:
        view = RecordIndex(self._mapped, rows)
        view.info = self.info
        return view

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self._view(self._rows[item])
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise TypeError(f"record indices must be integers or slices, not {type(item).__name__}")
        position = int(item)
        if position < 0:
            position += len(self._rows)
        if not 0 <= position < len(self._rows):
            raise IndexError(f"record index {int(item)} out of range for {len(self._rows)} records")
        return self._mapped.record(int(self._rows[position]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self._rows
        if isinstance(rows, range) and rows.step == 1:
            yield from self._mapped.records(rows.start, rows.stop)
        else:
            for row in rows:
                yield self._mapped.record(int(row))

    def select(self, indices: Iterable[int]) -> RecordIndex:
        """A view of the records at `indices` (positions in this view), like `datasets.Dataset.select`."""
        if isinstance(indices, range) and isinstance(self._rows, range) and indices.step > 0:
            if len(indices) and not (0 <= indices.start and indices[-1] < len(self._rows)):
                raise IndexError(f"select: {indices} out of range for {len(self._rows)} records")
            return self._view(self._rows[indices.start : indices.stop : indices.step])
        positions = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self._rows)):
            raise IndexError(f"select: indices out of range for {len(self._rows)} records")
        return self._view(np.asarray(self._rows, dtype=np.int64)[positions])

    def sharegpt4v_split(self, split: str = "train", holdout: int = 1000) -> RecordIndex:
        """The split of a ShareGPT4V index as `read_sharegpt4v` makes it: ``"train"`` (after the first `holdout`
        entries), ``"holdout"`` (the first `holdout`) or ``"all"``."""
        _check_split(split, holdout)
        if split == "train":
            return self[holdout:]
        return self[:holdout] if split == "holdout" else self[:]

    def __reduce__(self):
        return _reopen, (str(self.file), self.meta.get("key"), self._mapped.root, self._rows)

    def __repr__(self) -> str:
        source = self.meta.get("key", {}).get("path", "?")
        return f"RecordIndex({len(self)} records of {source}, file={str(self.file)!r})"

    # -------------------------------------------------------------------------------------------- validation
    def _positions_reasons(self) -> np.ndarray:
        reasons = self._mapped.all_reasons()
        if isinstance(self._rows, range):
            return reasons[self._rows.start : self._rows.stop : self._rows.step]
        return reasons[np.asarray(self._rows, dtype=np.int64)]

    def _skipped(self, position: int, reason: str, image_root: Any):
        from .dataset import SkippedSample
        from .images import describe_image_source

        record = self[position]
        error = record.get(READ_ERROR_KEY)
        source = resolve_image_path(record.get("image"), image_root)
        return SkippedSample(position, reason, describe_image_source(source), str(error) if error else "")

    def validate(
        self,
        strict: bool = False,
        check_files: bool = True,
        image_root: str | os.PathLike | None = None,
        max_examples: int = 10,
        max_image_bytes: int | None = None,
    ):
        """`validate_records` of these records, the same report (it dispatches here). Without `check_files` it reads
        no record: unreadable lines, captions and ids were judged when the index was built."""
        from .dataset import BadSampleError, ValidationReport
        from .images import image_source_exists

        reasons = self._positions_reasons()
        if not check_files:
            positions = np.flatnonzero(reasons)
            if strict and positions.size:
                first = int(positions[0])
                raise BadSampleError.from_skipped(self._skipped(first, _REASONS[reasons[first]], image_root))
            counts = np.bincount(reasons, minlength=len(_REASONS))
            bad = {_REASONS[code]: int(counts[code]) for code in range(1, len(_REASONS)) if counts[code]}
            examples = [self._skipped(int(p), _REASONS[reasons[p]], image_root) for p in positions[:max_examples]]
            return ValidationReport(len(self), dict(sorted(bad.items())), examples, checked_files=False)
        found: Counter[str] = Counter()
        examples = []
        for position, record in enumerate(self):
            code = int(reasons[position])
            if code:
                reason = _REASONS[code]
            else:
                reason = image_source_exists(resolve_image_path(record.get("image"), image_root), max_image_bytes)
                if reason is None:
                    continue
            if strict:
                raise BadSampleError.from_skipped(self._skipped(position, reason, image_root))
            found[reason] += 1
            if len(examples) < max_examples:
                examples.append(self._skipped(position, reason, image_root))
        return ValidationReport(len(self), dict(sorted(found.items())), examples, checked_files=True)


def is_record_index(records: Any) -> bool:
    """Whether `records` is a `RecordIndex` (or a view of one)."""
    return isinstance(records, RecordIndex)


__all__ = [
    "INDEX_DIR_ENV",
    "INDEX_FORMAT_VERSION",
    "INDEX_MIN_BYTES",
    "RECORD_INDEX_MODES",
    "RecordIndex",
    "default_index_dir",
    "is_record_index",
    "open_indexed_source",
    "open_record_index",
    "use_record_index",
]
