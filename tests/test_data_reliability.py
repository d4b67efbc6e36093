"""Reliability of the training-data pipeline on hostile inputs: special files and unbounded reads, strict mode
through DataLoader workers, skip accounting of distinct samples and visits, and table readers on malformed lines,
byte-order marks, truncated JSON and unusable or colliding ids. Every fixture is built in tmp_path."""

import builtins
import codecs
import csv
import json
import logging
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_longclip.data import (
    BadSampleError,
    FineLIPCollator,
    IterableLongCaptionDataset,
    LongCaptionDataset,
    LongCLIPCollator,
    SkipCounter,
    SkipCountingCollator,
    SkippedSample,
    make_dataloader,
    open_training_source,
    read_caption_table,
    read_sharegpt4v,
    transform_from_processor,
    validate_records,
)
from hf_longclip.data.dataset import normalise_record_id
from hf_longclip.data.images import (
    BAD_IMAGE_REASONS,
    DEFAULT_MAX_IMAGE_BYTES,
    BadImageError,
    image_source_exists,
    load_image,
)
from hf_longclip.data.sources import detect_format, generated_id_base
from hf_longclip.testing_utils import tiny_processor


def _png(path, size=(24, 16), seed=0):
    rng = np.random.RandomState(seed)
    Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _within(seconds, function, *args, unblock=None, **kwargs):
    """Run `function` in a thread and return its result (or raise its exception); fail the test if it has not
    finished after `seconds` (first calling `unblock`, so that a thread stuck on a FIFO can end)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"{getattr(function, '__name__', function)} did not finish within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _reason(source, **kwargs):
    try:
        load_image(source, **kwargs)
    except BadImageError as error:
        return error.reason
    return None


# ----------------------------------------------------------------------------------------------- item 3
@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe.png"
    os.mkfifo(path)

    def unblock():  # a reader blocked in open() returns once a writer opens the other end
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    return path, unblock


def test_fifo_is_a_counted_skip_and_is_never_opened(fifo, monkeypatch):
    path, unblock = fifo
    opened = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(os.fspath(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)

    assert "not_a_file" in BAD_IMAGE_REASONS
    with pytest.raises(BadImageError) as info:
        _within(5, load_image, str(path), unblock=unblock)
    assert info.value.reason == "not_a_file" and "FIFO" in info.value.detail and str(path) in info.value.detail
    assert _within(5, _reason, {"bytes": None, "path": str(path)}, unblock=unblock) == "not_a_file"
    assert _within(5, image_source_exists, str(path), unblock=unblock) == "not_a_file"
    assert str(path) not in opened  # checked with os.stat, never opened (opening a FIFO blocks)

    records = [{"image": str(path), "caption": "a pipe"}]
    report = _within(5, validate_records, records, unblock=unblock)
    assert report.bad == {"not_a_file": 1}
    with pytest.raises(BadSampleError, match="index 0 .*pipe.png.*: not_a_file"):
        _within(5, validate_records, records, strict=True, unblock=unblock)
    sample = _within(5, LongCaptionDataset(records).__getitem__, 0, unblock=unblock)
    assert isinstance(sample, SkippedSample) and sample.reason == "not_a_file"
    assert str(path) not in opened


def test_devices_directories_and_links_to_them_are_not_files(tmp_path):
    assert _reason(str(tmp_path)) == "not_a_file"
    assert image_source_exists(str(tmp_path)) == "not_a_file"
    for device in ("/dev/zero", "/dev/urandom"):
        if not os.path.exists(device) or not stat.S_ISCHR(os.stat(device).st_mode):
            continue
        # an endless source: refused from its stat in well under a second, nothing read
        assert _within(5, _reason, device) == "not_a_file"
        assert _within(5, _reason, device, max_image_bytes=None) == "not_a_file"
        assert _within(5, image_source_exists, device) == "not_a_file"
        link = tmp_path / f"{Path(device).name}.jpg"
        link.symlink_to(device)
        assert _within(5, _reason, str(link)) == "not_a_file"  # links are followed to what they point at
        with pytest.raises(BadImageError, match="character device"):
            load_image(str(link))


def test_image_reads_are_bounded_by_max_image_bytes(tmp_path):
    assert DEFAULT_MAX_IMAGE_BYTES == 256 * 1024 * 1024
    path = _png(tmp_path / "noise.png", size=(64, 64))
    size = os.path.getsize(path)
    assert size > 1000
    assert load_image(path).size == (64, 64)  # the default limit lets real images through
    assert load_image(path, max_image_bytes=size).size == (64, 64)  # the limit itself is allowed
    with pytest.raises(BadImageError) as info:
        load_image(path, max_image_bytes=1000)
    assert info.value.reason == "too_large" and "max_image_bytes=1000" in info.value.detail
    data = Path(path).read_bytes()
    for source in (data, bytearray(data), memoryview(data), {"bytes": data, "path": "x.png"}):
        assert _reason(source, max_image_bytes=1000) == "too_large"
    assert image_source_exists(path, max_image_bytes=1000) == "too_large"
    assert image_source_exists(path) is None  # the pre-flight size check only runs when a limit is given

    # the limit reaches load_image from the datasets and the pre-flight check
    records = [{"image": path, "caption": "noise"}]
    assert LongCaptionDataset(records, max_image_bytes=1000)[0].reason == "too_large"
    assert "image" in LongCaptionDataset(records)[0]
    assert [s.reason for s in IterableLongCaptionDataset(records, max_image_bytes=1000)] == ["too_large"]
    assert validate_records(records, max_image_bytes=1000).bad == {"too_large": 1}


def test_read_stops_after_limit_plus_one_byte_even_when_stat_says_zero(monkeypatch):
    """A regular file whose stat size says nothing about its content (procfs reports 0 bytes): the read itself is
    bounded to limit + 1 bytes, so the file is reported as too large rather than read whole."""
    procfs = "/proc/self/maps"
    if not os.path.isfile(procfs) or os.stat(procfs).st_size != 0:
        pytest.skip("needs Linux procfs")
    assert _reason(procfs, max_image_bytes=64) == "too_large"

    requested = []
    real_open = builtins.open

    class CountingReader:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def read(self, size=-1):
            requested.append(size)
            return self.handle.read(size)

    def spy_open(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)
        return CountingReader(handle) if isinstance(file, int) else handle

    monkeypatch.setattr(builtins, "open", spy_open)
    assert _reason(procfs, max_image_bytes=64) == "too_large"
    assert requested == [65]


# ----------------------------------------------------------------------------------------------- item 5
def _strict_records(tmp_path, bad_index=5, count=8):
    records = [{"image": _png(tmp_path / f"good{i}.png", seed=i), "caption": f"picture {i}. it is nice."}
               for i in range(count)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    records[bad_index] = {"image": str(empty), "caption": "an empty file"}
    return records, empty


def _first_strict_error(loader):
    for batch in loader:
        if batch.get("strict_error"):
            return batch
    return None


def test_strict_error_is_one_line_with_and_without_workers(tmp_path):
    records, empty = _strict_records(tmp_path)
    processor = tiny_processor()
    dataset = LongCaptionDataset(records, transform_from_processor(processor), strict=True)
    collator = SkipCountingCollator(LongCLIPCollator(processor))
    expected = f"bad sample at index 5 (image {empty}): empty ({empty} has 0 bytes)"

    errors = {}
    for workers in (0, 2):
        loader = make_dataloader(dataset, collator, batch_size=3, shuffle=False, num_workers=workers,
                                 drop_last=False)
        batch = _first_strict_error(loader)
        assert batch is not None, f"num_workers={workers}: no strict_error"
        assert "pixel_values" not in batch and batch["skipped"] == {"empty": [5]}
        errors[workers] = batch["strict_error"]
    assert errors[0] == errors[2] == expected
    assert "\n" not in errors[2]
    # what the training loop does with it
    with pytest.raises(ValueError, match=r"^bad sample at index 5 .*empty\.png.*: empty"):
        raise ValueError(errors[2])

    # a batch without a bad sample is collated as usual, and a non-strict dataset never reports strict_error
    first = next(iter(make_dataloader(dataset, collator, batch_size=3, shuffle=False, num_workers=2)))
    assert "strict_error" not in first and first["pixel_values"].shape[0] == 3
    lenient = LongCaptionDataset(records, transform_from_processor(processor))
    batches = list(make_dataloader(lenient, collator, batch_size=3, shuffle=False, num_workers=2, drop_last=False))
    assert not any("strict_error" in b for b in batches)


def test_streamed_strict_error_is_the_same_line_through_workers(tmp_path):
    records, empty = _strict_records(tmp_path, bad_index=3)
    processor = tiny_processor()
    collator = SkipCountingCollator(LongCLIPCollator(processor))
    errors = {}
    for workers in (0, 2):
        dataset = IterableLongCaptionDataset(records, transform_from_processor(processor), strict=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=workers)
        batch = _first_strict_error(loader)
        assert batch is not None, f"num_workers={workers}: no strict_error"
        errors[workers] = batch["strict_error"]
    assert errors[0] == errors[2] == f"bad sample at index 3 (image {empty}): empty ({empty} has 0 bytes)"


# ----------------------------------------------------------------------------------------------- item 6
def test_skip_counter_separates_distinct_samples_from_visits_over_epochs(tmp_path):
    good = [_png(tmp_path / f"g{i}.png", seed=i) for i in range(4)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not an image" * 8)
    records = [
        {"image": good[0], "caption": "one"},
        {"image": str(corrupt), "caption": "broken"},
        {"image": good[1], "caption": "two"},
        {"image": str(tmp_path / "gone.png"), "caption": "missing"},
        {"image": good[2], "caption": "   "},
        {"image": str(corrupt), "caption": "broken again"},
        {"image": good[3], "caption": "three"},
        {"image": good[0], "caption": "four"},
    ]
    processor = tiny_processor()
    dataset = LongCaptionDataset(records, transform_from_processor(processor))
    loader = make_dataloader(dataset, SkipCountingCollator(LongCLIPCollator(processor)), batch_size=3,
                             shuffle=True, drop_last=False, seed=1)
    counter = SkipCounter()
    for _epoch in range(2):
        for batch in loader:
            counter.update(batch.pop("skipped"))
    assert counter.total == 4 and counter.visits == 8
    assert counter.samples_by_reason() == {"corrupt": 2, "empty_caption": 1, "missing": 1}
    assert counter.visits_by_reason() == {"corrupt": 4, "empty_caption": 2, "missing": 2}
    assert counter.summary() == (
        "skipped 4 distinct samples (8 visits): corrupt 2 (4 visits), empty_caption 1 (2 visits), "
        "missing 1 (2 visits)"
    )
    assert counter.as_dict() == {
        "corrupt": {"samples": [1, 5], "visits": 4},
        "empty_caption": {"samples": [4], "visits": 2},
        "missing": {"samples": [3], "visits": 2},
    }

    # checkpoints hold as_dict() as JSON: it round-trips through the constructor and through update()
    restored = SkipCounter(json.loads(json.dumps(counter.as_dict())))
    assert restored.as_dict() == counter.as_dict() and restored.summary() == counter.summary()
    merged = SkipCounter()
    merged.update(json.loads(json.dumps(counter.as_dict())))
    assert merged.as_dict() == counter.as_dict()
    # resumed: another visit of a known sample adds a visit, not a sample
    restored.update({"corrupt": [5]})
    assert restored.total == 4 and restored.visits == 9
    restored.reset()
    assert restored.total == 0 and restored.summary() == "skipped 0 samples"


def test_skip_counter_merges_processes_and_loads_old_checkpoints():
    # two processes saw the same bad sample (index 3) and one each of their own: a union, visits added
    first, second = SkipCounter(), SkipCounter()
    first.update({"corrupt": [3, 7]})
    second.update({"corrupt": [3], "missing": ["0-1-5"]})
    main = SkipCounter()
    for part in (first.as_dict(), second.as_dict()):
        main.update(part)
    assert main.as_dict() == {
        "corrupt": {"samples": [3, 7], "visits": 3},
        "missing": {"samples": ["0-1-5"], "visits": 1},
    }
    assert main.total == 3

    # a checkpoint written before (plain {reason: visits}) still loads: visits of unidentified samples
    old = SkipCounter({"corrupt": 4, "empty": 2})
    assert old.visits == 6 and old.total == 6
    assert old.summary() == "skipped 6 distinct samples (6 visits): corrupt 4 (4 visits), empty 2 (2 visits)"
    again = SkipCounter(json.loads(json.dumps(old.as_dict())))
    assert again.as_dict() == old.as_dict() and again.summary() == old.summary()
    again.update({"corrupt": [11]})
    assert again.samples_by_reason() == {"corrupt": 5, "empty": 2} and again.visits_by_reason()["corrupt"] == 5
    with pytest.raises(TypeError):
        SkipCounter({"corrupt": "three"})


# ----------------------------------------------------------------------------------------------- item 7
def test_malformed_jsonl_lines_are_counted_skips_naming_file_and_line(tmp_path, caplog):
    image = _png(tmp_path / "a.png")
    table = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"image": "a.png", "caption": "first."}).encode(),
        b'{"image": "a.png", "caption": "cut',  # truncated line
        b"",  # blank lines are not rows
        json.dumps(["a list"]).encode(),
        b'{"image": "a.png", "caption": "caf\xe9 in latin-1"}',  # not UTF-8
        json.dumps({"image": "a.png", "text": "no caption key"}).encode(),
        json.dumps({"image": "a.png", "caption": "last."}).encode(),
    ]
    table.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="hf_longclip.data.sources"):
        records = read_caption_table(table)
    assert [r["caption"] for r in records] == ["first.", None, None, None, None, "last."]
    problems = [r.get("read_error") for r in records]
    assert problems[0] is None and problems[5] is None
    assert problems[1].startswith(f"{table}, line 2: invalid JSON")
    assert problems[2] == f"{table}, line 4: expected a JSON object, got list"
    assert problems[3].startswith(f"{table}, line 5: not UTF-8")
    assert problems[4] == f"{table}, line 6: no 'caption' key"
    assert records[5]["image"] == image and records[5]["id"] == 5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(table) in warning and "4 unreadable" in warning
    assert all(f"line {n}" in warning for n in (2, 4, 5, 6))

    # the dataset skips and counts them, and so does the start-up check
    samples = [LongCaptionDataset(records)[i] for i in range(len(records))]
    assert [s.reason for s in samples if isinstance(s, SkippedSample)] == ["bad_record"] * 4
    assert "line 2" in samples[1].detail and str(table) in samples[1].detail
    assert validate_records(records, check_files=False).bad == {"bad_record": 4}
    with pytest.raises(BadSampleError, match="index 1 .*bad_record.*pairs.jsonl, line 2"):
        validate_records(records, strict=True)

    # the first object decides the layout: a column missing there is a configuration error
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    expected = r"wrong.jsonl: missing column 'caption' \(line 1\); columns present: 'image', 'text'"
    with pytest.raises(ValueError, match=expected):
        read_caption_table(wrong)


def test_tables_with_a_byte_order_mark(tmp_path):
    _png(tmp_path / "a.png")
    bom = codecs.BOM_UTF8
    files = {
        "bom.csv": bom + b"image,caption,id\na.png,A dog.,7\n",
        "bom.tsv": bom + b"image\tcaption\tid\na.png\tA dog.\t7\n",
        "bom.jsonl": bom + b'{"image": "a.png", "caption": "A dog.", "id": "7"}\n',
        "bom.json": bom + b'[{"image": "a.png", "caption": "A dog.", "id": "7"}]',
    }
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        records = open_training_source(path)
        assert len(records) == 1, name
        assert records[0]["image"] == str(tmp_path / "a.png") and records[0]["caption"] == "A dog.", name
        assert records[0]["id"] == "7" and "read_error" not in records[0], name

    turns = [{"from": "human", "value": "?"}, {"from": "gpt", "value": "A cat."}]
    entries = [{"image": "a.png", "conversations": turns}]
    share = tmp_path / "share.json"
    share.write_bytes(bom + json.dumps(entries).encode())
    assert detect_format(share) == "sharegpt4v"
    assert open_training_source({"path": str(share), "holdout": 0})[0]["caption"] == "A cat."


def test_truncated_json_files_name_the_file(tmp_path):
    entries = [{"image": f"{i}.jpg", "conversations": [{"from": "human", "value": "?"},
                                                          {"from": "gpt", "value": "A cat."}]} for i in range(3)]
    text = json.dumps(entries)
    share = tmp_path / "share-captioner.json"
    share.write_text(text[: len(text) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"share-captioner\.json: not a valid ShareGPT4V JSON file \(truncated"):
        read_sharegpt4v(share, holdout=0)
    assert detect_format(share) == "sharegpt4v"
    with pytest.raises(ValueError, match=r"share-captioner\.json: not a valid ShareGPT4V JSON file"):
        open_training_source(share)
    table = tmp_path / "pairs.json"
    table.write_text('[{"image": "a.png", "caption": "x"},')
    with pytest.raises(ValueError, match=r"pairs\.json: not a valid caption table JSON file .*line 1"):
        read_caption_table(table)
    binary = tmp_path / "latin.json"
    binary.write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin\.json: not a UTF-8"):
        read_caption_table(binary)


def test_csv_rows_with_wrong_field_counts_are_skips_and_tokeniser_errors_name_the_line(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_bytes(
        b'image,caption\n'
        b'a.png,"A caption\nover two lines."\n'  # lines 2-3
        b'b.png,too,many,fields\n'  # line 4
        b'c.png\n'  # line 5
        b'd.png,caf\xe9\n'  # line 6: not UTF-8
        b'e.png,fine.\n'  # line 7
    )
    records = read_caption_table(table)
    assert [r.get("read_error") for r in records] == [
        None,
        f"{table}, line 4: 4 fields, the header has 2",
        f"{table}, line 5: 1 fields, the header has 2",
        f"{table}, line 6: not UTF-8",
        None,
    ]
    assert records[0]["caption"] == "A caption\nover two lines." and records[4]["caption"] == "fine."

    huge = tmp_path / "huge.csv"
    huge.write_text("image,caption\na.png,short\nb.png," + "x" * (csv.field_size_limit() + 10) + "\n")
    with pytest.raises(ValueError, match=r"huge\.csv, line 3: field larger than field limit"):
        read_caption_table(huge)
    with pytest.raises(ValueError, match=r"missing column 'image' \(header\); columns present: 'file', 'caption'"):
        (tmp_path / "cols.csv").write_text("file,caption\na.png,x\n")
        read_caption_table(tmp_path / "cols.csv")


def test_record_ids_invalid_ones_are_skips_and_generated_ones_never_collide(tmp_path):
    image = _png(tmp_path / "a.png")
    assert normalise_record_id(True) == (None, "invalid_id")
    assert normalise_record_id(1.5) == (None, "invalid_id")
    assert normalise_record_id([1]) == (None, "invalid_id")
    assert normalise_record_id(2**70) == (None, "invalid_id")
    assert normalise_record_id(7.0) == (7, None) and type(normalise_record_id(np.int64(7))[0]) is int
    assert normalise_record_id(float("nan")) == (None, None) and normalise_record_id(" ") == (None, None)
    assert normalise_record_id("img/1.jpg") == ("img/1.jpg", None)

    # FineLIP: unusable ids are counted skips (they used to be a TypeError / overflow inside the collator)
    records = [
        {"image": image, "caption": "good", "id": 4},
        {"image": image, "caption": "bool id", "id": True},
        {"image": image, "caption": "fraction", "id": 1.5},
        {"image": image, "caption": "too big", "id": 2**70},
        {"image": image, "caption": "a list", "id": [1, 2]},
        {"image": image, "caption": "file name", "id": "img/1.jpg"},
    ]
    processor = tiny_processor()
    dataset = LongCaptionDataset(records, transform_from_processor(processor))
    collator = SkipCountingCollator(FineLIPCollator(processor))
    (batch,) = list(make_dataloader(dataset, collator, batch_size=6, shuffle=False, drop_last=False))
    assert batch["skipped"] == {"invalid_id": [1, 2, 3, 4]}
    assert batch["pixel_values"].shape[0] == 2 and batch["image_ids"].tolist()[0] == 4
    assert dataset[1].detail == "id is True"
    assert validate_records(records, check_files=False).bad == {"invalid_id": 4}

    # records without an id never get an explicit id of another record
    mixed = [
        {"image": image, "caption": "explicit 1", "id": 1},
        {"image": image, "caption": "no id"},
        {"image": image, "caption": "explicit 0", "id": 0},
        {"image": image, "caption": "no id either", "id": None},
        {"image": image, "caption": "explicit 3", "id": "3"},
    ]
    ids = [LongCaptionDataset(mixed)[i]["id"] for i in range(5)]
    assert ids[0] == 1 and ids[2] == 0 and ids[4] == "3"
    assert ids[1] == 4 + 1 and ids[3] == 4 + 3  # one past the largest integer id ("3" counts), plus the index
    assert len({str(i) for i in ids}) == 5
    (fine,) = list(make_dataloader(LongCaptionDataset(mixed, transform_from_processor(processor)),
                                   SkipCountingCollator(FineLIPCollator(processor)), batch_size=5, shuffle=False))
    assert len(set(fine["image_ids"].tolist())) == 5  # no pair is wrongly treated as the same image
    streamed = [s["id"] for s in IterableLongCaptionDataset(mixed)]
    assert streamed == ids
    # data without any id keeps the index as the id
    assert [LongCaptionDataset([{"image": image, "caption": "x"}] * 3)[i]["id"] for i in range(3)] == [0, 1, 2]

    # the same rule in the table reader: rows without an id avoid every id of the file
    table = tmp_path / "ids.jsonl"
    rows = [{"image": "a.png", "caption": "a", "id": 2}, {"image": "a.png", "caption": "b"},
            {"image": "a.png", "caption": "c", "id": 0}, {"image": "a.png", "caption": "d", "id": ""}]
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [r["id"] for r in read_caption_table(table)] == [2, 3 + 1, 0, 3 + 3]
    assert generated_id_base([None, 5, "7", 2.0, "x", True, float("nan")]) == 8
    assert generated_id_base([]) == 0
