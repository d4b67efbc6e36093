"""Readers for long-caption training data: ShareGPT4V JSON, caption tables (JSONL / JSON / CSV / TSV) and
Hugging Face datasets.

Every reader yields plain records ``{"image", "caption", "short_caption", "id"}`` (the Hugging Face reader, a
`datasets.Dataset` with those columns). Readers do not decode images or judge captions: a broken record is passed on
as it is and `LongCaptionDataset` skips and counts it, so reading a 1.2M-entry file never fails on one bad line. A
line that cannot be parsed at all (invalid JSON, not UTF-8, a CSV row with the wrong number of fields) becomes a
record carrying `READ_ERROR_KEY` (file and line), logged once per file, and skipped and counted as ``bad_record``.
Files are read as UTF-8 with or without a byte-order mark.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Record keys every reader produces.
RECORD_KEYS = ("image", "caption", "short_caption", "id")

#: Formats `open_training_source` understands.
SOURCE_FORMATS = ("auto", "sharegpt4v", "jsonl", "json", "csv", "tsv", "hf", "webdataset")

_TABLE_EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
_HF_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_INTEGER_STRING = re.compile(r"^\s*[+-]?\d+\s*$")
_SURROGATE = re.compile("[\udc80-\udcff]")  # undecodable bytes, kept by errors="surrogateescape"
_BOM = b"\xef\xbb\xbf"

#: Key of a record standing for a line (or entry) its reader could not parse; the value says where and why
#: (``"pairs.jsonl, line 7: invalid JSON (...)"``). The dataset skips such a record as ``bad_record``.
READ_ERROR_KEY = "read_error"

#: Lines with a read error named in full in the reader's warning (the rest are counted).
_LOGGED_READ_ERRORS = 5


def generated_id_base(ids: Iterable[Any]) -> int:
    """The first id a record without one may get (generated ids are ``base + index``): one past the largest
    integer-valued explicit id (ints, integral floats, integer strings such as ``"7"``), or 0 when there is none.
    So a generated id never equals an explicit one, and data without ids keeps the index as the id."""
    largest = -1
    for ident in ids:
        if ident is None or isinstance(ident, bool):
            continue
        if isinstance(ident, str):
            if not _INTEGER_STRING.match(ident):
                continue
            value = int(ident)
        elif isinstance(ident, int):
            value = ident
        elif isinstance(ident, float):
            if not math.isfinite(ident) or not ident.is_integer():
                continue
            value = int(ident)
        else:
            try:
                import numpy as np

                if not isinstance(ident, np.integer):
                    continue
            except ImportError:  # pragma: no cover
                continue
            value = int(ident)
        largest = max(largest, value)
    return largest + 1


def _is_missing_id(ident: Any) -> bool:
    return ident is None or (isinstance(ident, str) and not ident.strip()) or (
        isinstance(ident, float) and math.isnan(ident)
    )


def _read_json_file(path: Path, what: str) -> Any:
    """Parse a whole JSON file (UTF-8, with or without a byte-order mark); a truncated or invalid file is a
    `ValueError` naming the file, the line and the column."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not a valid {what} JSON file (truncated or corrupt?): {error.msg} at line {error.lineno}, "
            f"column {error.colno}"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 {what} JSON file ({error})") from None


def resolve_image_path(image: Any, image_root: str | os.PathLike | None) -> Any:
    """Join a relative image path onto `image_root`; absolute paths, URLs, bytes and other values pass unchanged."""
    if not isinstance(image, (str, os.PathLike)) or image_root is None:
        return image
    path = os.fspath(image)
    if not path or os.path.isabs(path) or _URL.match(path):
        return path
    return os.path.join(os.fspath(image_root), path)


def sharegpt4v_caption(conversations: Any) -> Any:
    """The long caption of a ShareGPT4V entry: ``conversations[1]["value"]``, what Long-CLIP, FineLIP and beta-CLIP
    read (the captioner's answer after the human prompt). If that turn is not the model's (a file with a system turn
    first), the first ``gpt`` turn instead. None when there is no such turn."""
    if not isinstance(conversations, list):
        return None
    if len(conversations) > 1 and isinstance(conversations[1], Mapping):
        if conversations[1].get("from", "gpt") == "gpt":
            return conversations[1].get("value")
    for turn in conversations:
        if isinstance(turn, Mapping) and turn.get("from") == "gpt":
            return turn.get("value")
    return None


def read_sharegpt4v(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str = "train",
    holdout: int = 1000,
) -> list[dict[str, Any]]:
    """Read a ShareGPT4V caption file (e.g. ``share-captioner_coco_lcs_sam_1246k_1107.json``).

    The file is a JSON list of ``{"id"?, "image": "coco/train2017/...jpg", "conversations": [{"from": "human", ...},
    {"from": "gpt", "value": LONG_CAPTION}]}``. The long caption is `sharegpt4v_caption` (``conversations[1]``) with
    newlines replaced by spaces, as in Long-CLIP; the short caption is left to the dataset (its first sentence). The
    evaluation reader of ShareGPT4V-1k reads the same file through this function.

    Args:
        json_path: the JSON file.
        image_root (*optional*): folder the relative ``image`` paths are under; defaults to the file's folder.
        split (`str`, defaults to ``"train"``): ``"train"`` (entries after the first `holdout`), ``"holdout"`` (the
            first `holdout` entries: the papers' ShareGPT4V-1k evaluation set, which must not be trained on) or
            ``"all"``.
        holdout (`int`, defaults to 1000): size of the held-out head of the file.

    Returns:
        `list[dict]`: records whose ``id`` is the entry's index in the file (stable across splits and runs).

    Raises:
        `ValueError`: the file is not valid JSON (e.g. truncated by an interrupted download: the message names the
        file and where parsing stopped) or not a JSON list.
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split must be 'train', 'holdout' or 'all', got {split!r}")
    if holdout < 0:
        raise ValueError(f"holdout must be >= 0, got {holdout}")
    json_path = Path(json_path)
    entries = _read_json_file(json_path, "ShareGPT4V")
    if not isinstance(entries, list):
        raise ValueError(f"{json_path}: a ShareGPT4V file is a JSON list, got {type(entries).__name__}")
    root = json_path.parent if image_root is None else image_root
    bounds = {"train": (holdout, len(entries)), "holdout": (0, min(holdout, len(entries))), "all": (0, len(entries))}
    start, stop = bounds[split]
    return [_sharegpt4v_record(entries[index], index, root) for index in range(start, stop)]


def _sharegpt4v_record(entry: Any, index: int, root: str | os.PathLike) -> dict[str, Any]:
    """The record of entry `index` of a ShareGPT4V file (shared by `read_sharegpt4v` and the record index)."""
    entry = entry if isinstance(entry, Mapping) else {}
    caption = sharegpt4v_caption(entry.get("conversations"))
    if isinstance(caption, str):
        caption = caption.replace("\n", " ")
    return {
        "image": resolve_image_path(entry.get("image"), root),
        "caption": caption,
        "short_caption": None,
        "id": index,
    }


def _iter_table_rows(
    path: Path, kind: str, columns: tuple[str, ...] = ()
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """``(location, row, None)`` per row, or ``(location, None, problem)`` for a row that cannot be parsed.

    `location` is ``"line N"`` (JSONL, CSV, TSV: the row's first line) or ``"entry N"`` (a JSON list). Blank JSONL
    lines are not rows. The CSV/TSV header must hold `columns` (a `ValueError` otherwise).
    """
    if kind == "jsonl":
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                where = f"line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield where, None, f"not UTF-8 ({error})"
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    yield where, None, f"invalid JSON ({error.msg} at column {error.colno})"
                    continue
                if not isinstance(row, Mapping):
                    yield where, None, f"expected a JSON object, got {type(row).__name__}"
                    continue
                yield where, dict(row), None
    elif kind == "json":
        rows = _read_json_file(path, "caption table")
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        for number, row in enumerate(rows):
            if isinstance(row, Mapping):
                yield f"entry {number}", dict(row), None
            else:
                yield f"entry {number}", None, f"expected a JSON object, got {type(row).__name__}"
    else:
        # utf-8-sig drops a byte-order mark (else the first column would be named "\ufeffimage");
        # surrogateescape keeps undecodable bytes so the row holding them can be skipped alone.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t" if kind == "tsv" else ",")
            start = 1
            header: list[str] | None = None
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    raise ValueError(f"{path}, line {start}: {error}") from None
                where, start = f"line {start}", reader.line_num + 1
                if header is None:
                    header = values
                    for column in columns:
                        if column not in header:
                            present = ", ".join(repr(c) for c in header) or "none"
                            raise ValueError(f"{path}: missing column {column!r} (header); columns present: {present}")
                    continue
                if not values:  # a blank line (csv.DictReader skips these too)
                    continue
                if len(values) != len(header):
                    yield where, None, f"{len(values)} fields, the header has {len(header)}"
                elif any(_SURROGATE.search(value) for value in values):
                    yield where, None, "not UTF-8"
                else:
                    yield where, dict(zip(header, values)), None
            if header is None and columns:
                raise ValueError(f"{path}: missing column {columns[0]!r} (the file is empty); columns present: none")


def read_caption_table(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    short_caption_column: str | None = "short_caption",
    id_column: str | None = "id",
    file_format: str | None = None,
) -> list[dict[str, Any]]:
    """Read image-caption pairs from a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` or ``.tsv`` file.

    Files are UTF-8, with or without a byte-order mark. A row that cannot be parsed (invalid JSON, not an object,
    not UTF-8, a CSV row with the wrong number of fields, a JSONL object without the image or caption key) does not
    fail the read: it becomes a record with `READ_ERROR_KEY` set to ``"<file>, line N: <problem>"``, the dataset
    skips and counts it as ``bad_record``, and one warning per file names the lines.

    Args:
        path: the table.
        image_root (*optional*): folder relative image paths are under; defaults to the table's folder.
        image_column / caption_column (`str`): required columns.
        short_caption_column (`str`, *optional*): used when present; an empty cell means "derive it".
        id_column (`str`, *optional*): used when present; otherwise the row index is the id. When only some rows
            have an id, the others get ``base + row index``, `base` being one past the largest integer id of the
            file (`generated_id_base`), so a generated id never equals an explicit one.
        file_format (`str`, *optional*): ``"jsonl"``, ``"json"``, ``"csv"`` or ``"tsv"``; by extension by default.

    Returns:
        `list[dict]`: one record per row (blank JSONL lines are not rows).

    Raises:
        `ValueError`: a required column is missing from the CSV/TSV header or the first JSON object (the message
        names the file, the column and the columns present), a ``.json`` file is not valid JSON or not a list, or a
        CSV/TSV file cannot be tokenised (file and line named).
    """
    path = Path(path)
    kind = file_format or _TABLE_EXTENSIONS.get(path.suffix.lower())
    if kind not in ("jsonl", "json", "csv", "tsv"):
        raise ValueError(f"{path}: cannot tell the table format from the extension; pass file_format=")
    root = path.parent if image_root is None else image_root
    rows = list(_checked_table_rows(path, kind, image_column, caption_column))
    explicit = [row.get(id_column) for _, row, _ in rows if row is not None and id_column]
    base = generated_id_base(ident for ident in explicit if not _is_missing_id(ident))
    records = [
        _table_record(path, where, row, problem, base + index, root, image_column, caption_column,
                      short_caption_column, id_column)
        for index, (where, row, problem) in enumerate(rows)
    ]
    _log_read_problems(path, [f"{where} ({problem})" for where, row, problem in rows if row is None])
    return records


def _checked_table_rows(
    path: Path,
    kind: str,
    image_column: str,
    caption_column: str,
    rows: Iterable[tuple[str, dict[str, Any] | None, str | None]] | None = None,
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """`_iter_table_rows` (or `rows`, the same triples from elsewhere) with the required columns checked: missing
    from the first object, a `ValueError` (a wrong column name); missing from a later one, that row becomes a
    problem (bad data)."""
    required = (image_column, caption_column)
    first = True
    if rows is None:
        rows = _iter_table_rows(path, kind, required if kind in ("csv", "tsv") else ())
    for where, row, problem in rows:
        if row is not None:
            missing = [column for column in required if column not in row]
            if missing and first:
                # The first object decides the layout: a missing column there is a wrong column name, not bad data.
                present = ", ".join(repr(c) for c in row) or "none"
                raise ValueError(f"{path}: missing column {missing[0]!r} ({where}); columns present: {present}")
            if missing:
                row, problem = None, f"no {missing[0]!r} key"
            first = False
        yield where, row, problem


def _table_record(
    path: Path,
    where: str,
    row: dict[str, Any] | None,
    problem: str | None,
    generated_id: Any,
    root: str | os.PathLike,
    image_column: str,
    caption_column: str,
    short_caption_column: str | None,
    id_column: str | None,
) -> dict[str, Any]:
    """The record of one table row (`generated_id`: its id when it states none); an unreadable row (`row` None)
    gives a record carrying `READ_ERROR_KEY`. Shared by `read_caption_table` and the record index."""
    if row is None:
        return {"image": None, "caption": None, "short_caption": None, "id": generated_id,
                READ_ERROR_KEY: f"{path}, {where}: {problem}"}
    short = row.get(short_caption_column) if short_caption_column else None
    ident = row.get(id_column) if id_column else None
    return {
        "image": resolve_image_path(row[image_column], root),
        "caption": row[caption_column],
        "short_caption": short if isinstance(short, str) and short.strip() else None,
        "id": generated_id if _is_missing_id(ident) else ident,
    }


def _log_read_problems(path: Path, problems: list[str], count: int | None = None) -> None:
    """The one warning per file naming its unreadable rows (``"line 7 (invalid JSON ...)"``): the first
    `_LOGGED_READ_ERRORS` of `problems`, and how many there are (`count`, default ``len(problems)``)."""
    count = len(problems) if count is None else count
    if count:
        shown = "; ".join(problems[:_LOGGED_READ_ERRORS])
        more = f"; and {count - _LOGGED_READ_ERRORS} more" if count > _LOGGED_READ_ERRORS else ""
        logger.warning(
            "%s: %d unreadable row(s) kept as bad records (skipped and counted as bad_record): %s%s",
            path, count, shown, more,
        )


def load_hf_dataset(
    name_or_path: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    image_column: str = "image",
    caption_column: str = "caption",
    short_caption_column: str | None = None,
    id_column: str | None = None,
    **load_kwargs: Any,
):
    """Load a Hugging Face dataset (Hub id, local folder, data file, or a `save_to_disk` folder) as caption records.

    The result keeps only the columns used, renamed to ``image``, ``caption`` and (when given) ``short_caption`` /
    ``id``. A `datasets.Image` column is cast to ``Image(decode=False)`` so rows carry ``{"bytes", "path"}`` and
    decoding happens in `load_image`, where a broken file is skipped instead of raising inside `datasets`.

    Args:
        name_or_path: Hub dataset id, a folder (``imagefolder`` with ``metadata.jsonl``, parquet files, or a
            `Dataset.save_to_disk` folder), or a ``.parquet`` / ``.arrow`` / ``.jsonl`` / ``.csv`` file.
        split (`str`, defaults to ``"train"``): the split to load.
        streaming (`bool`, defaults to `False`): return a `datasets.IterableDataset` (use
            `IterableLongCaptionDataset` over it).
        image_column / caption_column (`str`): source column names.
        short_caption_column / id_column (`str`, *optional*): source column names, used when the data has them
            (as in `read_caption_table`: absent means derived / the row index).
        **load_kwargs: passed to `datasets.load_dataset` (``name=``, ``revision=``, ``data_files=``, ...).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`.
    """
    from ..extras import require

    datasets = require("datasets", "train", "reading a `datasets` source")

    path = os.fspath(name_or_path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif os.path.isfile(path):
        builder = _HF_FILE_BUILDERS.get(Path(path).suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: no datasets builder for this extension; pass a folder or a Hub id")
        load_kwargs.setdefault("data_files", {split: path})
        dataset = datasets.load_dataset(builder, split=split, streaming=streaming, **load_kwargs)
    else:
        dataset = datasets.load_dataset(path, split=split, streaming=streaming, **load_kwargs)

    required = {image_column: "image", caption_column: "caption"}
    optional = {name: new for name, new in ((short_caption_column, "short_caption"), (id_column, "id")) if name}
    features = dataset.features
    if features is None:
        # A stream whose columns are unknown until read (e.g. JSON files without metadata): map rows on the fly.
        return dataset.map(_StandardColumns({**required, **optional}))
    present = list(features)
    missing = [name for name in required if name not in present]
    if missing:
        raise ValueError(
            f"{path} (split {split!r}): missing column {missing[0]!r}; columns present: "
            + ", ".join(repr(c) for c in present)
        )
    columns = {**required, **{name: new for name, new in optional.items() if name in present}}
    # Dropping unused columns first avoids reading other image columns and name clashes in the rename.
    dataset = dataset.select_columns(list(columns))
    if isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    renames = {old: new for old, new in columns.items() if old != new}
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset


class _StandardColumns:
    """Row function giving a streamed row the standard record keys (a class, so DataLoader workers can pickle it)."""

    def __init__(self, columns: Mapping[str, str]):
        self.columns = dict(columns)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {new: row.get(old) for old, new in self.columns.items()}


@dataclass
class TrainingSourceSpec:
    """Where training data comes from, as the trainer's configuration states it.

    Args:
        path (`str`): a file, a folder, or a Hub dataset id.
        format (`str`, defaults to ``"auto"``): one of `SOURCE_FORMATS`. ``"auto"``: a ``.json`` file whose first
            entry has ``conversations`` is ShareGPT4V, other ``.json`` / ``.jsonl`` / ``.csv`` / ``.tsv`` files are
            caption tables, tar shards (``shards/{00000..00099}.tar``, ``pipe:...``, ``https://.../x.tar``) are
            ``webdataset`` (a `shards.TarShardSource`), anything else (parquet, arrow, folders, Hub ids) goes to
            `load_hf_dataset`.
        image_root (`str`, *optional*): folder relative image paths are under (default: the file's folder).
        split (`str`, defaults to ``"train"``): ShareGPT4V: ``train`` / ``holdout`` / ``all``; HF: the split name.
            Ignored by caption tables.
        holdout (`int`, defaults to 1000): ShareGPT4V held-out head size.
        streaming (`bool`, defaults to `False`): HF only: stream.
        image_column / caption_column / short_caption_column / id_column: column names (tables and HF).
        load_kwargs (`dict`): extra `datasets.load_dataset` arguments.
        record_index (`str`, defaults to ``"auto"``): ShareGPT4V and caption-table files only: ``"auto"`` reads a file
            of `INDEX_MIN_BYTES` or more through a cached, memory-mapped `RecordIndex` (`hf_longclip.data.index`)
            and smaller files into a list; ``"always"`` / ``"never"`` force one or the other. Same records either way.
        index_dir (`str`, *optional*): where record indexes are cached (default: `default_index_dir`).
    """

    path: str
    format: str = "auto"
    image_root: str | None = None
    split: str = "train"
    holdout: int = 1000
    streaming: bool = False
    image_column: str = "image"
    caption_column: str = "caption"
    short_caption_column: str | None = "short_caption"
    id_column: str | None = "id"
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    record_index: str = "auto"
    index_dir: str | None = None


def _looks_like_sharegpt4v(path: Path, sniff_bytes: int = 65536) -> bool:
    """Whether a JSON file is a ShareGPT4V list, judged from its head (the real files are >1 GB: never parse twice)."""
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        head = handle.read(sniff_bytes)
    stripped = head.lstrip()
    if not stripped.startswith("["):
        return False
    first_object_end = stripped.find("}]", 0)  # a conversations list closes with "}]" inside the first entry
    window = stripped if first_object_end < 0 else stripped[: first_object_end + 2]
    return '"conversations"' in window


def detect_format(path: str | os.PathLike) -> str:
    """The format ``"auto"`` resolves to for `path` (see `TrainingSourceSpec`)."""
    from .shards import looks_like_shards

    if looks_like_shards(path):  # shards/{00000..00099}.tar, pipe:..., https://.../x.tar (docs/data.md)
        return "webdataset"
    local = Path(path)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".json":
            return "sharegpt4v" if _looks_like_sharegpt4v(local) else "json"
        if suffix in _TABLE_EXTENSIONS:
            return _TABLE_EXTENSIONS[suffix]
    return "hf"


def open_training_source(spec: TrainingSourceSpec | str | os.PathLike | Mapping[str, Any], **overrides: Any):
    """Open a training source described by `spec`.

    Args:
        spec: a `TrainingSourceSpec`, a mapping of its fields, or just a path / Hub id.
        **overrides: fields replacing those of `spec` (e.g. ``format="csv"``).

    Returns:
        `list[dict]` of records (ShareGPT4V, tables; a `RecordIndex` of the same records for a large file, see
        ``record_index``), or a `datasets.Dataset` / `datasets.IterableDataset` (HF) whose rows have the same keys.

    Example:

    ```python
    >>> from hf_longclip.data.sources import open_training_source
    >>> records = open_training_source(
    ...     "data/share-captioner_coco_lcs_sam_1246k_1107.json", image_root="data", split="train"
    ... )  # doctest: +SKIP
    ```
    """
    if isinstance(spec, TrainingSourceSpec):
        fields = dict(spec.__dict__)
    elif isinstance(spec, Mapping):
        fields = dict(spec)
    else:
        fields = {"path": os.fspath(spec)}
    fields.update(overrides)
    spec = TrainingSourceSpec(**fields)
    if spec.format not in SOURCE_FORMATS:
        raise ValueError(f"unknown format {spec.format!r}; expected one of {SOURCE_FORMATS}")
    kind = detect_format(spec.path) if spec.format == "auto" else spec.format
    if kind == "webdataset":
        from .shards import open_shards

        return open_shards(spec.path)
    if kind in ("sharegpt4v", "jsonl", "json", "csv", "tsv"):
        from .index import open_indexed_source, use_record_index

        if use_record_index(spec.path, spec.record_index):
            return open_indexed_source(spec, kind)
    if kind == "sharegpt4v":
        return read_sharegpt4v(spec.path, spec.image_root, split=spec.split, holdout=spec.holdout)
    if kind in ("jsonl", "json", "csv", "tsv"):
        # "jsonl" also names JSON tables generally: pick the reader by extension for a .json file.
        table_kind = "json" if kind == "jsonl" and Path(spec.path).suffix.lower() == ".json" else kind
        return read_caption_table(
            spec.path,
            spec.image_root,
            image_column=spec.image_column,
            caption_column=spec.caption_column,
            short_caption_column=spec.short_caption_column,
            id_column=spec.id_column,
            file_format=table_kind,
        )
    return load_hf_dataset(
        spec.path,
        split=spec.split,
        streaming=spec.streaming,
        image_column=spec.image_column,
        caption_column=spec.caption_column,
        short_caption_column=spec.short_caption_column,
        id_column=spec.id_column,
        **spec.load_kwargs,
    )


__all__ = [
    "READ_ERROR_KEY",
    "RECORD_KEYS",
    "SOURCE_FORMATS",
    "TrainingSourceSpec",
    "detect_format",
    "generated_id_base",
    "load_hf_dataset",
    "open_training_source",
    "read_caption_table",
    "read_sharegpt4v",
    "sharegpt4v_caption",
    "resolve_image_path",
]
