"""The memory-mapped record index (hf_longclip.data.index): the same records as the in-memory readers, cache reuse
and invalidation, atomic builds, concurrent builders, pickling, and a training run that matches the in-memory path."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_longclip.data import LongCaptionDataset, validate_records
from hf_longclip.data import index as index_module
from hf_longclip.data.index import RecordIndex, _iter_json_list, open_record_index, use_record_index
from hf_longclip.data.sources import (
    TrainingSourceSpec,
    open_training_source,
    read_caption_table,
    read_sharegpt4v,
)

pytest.importorskip("pyarrow")

@pytest.fixture(autouse=True)
def index_dir(tmp_path, monkeypatch):
    """Every index of these tests goes to a temporary folder (the default one too)."""
    folder = tmp_path / "index-cache"
    monkeypatch.setenv(index_module.INDEX_DIR_ENV, str(folder))
    return folder


def _gpt(value):
    return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": value}]


#: ShareGPT4V entries covering what the reader must carry through unchanged.
SHAREGPT4V_ENTRIES = [
    {"id": "000000000009", "image": "coco/a.jpg", "conversations": _gpt("A dog.\nIt runs.\n\nFast.")},
    {"image": "/abs/b.jpg", "conversations": _gpt("An absolute path. Second sentence.")},
    ["not", "an", "object"],                                            # not a mapping: an empty entry
    {"image": "c.jpg"},                                                 # no conversations: caption None
    {"image": 17, "conversations": _gpt(42)},                           # a number as image and as caption
    {"image": "https://x.org/d.jpg", "conversations": [{"from": "system", "value": "s"},
                                                      {"from": "human", "value": "h"},
                                                      {"from": "gpt", "value": "After a system turn."}]},
    {"image": "e.jpg", "conversations": _gpt("   ")},                   # an empty caption
    {"image": "f.jpg", "conversations": _gpt("Ünïcödé ✓ and a lone \udc80 surrogate.")},
    {"image": {"path": "g.jpg"}, "conversations": _gpt(["a", "list", 1.5, None, {"k": True}])},
    {"image": "h.jpg", "conversations": _gpt("x" * 5000)},
    {"image": None, "conversations": _gpt("No image.")},
    {"image": "i.jpg", "conversations": _gpt("Number edge 1e400 stays text.")},
]


def _write_sharegpt4v(path: Path, entries=SHAREGPT4V_ENTRIES, bom: bool = True, indent=None) -> Path:
    text = json.dumps(entries, indent=indent)  # ensure_ascii: the lone surrogate is an escape, as in real files
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _table_rows_jsonl(folder: Path) -> Path:
    lines = [
        b'\xef\xbb\xbf{"image": "a.png", "caption": "A cat. It sits.", "id": 7, "short_caption": "cat"}',
        b'{"image": "b.png", "caption": "No id here.", "short_caption": "  "}',
        b"",                                                             # a blank line: not a row
        b'{"image": "c.png", "caption": "Broken',                        # invalid JSON
        b'[1, 2, 3]',                                                    # not an object
        b'{"image": "d.png", "caption": "Bytes \xff\xfe not UTF-8"}',    # not UTF-8
        b'{"image": "e.png"}',                                           # a later object without the caption key
        b'{"image": "f.png", "caption": "String id.", "id": "abc"}',
        b'{"image": "g.png", "caption": "Integer string id.", "id": "12"}',
        b'{"image": "h.png", "caption": "Float id.", "id": 3.0}',
        b'{"image": "i.png", "caption": "List id.", "id": [1]}',
        b'{"image": "j.png", "caption": "Bool id.", "id": true}',
        b'{"image": "k.png", "caption": "", "id": null}',
        b'{"image": "l.png", "caption": 5}',
        b'{"image": "m.png", "caption": "Huge id.", "id": 123456789012345678901234567890}',
        b'{"image": "n.png", "caption": "Ideographic space only next."}',
        '{"image": "o.png", "caption": "\u3000\u2003"}'.encode("utf-8"),
        b'{"image": "p.png", "caption": "NaN id.", "id": NaN}',
    ]
    path = folder / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _csv(folder: Path, delimiter: str = ",") -> Path:
    d = delimiter
    text = (
        f"\ufeffimage{d}caption{d}short_caption\n"
        f'a.png{d}"A caption, with a comma. Two."{d}short\n'
        f'b.png{d}"Multi\nline caption."{d}\n'
        f"\n"
        f"c.png{d}too{d}many{d}fields\n"
        f"d.png{d}fine caption{d}\n"
    ).encode() + f"e.png{d}bad \xff bytes{d}\n".encode("latin-1") + f"f.png{d}last{d}s\n".encode()
    path = folder / ("pairs.csv" if delimiter == "," else "pairs.tsv")
    path.write_bytes(text)
    return path


def _assert_same_records(indexed, reference):
    assert len(indexed) == len(reference)
    assert list(indexed) == reference  # iteration (batch-wise conversion)
    for position, record in enumerate(reference):  # random access, and the exact types
        got = indexed[position]
        assert got == record or (got.keys() == record.keys() and json.dumps(got) == json.dumps(record)), position
        assert list(got) == list(record)
        assert [type(value) for value in got.values()] == [type(value) for value in record.values()], position
    if reference:
        assert indexed[-1] == reference[-1]


# ------------------------------------------------------------------------------------------------ same records
def test_sharegpt4v_index_gives_the_reader_records_and_splits(tmp_path, index_dir):
    path = _write_sharegpt4v(tmp_path / "share.json")
    everything = open_record_index(path, index_dir=index_dir)
    _assert_same_records(everything, read_sharegpt4v(path, split="all"))
    for split in ("train", "holdout", "all"):
        for holdout in (0, 3, 100):
            expected = read_sharegpt4v(path, split=split, holdout=holdout)
            _assert_same_records(everything.sharegpt4v_split(split, holdout), expected)
            spec = TrainingSourceSpec(path=str(path), split=split, holdout=holdout, record_index="always")
            opened = open_training_source(spec)
            assert isinstance(opened, RecordIndex)
            _assert_same_records(opened, expected)
    root = tmp_path / "images"
    _assert_same_records(open_record_index(path, image_root=root), read_sharegpt4v(path, root, split="all"))
    # views of views, select, negative indices
    view = everything[2:10:2]
    assert list(view) == read_sharegpt4v(path, split="all")[2:10:2]
    assert list(everything.select([5, 0, 5])) == [everything[5], everything[0], everything[5]]
    assert list(everything.select(range(1, 4))) == list(everything)[1:4]
    with pytest.raises(IndexError):
        everything[len(everything)]
    with pytest.raises(IndexError):
        everything.select([len(everything)])


def test_records_spread_over_many_batches_read_the_same(tmp_path, monkeypatch):
    """Row lookups across Arrow batch boundaries, chunked iteration and views over several batches."""
    monkeypatch.setattr(index_module, "_BATCH_ROWS", 4)
    monkeypatch.setattr(index_module, "_ITER_ROWS", 3)
    path = _table_rows_jsonl(tmp_path)
    indexed, reference = open_record_index(path), read_caption_table(path)
    assert len(indexed._mapped.starts) == 5  # 17 rows in batches of 4
    _assert_same_records(indexed, reference)
    for start, stop, step in [(1, 15, 1), (3, 17, 2), (16, 2, -3), (0, 0, 1)]:
        assert list(indexed[start:stop:step]) == reference[start:stop:step]
    assert validate_records(indexed[5:], check_files=False).bad == validate_records(reference[5:], check_files=False).bad


def test_sharegpt4v_indented_file_and_trainer_holdout_log(tmp_path, caplog):
    """An indented file (the released one's layout) reads the same; `training_records` logs the same holdout line
    for the indexed and the in-memory path."""
    from hf_longclip.training.arguments import DataArguments
    from hf_longclip.training.data import training_records

    path = _write_sharegpt4v(tmp_path / "share.json", indent=4, bom=False)
    logs, results = [], []
    for mode in ("never", "always"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_longclip.training.data"):
            records = training_records(DataArguments(train_data=str(path), holdout=4, record_index=mode), tmp_path)
        logs.append([r.getMessage() for r in caplog.records if r.name == "hf_longclip.training.data"])
        results.append(list(records))
    assert isinstance(records, RecordIndex)
    assert results[0] == results[1] == read_sharegpt4v(path, split="train", holdout=4)
    assert logs[0] == logs[1] and any("4 of 12 records held out" in line for line in logs[0])


@pytest.mark.parametrize("chunk", [1, 2, 7, 64])
def test_streaming_json_parser_matches_json_load(tmp_path, chunk):
    values = [1, 22, 333, -4.5e3, 0, "str", [], {}, {"a": [1, {"b": None}]}, True, False, None, 12345678901234567890]
    path = tmp_path / "values.json"
    path.write_text(" \n[ " + " ,\n\t".join(json.dumps(v) for v in values) + " ]\r\n", encoding="utf-8")
    assert list(_iter_json_list(path, chunk)) == json.loads(path.read_text(encoding="utf-8"))
    path.write_text("[]", encoding="utf-8")
    assert list(_iter_json_list(path, chunk)) == []


@pytest.mark.parametrize(
    "text",
    [
        '[{"image": "a.jpg", "conversations": []}, {"image": "b.jp',           # truncated download
        '[{"image": "a.jpg", "conversations": []},]',                           # trailing comma
        '[{"image": "a.jpg", "conversations": []}] extra',                      # extra data
        '{"image": "a.jpg", "conversations": []}',                              # not a list
        '[{"image": "a.jpg", "conversations": []} {"image": "b.jpg"}]',         # missing comma
    ],
    ids=["truncated", "trailing-comma", "extra-data", "not-a-list", "missing-comma"],
)
def test_invalid_sharegpt4v_file_raises_the_reader_error(tmp_path, text):
    path = tmp_path / "share.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as reference:
        read_sharegpt4v(path, split="all")
    with pytest.raises(ValueError) as indexed:
        open_record_index(path, "sharegpt4v")
    assert str(indexed.value) == str(reference.value)
    assert not any(p.suffix == ".arrow" for p in Path(os.environ[index_module.INDEX_DIR_ENV]).glob("*"))


def test_non_utf8_sharegpt4v_file_raises_the_reader_error(tmp_path):
    path = tmp_path / "share.json"
    path.write_bytes(b'[{"image": "a.jpg", "conversations": [{"from": "gpt", "value": "\xff"}]}]')
    with pytest.raises(ValueError) as reference:
        read_sharegpt4v(path, split="all")
    with pytest.raises(ValueError) as indexed:
        open_record_index(path, "sharegpt4v")
    assert str(indexed.value) == str(reference.value)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_jsonl_table_index_gives_the_reader_records_bad_rows_and_warning(tmp_path, caplog):
    path = _table_rows_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING):
        reference = read_caption_table(path)
    expected_warnings = _warnings(caplog)
    assert expected_warnings and "4 unreadable row(s)" in expected_warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        indexed = open_record_index(path)
    assert _warnings(caplog) == expected_warnings  # the same one warning, naming the same lines
    _assert_same_records(indexed, reference)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = open_record_index(path)  # reused, and the warning is given again, as every read gives it
    assert not again.info["built"] and _warnings(caplog) == expected_warnings
    # the same skips, counted the same: the start-up check (with and without files) and the dataset itself
    for check_files in (False, True):
        a = validate_records(indexed, check_files=check_files)
        b = validate_records(reference, check_files=check_files)
        assert (a.total, a.bad, a.examples, a.checked_files) == (b.total, b.bad, b.examples, b.checked_files)
        # invalid ids: [1], true, an integer beyond 64 bits, and the 3 generated ones of rows with a good caption:
        # that huge explicit id pushes every generated id (one past the largest + row) beyond 64 bits too
        assert a.bad.get("bad_record") == 4 and a.bad.get("invalid_id") == 6
    with pytest.raises(ValueError) as strict_reference:
        validate_records(reference, strict=True, check_files=False)
    with pytest.raises(ValueError) as strict_indexed:
        validate_records(indexed, strict=True, check_files=False)
    assert str(strict_indexed.value) == str(strict_reference.value)
    # a view validates as its own list does
    view = indexed[3:]
    a, b = validate_records(view, check_files=False), validate_records(reference[3:], check_files=False)
    assert (a.total, a.bad, a.examples) == (b.total, b.bad, b.examples)


def test_dataset_over_the_index_gives_the_same_samples(tmp_path):
    path = _table_rows_jsonl(tmp_path)
    for name in ("a.png", "b.png", "f.png", "h.png"):  # g.png (a valid explicit id) is missing
        Image.fromarray(np.full((8, 8, 3), ord(name[0]), np.uint8)).save(tmp_path / name)

    def transform(image):
        return torch.tensor(np.asarray(image), dtype=torch.float32).mean()

    a = LongCaptionDataset(open_record_index(path), transform)
    b = LongCaptionDataset(read_caption_table(path), transform)
    assert len(a) == len(b)
    reasons = []
    for i in range(len(b)):
        x, y = a[i], b[i]
        assert type(x) is type(y)
        if isinstance(y, dict):
            assert x.keys() == y.keys() and all(
                torch.equal(x[k], y[k]) if isinstance(y[k], torch.Tensor) else x[k] == y[k] for k in y
            )
        else:
            assert x == y
            reasons.append(y.reason)
    assert sorted(set(reasons)) == ["bad_record", "empty_caption", "invalid_id", "missing", "non_string_caption"]


@pytest.mark.parametrize("delimiter", [",", "\t"], ids=["csv", "tsv"])
def test_csv_and_tsv_index_gives_the_reader_records(tmp_path, delimiter, caplog):
    path = _csv(tmp_path, delimiter)
    with caplog.at_level(logging.WARNING):
        reference = read_caption_table(path)
    expected = _warnings(caplog)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        indexed = open_record_index(path)
    _assert_same_records(indexed, reference)
    assert _warnings(caplog) == expected and "2 unreadable row(s)" in expected[0]
    assert reference[0]["image"].endswith("a.png")  # the BOM did not end up in the column name
    # other columns and options index separately, and give what the reader gives with them
    renamed = open_record_index(path, short_caption_column=None, id_column=None, image_root=tmp_path / "imgs")
    _assert_same_records(renamed, read_caption_table(path, tmp_path / "imgs", short_caption_column=None,
                                                     id_column=None))
    assert renamed.file != indexed.file


def test_json_table_and_missing_columns(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "A.", "id": 3}, 7, {"image": "b.png", "caption": "B."},
                                {"image": "c.png"}]), encoding="utf-8")
    _assert_same_records(open_record_index(path), read_caption_table(path))
    spec = TrainingSourceSpec(path=str(path), format="jsonl", record_index="always")  # "jsonl" names JSON tables
    _assert_same_records(open_training_source(spec), read_caption_table(path, file_format="json"))
    for name, text in [("bad.csv", "img,caption\na.png,x\n"), ("bad.jsonl", '{"img": "a.png", "caption": "x"}\n')]:
        bad = tmp_path / name
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError) as reference:
            read_caption_table(bad)
        with pytest.raises(ValueError) as indexed:
            open_record_index(bad)
        assert str(indexed.value) == str(reference.value) and "missing column 'image'" in str(indexed.value)


def test_auto_mode_indexes_only_large_files(tmp_path, monkeypatch):
    path = _write_sharegpt4v(tmp_path / "share.json")
    assert not use_record_index(path, "auto") and use_record_index(path, "always")
    assert not use_record_index(path, "never")
    assert isinstance(open_training_source(str(path)), list)
    monkeypatch.setattr(index_module, "INDEX_MIN_BYTES", path.stat().st_size)
    assert use_record_index(path, "auto")
    assert isinstance(open_training_source(str(path)), RecordIndex)
    with pytest.raises(ValueError, match="record_index must be one of"):
        use_record_index(path, "sometimes")


# ------------------------------------------------------------------------------------------------ the cache
def test_second_open_reuses_the_index_and_a_changed_file_rebuilds(tmp_path, index_dir, monkeypatch):
    path = _table_rows_jsonl(tmp_path)
    first = open_record_index(path)
    assert first.info["built"] and first.file.parent == index_dir

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although nothing changed")

    real_build = index_module._write_index
    monkeypatch.setattr(index_module, "_write_index", no_build)
    second = open_record_index(path)
    assert not second.info["built"] and second.file == first.file
    _assert_same_records(second, read_caption_table(path))

    # appended rows: size and mtime change
    monkeypatch.setattr(index_module, "_write_index", real_build)
    with open(path, "ab") as handle:
        handle.write(b'{"image": "z.png", "caption": "Appended."}\n')
    third = open_record_index(path)
    assert third.info["built"] and third.file != first.file
    _assert_same_records(third, read_caption_table(path))
    assert not first.file.exists()  # the stale version is pruned
    assert first[0] == read_caption_table(path)[0]  # ... while still readable through an open map

    # the same size and modification time, other contents: the head/tail digest tells
    stat = path.stat()
    data = path.read_bytes().replace(b"Appended.", b"Different")
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    fourth = open_record_index(path)
    assert fourth.info["built"] and fourth[-1]["caption"] == "Different"

    # rebuild=True builds even though a valid index exists
    assert open_record_index(path, rebuild=True).info["built"]


def test_index_of_another_format_version_is_rebuilt(tmp_path, monkeypatch):
    path = _write_sharegpt4v(tmp_path / "share.json")
    first = open_record_index(path)
    monkeypatch.setattr(index_module, "INDEX_FORMAT_VERSION", index_module.INDEX_FORMAT_VERSION + 1)
    again = open_record_index(path)
    assert again.info["built"] and again.file != first.file
    _assert_same_records(again, read_sharegpt4v(path, split="all"))


# ------------------------------------------------------------------------------------------------ atomic builds
def test_a_killed_build_leaves_nothing_that_is_read(tmp_path, index_dir, monkeypatch):
    path = _write_sharegpt4v(tmp_path / "share.json")
    calls = {"n": 0}
    real_add = index_module._IndexWriter.add

    def dying_add(self, record, generated):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # what a killed build looks like from inside
        real_add(self, record, generated)

    monkeypatch.setattr(index_module._IndexWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        open_record_index(path)
    assert not list(index_dir.glob("*.arrow")) and not list(index_dir.glob(".*tmp*"))
    monkeypatch.setattr(index_module._IndexWriter, "add", real_add)
    _assert_same_records(open_record_index(path), read_sharegpt4v(path, split="all"))


def test_a_truncated_or_foreign_index_file_is_never_used(tmp_path, index_dir):
    path = _write_sharegpt4v(tmp_path / "share.json")
    good = open_record_index(path)
    data = good.file.read_bytes()
    reference = read_sharegpt4v(path, split="all")
    # a half-written file under the final name (as a non-atomic writer would leave): rejected, rebuilt
    for broken in (data[: len(data) // 2], data[:-10], b"", b"ARROW1" + b"\0" * 100):
        good.file.write_bytes(broken)
        again = open_record_index(path)
        assert again.info["built"]
        _assert_same_records(again, reference)
    # a complete index of another file copied over this one's name: its key does not match, so it is rebuilt
    other = _write_sharegpt4v(tmp_path / "other.json", SHAREGPT4V_ENTRIES[:3])
    good.file.write_bytes(open_record_index(other).file.read_bytes())
    again = open_record_index(path)
    assert again.info["built"] and len(again) == len(reference)
    # a temporary file of a build in progress is not an index: it is neither read nor removed while fresh
    temp = good.file.with_name(f".{good.file.name}.tmp-999999-deadbeef")
    temp.write_bytes(data[:100])
    good.file.unlink()
    rebuilt = open_record_index(path)
    assert rebuilt.info["built"] and temp.exists()
    _assert_same_records(rebuilt, reference)


def test_concurrent_builders_without_the_lock_still_publish_a_valid_index(tmp_path, monkeypatch):
    """The lock is an optimisation: with it disabled, racing builders each write their own temporary file and
    rename it into place, and every one of them ends up with a correct index."""
    import contextlib

    path = _table_rows_jsonl(tmp_path)
    monkeypatch.setattr(index_module, "_build_lock", lambda file: contextlib.nullcontext())
    barrier = threading.Barrier(3)
    results, errors = [], []

    def build():
        try:
            barrier.wait()
            results.append(open_record_index(path))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    reference = read_caption_table(path)
    for index in results:
        _assert_same_records(index, reference)
    assert len(list(Path(os.environ[index_module.INDEX_DIR_ENV]).glob("*.arrow"))) == 1


def _open_in_child(path, barrier, results):
    """A forked process: wait until both are ready, open the index, report whether it built it and what it read."""
    import hashlib

    barrier.wait()
    index = open_record_index(path, "sharegpt4v")
    digest = hashlib.sha256(json.dumps(list(index)).encode()).hexdigest()
    results.put({"built": index.info["built"], "digest": digest})


def test_two_processes_opening_at_once_get_a_correct_index(tmp_path):
    """Two processes (forked: they only read files and write Arrow, no torch) open a missing index at the same
    moment: one builds it, the other waits for it, and both read exactly the in-memory records."""
    import hashlib
    import multiprocessing

    entries = [{"image": f"{i}.jpg", "conversations": _gpt(f"Caption {i}. " * 20)} for i in range(5000)]
    path = _write_sharegpt4v(tmp_path / "share.json", entries)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_open_in_child, args=(path, barrier, results)) for _ in range(2)]
    for child in children:
        child.start()
    found = [results.get(timeout=300) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    expected = hashlib.sha256(json.dumps(read_sharegpt4v(path, split="all")).encode()).hexdigest()
    assert [r["digest"] for r in found] == [expected, expected]
    assert sorted(r["built"] for r in found) == [False, True]  # one built it, the other waited and reused it
    assert len(list(Path(os.environ[index_module.INDEX_DIR_ENV]).glob("*.arrow"))) == 1


def test_pickled_index_maps_the_same_file(tmp_path):
    path = _write_sharegpt4v(tmp_path / "share.json")
    view = open_record_index(path).sharegpt4v_split("train", 2).select([4, 1, 3])
    copy = pickle.loads(pickle.dumps(view))
    assert list(copy) == list(view) and copy.file == view.file
    dataset = pickle.loads(pickle.dumps(LongCaptionDataset(view)))  # what a spawned DataLoader worker receives
    assert dataset.records[0] == view[0]
    data = pickle.dumps(view)
    view.file.unlink()
    with pytest.raises(FileNotFoundError, match="record index is gone"):
        pickle.loads(data)


# ------------------------------------------------------------------------------------------------ training
TINY = [
    "--base", "tiny-random", "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "4",
    "--tiny_projection_dim", "32", "--tiny_image_size", "32", "--tiny_patch_size", "16",
    "--num_workers", "0", "--disable_progress_bar", "true", "--learning_rate", "1e-3", "--warmup_steps", "1",
    "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_steps", "0", "--save_final_model", "false",
    "--eval_before_training", "false", "--logging_steps", "1",
]


def test_training_on_an_indexed_source_gives_the_same_losses(tmp_path):
    """A few steps of a tiny model on a ShareGPT4V file: read through the index (with a bad entry and a missing
    image among the records) or into memory, the losses and the skip counts are the same."""
    from hf_longclip.training import main as train

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    entries = [{"image": f"{i % 6}.png", "conversations": _gpt(f"A picture number {i}. It has {i} dots.")}
               for i in range(20)]
    entries[9] = {"image": "missing.png", "conversations": _gpt("Not there.")}
    entries[12] = ["not an entry"]
    path = _write_sharegpt4v(tmp_path / "share.json", entries)
    summaries = {}
    for mode in ("never", "always"):
        summaries[mode] = train([
            *TINY, "--train_data", str(path), "--holdout", "4", "--record_index", mode,
            "--index_dir", str(tmp_path / "index"), "--output_dir", str(tmp_path / mode),
        ])
    a, b = summaries["never"], summaries["always"]
    assert a["global_step"] == b["global_step"] == 3
    assert a["first_loss_terms"] == b["first_loss_terms"] and a["last_loss_terms"] == b["last_loss_terms"]
    assert a["skipped_samples"] == b["skipped_samples"] and a["skipped_samples"]
    assert list((tmp_path / "index").glob("*.arrow"))


def test_an_unwritable_cache_folder_says_what_to_do(tmp_path):
    path = _write_sharegpt4v(tmp_path / "share.json")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot write the record index .*index_dir.*record_index='never'"):
        open_record_index(path, index_dir=blocker / "index")


def test_build_index_command(tmp_path, capsys, index_dir):
    from hf_longclip.cli import main

    path = _write_sharegpt4v(tmp_path / "share.json")
    assert main(["build-index", "--input", str(path)]) == 0
    first = capsys.readouterr().out
    assert first.startswith("built: ") and f"{len(SHAREGPT4V_ENTRIES)} records" in first
    assert main(["build-index", "--input", str(path)]) == 0
    assert capsys.readouterr().out.startswith("up to date: ")
    # what training then opens is that index, not a new one
    assert not open_record_index(path).info["built"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg", "conversations": []}, {"im', encoding="utf-8")
    assert main(["build-index", "--input", str(broken), "--format", "sharegpt4v"]) == 1
    assert "not a valid ShareGPT4V JSON file" in capsys.readouterr().err
