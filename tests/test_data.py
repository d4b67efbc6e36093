"""Training data pipeline: readers on tiny layouts like the real data, robust image loading on real broken files,
skip-and-count datasets with a real collator, strict mode, sharding across ranks and workers, transforms against
transformers' processor, and seeded data loading. Every fixture is built in tmp_path; nothing touches the network."""

import io
import json
import random
import struct
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from transformers import CLIPImageProcessorPil

from hf_longclip.data import (
    BadImageError,
    BadSampleError,
    EvalTransform,
    IterableLongCaptionDataset,
    LongCaptionDataset,
    LongCLIPCollator,
    SkipCounter,
    SkipCountingCollator,
    SkippedSample,
    TrainTransform,
    build_transform,
    load_hf_dataset,
    load_image,
    make_dataloader,
    open_training_source,
    read_caption_table,
    read_sharegpt4v,
    transform_from_processor,
    validate_records,
)
from hf_longclip.data.sources import detect_format
from hf_longclip.data.transforms import sample_crop_box
from hf_longclip.testing_utils import tiny_processor


# ----------------------------------------------------------------------------------------------- helpers
def _rgb(width=24, height=16, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def _save(image, path, **kwargs):
    path = Path(path)
    image.save(path, **kwargs)
    return str(path)


def _png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header_only(width, height):
    """A PNG whose IHDR claims `width` x `height` but whose IDAT holds a few bytes of one row (no real pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def _reason(source, **kwargs):
    with pytest.raises(BadImageError) as info:
        load_image(source, **kwargs)
    return info.value.reason


# ----------------------------------------------------------------------------------------------- load_image
def test_load_image_bad_files_fail_with_their_reason(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # we must not rely on (or set) the global

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 this is not really a jpeg" * 10)
    assert _reason(str(corrupt)) == "corrupt"
    assert _reason(b"plain text, not an image") == "corrupt"

    big = _rgb(96, 96, seed=1)
    for fmt in ("PNG", "JPEG"):
        full = tmp_path / f"full.{fmt.lower()}"
        big.save(full, format=fmt)
        data = full.read_bytes()
        cut = tmp_path / f"truncated.{fmt.lower()}"
        cut.write_bytes(data[: len(data) * 6 // 10])  # header intact, pixel data cut
        assert load_image(str(full)).size == (96, 96)
        assert _reason(str(cut)) == "corrupt", fmt

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert _reason(str(empty)) == "empty"
    assert _reason(b"") == "empty"
    assert _reason(str(tmp_path / "nope.jpg")) == "missing"
    assert _reason(tmp_path / "nope.jpg") == "missing"  # PathLike
    assert _reason(str(tmp_path)) == "not_a_file"  # a directory
    assert _reason(None) == "missing"
    assert _reason({"bytes": None, "path": None}) == "missing"

    tiny = _save(Image.new("RGB", (1, 5)), tmp_path / "tiny.png")
    assert _reason(tiny) == "too_small"

    error = BadImageError("corrupt", "x.jpg: broken")
    assert isinstance(error, ValueError) and error.reason == "corrupt"
    import pickle

    assert pickle.loads(pickle.dumps(error)).reason == "corrupt"  # survives DataLoader workers


def test_load_image_too_large_is_decided_from_the_header(tmp_path, monkeypatch):
    # A ~70-byte file claiming 100000 x 100000 pixels: only the header can be read, so only the header was used.
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(100_000, 100_000))
    assert _reason(str(huge)) == "too_large"  # PIL's own bomb check or ours, both map to too_large
    assert _reason(str(huge), max_image_pixels=None) == "too_large"

    # A real 64x64 image with a 1000-pixel limit: rejected without ever decoding pixel data.
    path = _save(_rgb(64, 64), tmp_path / "big.png")
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original_load(self))
    assert _reason(path, max_image_pixels=1000) == "too_large"
    assert decoded == []
    assert load_image(path, max_image_pixels=64 * 64).size == (64, 64)
    assert decoded  # the same file decodes when allowed


def test_load_image_modes(tmp_path):
    # grayscale L -> equal channels
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    out = np.asarray(load_image(_save(Image.fromarray(gray, "L"), tmp_path / "l.png")))
    assert out.shape == (4, 4, 3) and (out == gray[..., None]).all()

    # 16-bit grayscale is scaled to 8 bits, not clipped (PIL's convert("L") would make 32768 -> 255)
    sixteen = np.array([[0, 32768], [65535, 257 * 10]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)
    image16 = Image.fromarray(sixteen)
    assert image16.mode == "I;16"
    out = np.asarray(load_image(_save(image16, tmp_path / "i16.png")))[..., 0]
    assert out[0, 0] == 0 and out[3, 0] == 255 and abs(int(out[0, 3]) - 128) <= 1 and out[3, 3] == 10
    # 32-bit integer images holding 16-bit values are read the same way; float images in [0, 1] scale by 255
    out = np.asarray(load_image(Image.fromarray(sixteen.astype(np.int32))))[..., 0]
    assert out[3, 0] == 255 and abs(int(out[0, 3]) - 128) <= 1
    out = np.asarray(load_image(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))))
    assert abs(int(out[0, 0, 0]) - 128) <= 1

    # RGBA: transparent pixels become white, opaque ones keep their colour, half-transparent black is mid-gray
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # all (0, 0, 0, 0): fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 0, 0, 128)
    out = np.asarray(load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")))
    assert tuple(out[3, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])
    # LA too
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert tuple(np.asarray(load_image(_save(la, tmp_path / "la.png")))[0, 0]) == (255, 255, 255)

    # palette PNG, without and with a transparent index
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(np.asarray(load_image(_save(palette, tmp_path / "p.png")))[0, 0]) == (10, 200, 30)
    out = np.asarray(load_image(_save(palette, tmp_path / "pt.png", transparency=1)))
    assert tuple(out[0, 0]) == (255, 255, 255)

    # CMYK JPEG
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[4, 4].astype(int)
    assert r > 200 and g < 60 and b < 60

    # EXIF orientation 6 (rotate 90 clockwise): stored 40x20, shown 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    oriented = load_image(_save(_rgb(40, 20), tmp_path / "exif.jpg", exif=exif))
    assert oriented.size == (20, 40)

    # bytes, {"bytes", "path"} dicts (datasets' decode=False form) and PIL images give the same pixels
    path = _save(_rgb(10, 8, seed=3), tmp_path / "same.png")
    data = Path(path).read_bytes()
    reference = np.asarray(load_image(path))
    for source in (data, bytearray(data), {"bytes": data, "path": "ignored.png"}, {"bytes": None, "path": path}):
        assert (np.asarray(load_image(source)) == reference).all()
    given = Image.open(path)
    loaded = load_image(given)
    assert loaded is not given and (np.asarray(loaded) == reference).all()


# ----------------------------------------------------------------------------------------------- readers
def _sharegpt4v_layout(tmp_path, count=5):
    """share-captioner JSON + images under the ShareGPT4V folder layout (coco/train2017, sam/images, ...)."""
    root = tmp_path / "sharegpt4v" / "data"
    entries = []
    for index in range(count):
        folder = ("coco/train2017", "sam/images", "llava/llava_pretrain/images")[index % 3]
        (root / folder).mkdir(parents=True, exist_ok=True)
        relative = f"{folder}/{index:012d}.jpg"
        _rgb(20, 16, seed=index).save(root / relative)
        conversations = [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": f"Picture number {index} shows a cat. It sits\non a mat.\n\nThe mat is red."},
        ]
        if index == 4:  # a system turn first: the caption is still the first gpt turn
            conversations.insert(0, {"from": "system", "value": "be precise"})
        entries.append({"id": f"sa_{index}", "image": relative, "conversations": conversations})
    path = tmp_path / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json"
    path.write_text(json.dumps(entries))
    return path, root


def test_read_sharegpt4v_splits_and_captions(tmp_path):
    path, root = _sharegpt4v_layout(tmp_path)
    train = read_sharegpt4v(path, root, split="train", holdout=2)
    holdout = read_sharegpt4v(path, root, split="holdout", holdout=2)
    everything = read_sharegpt4v(path, root, split="all", holdout=2)
    assert [r["id"] for r in train] == [2, 3, 4]
    assert [r["id"] for r in holdout] == [0, 1]
    assert len(everything) == 5
    first = train[0]
    assert first["caption"] == "Picture number 2 shows a cat. It sits on a mat.  The mat is red."
    assert "\n" not in train[2]["caption"] and train[2]["caption"].startswith("Picture number 4")
    assert first["short_caption"] is None
    assert first["image"] == str(root / "llava/llava_pretrain/images/000000000002.jpg")
    assert Path(first["image"]).is_file()
    with pytest.raises(ValueError, match="split"):
        read_sharegpt4v(path, root, split="validation")

    assert detect_format(path) == "sharegpt4v"
    auto = open_training_source({"path": str(path), "image_root": str(root), "holdout": 2})
    assert auto == train


def test_read_caption_tables(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        _rgb().save(tmp_path / "imgs" / name)
    rows = [
        {"image": "imgs/a.jpg", "caption": "A dog. It runs.", "short_caption": "A running dog"},
        {"image": "imgs/b.jpg", "caption": "A cat on a mat."},
        {"image": "/abs/c.jpg", "caption": "Absolute path.", "short_caption": ""},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = read_caption_table(jsonl)
    assert [r["id"] for r in records] == [0, 1, 2]
    assert records[0]["image"] == str(tmp_path / "imgs" / "a.jpg")
    assert records[2]["image"] == "/abs/c.jpg"
    assert [r["short_caption"] for r in records] == ["A running dog", None, None]
    assert open_training_source(jsonl) == records

    as_json = tmp_path / "pairs.json"
    as_json.write_text(json.dumps(rows))
    assert detect_format(as_json) == "json"
    assert open_training_source(as_json) == records

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('id,filepath,text\n7,imgs/a.jpg,"A dog, running."\n8,imgs/b.jpg,"Line one.\nLine two."\n')
    records = read_caption_table(csv_path, image_root="/data", image_column="filepath", caption_column="text")
    assert [r["id"] for r in records] == ["7", "8"]
    assert records[0]["image"] == "/data/imgs/a.jpg" and records[0]["caption"] == "A dog, running."
    assert records[1]["caption"] == "Line one.\nLine two."  # normalised later, by the dataset

    with pytest.raises(ValueError) as info:
        read_caption_table(csv_path)  # default columns 'image' / 'caption' are not there
    message = str(info.value)
    assert "pairs.csv" in message and "'image'" in message and "'filepath'" in message and "'text'" in message

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\nimgs/a.jpg\tTab separated.\n")
    assert open_training_source(tsv)[0]["caption"] == "Tab separated."
    # one malformed line does not fail the read: it becomes a bad record naming the file and the line, logged
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "a.jpg", "caption": "ok"}\n{broken\n')
    with caplog.at_level("WARNING", logger="hf_longclip.data.sources"):
        records = read_caption_table(bad_jsonl)
    assert len(records) == 2 and records[0]["caption"] == "ok" and "read_error" not in records[0]
    assert records[1]["read_error"].startswith(f"{bad_jsonl}, line 2: invalid JSON")
    assert any("bad.jsonl" in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


def test_load_hf_dataset_disk_and_streamed_parquet(tmp_path):
    png = io.BytesIO()
    _rgb(12, 10).save(png, format="PNG")
    table = datasets.Dataset.from_dict(
        {
            "jpg": [{"bytes": png.getvalue(), "path": None}, {"bytes": b"broken", "path": None}],
            "long_caption": ["A red square. Big.", "Another one."],
            "other": [1, 2],
        },
        features=datasets.Features(
            {"jpg": datasets.Image(), "long_caption": datasets.Value("string"), "other": datasets.Value("int64")}
        ),
    )
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved))
    loaded = load_hf_dataset(saved, image_column="jpg", caption_column="long_caption")
    assert loaded.column_names == ["image", "caption"]
    row = loaded[1]
    assert row["image"]["bytes"] == b"broken"  # not decoded inside datasets: a bad file cannot crash it

    # the broken row becomes a skipped sample, the good one a sample
    dataset = LongCaptionDataset(loaded, EvalTransform(8))
    assert dataset[0]["pixel_values"].shape == (3, 8, 8) and dataset[0]["short_caption"] == "A red square"
    bad = dataset[1]
    assert bad == SkippedSample(1, "corrupt", "<6 bytes>", bad.detail) and "0x" not in bad.detail
    assert dataset[1] == bad  # the same message every time (no object addresses)

    with pytest.raises(ValueError, match="missing column 'caption'.*'long_caption'"):
        load_hf_dataset(saved, image_column="jpg")

    parquet = tmp_path / "pairs.parquet"
    table.to_parquet(str(parquet))
    streamed = open_training_source(
        {"path": str(parquet), "streaming": True, "image_column": "jpg", "caption_column": "long_caption",
         "load_kwargs": {"cache_dir": str(tmp_path / "cache")}}
    )
    assert isinstance(streamed, datasets.IterableDataset)
    rows = list(streamed)
    assert [sorted(r) for r in rows] == [["caption", "image"]] * 2
    assert rows[0]["caption"] == "A red square. Big." and rows[1]["image"]["bytes"] == b"broken"


# ----------------------------------------------------------------------------------------------- datasets
@pytest.fixture
def mixed_records(tmp_path):
    """3 good records and 7 bad ones of 6 kinds, in a known order."""
    good = [_save(_rgb(40, 30, seed=i), tmp_path / f"good{i}.png") for i in range(3)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"garbage" * 20)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    tiny = _save(Image.new("RGB", (1, 1)), tmp_path / "tiny.png")
    truncated = tmp_path / "truncated.png"
    full = io.BytesIO()
    _rgb(64, 64).save(full, format="PNG")
    truncated.write_bytes(full.getvalue()[:300])
    return [
        {"image": good[0], "caption": "A red cat. It sleeps.\nOn a mat.", "id": "g0"},
        {"image": str(corrupt), "caption": "corrupt file"},
        {"image": good[1], "caption": "   \n "},  # empty caption (the image is fine)
        {"image": good[1], "caption": "A dog. Running.", "short_caption": "dog running"},
        {"image": str(tmp_path / "missing.jpg"), "caption": "missing file"},
        {"image": str(empty), "caption": "empty file"},
        {"image": good[2], "caption": None},  # non-string caption
        {"image": tiny, "caption": "too small"},
        {"image": str(truncated), "caption": "truncated"},
        {"image": good[2], "caption": "A tree", "short_caption": "   "},
    ]


EXPECTED_SKIPS = {"corrupt": 2, "empty": 1, "empty_caption": 1, "missing": 1, "non_string_caption": 1, "too_small": 1}
#: the dataset indices of the bad records of `mixed_records`, per reason
EXPECTED_SKIPPED_KEYS = {"corrupt": [1, 8], "empty": [5], "empty_caption": [2], "missing": [4],
                         "non_string_caption": [6], "too_small": [7]}


def test_dataset_collator_counts_each_reason_and_keeps_the_good(mixed_records):
    processor = tiny_processor()
    dataset = LongCaptionDataset(mixed_records, transform_from_processor(processor))
    collator = SkipCountingCollator(LongCLIPCollator(processor))
    loader = make_dataloader(dataset, collator, batch_size=len(dataset), shuffle=False, drop_last=False)
    (batch,) = list(loader)
    assert batch.pop("skipped") == EXPECTED_SKIPPED_KEYS
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 3 and batch["short_input_ids"].shape[0] == 3

    good = [dataset[i] for i in (0, 3, 9)]
    assert [s["id"] for s in good] == ["g0", 3, 9]  # the record's id, else the index
    assert good[0]["caption"] == "A red cat. It sleeps. On a mat."  # normalised
    assert [s["short_caption"] for s in good] == ["A red cat", "dog running", "A tree"]
    expected = torch.stack([s["pixel_values"] for s in good])
    assert torch.equal(batch["pixel_values"], expected)
    tokens = processor.tokenizer([s["caption"] for s in good], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokens["input_ids"])

    counter = SkipCounter()
    counter.update(EXPECTED_SKIPPED_KEYS)
    counter.update({"corrupt": [8]})  # a second visit of a sample already counted
    counter.update(None)
    assert counter.total == 7 and counter.visits == 8
    assert counter.as_dict()["corrupt"] == {"samples": [1, 8], "visits": 3}
    assert counter.summary() == (
        "skipped 7 distinct samples (8 visits): corrupt 2 (3 visits), empty 1 (1 visit), empty_caption 1 (1 visit), "
        "missing 1 (1 visit), non_string_caption 1 (1 visit), too_small 1 (1 visit)"
    )
    assert SkipCounter().summary() == "skipped 0 samples"


def test_all_bad_batch_and_strict_mode(mixed_records):
    processor = tiny_processor()
    dataset = LongCaptionDataset(mixed_records, EvalTransform(32))
    collator = SkipCountingCollator(LongCLIPCollator(processor))
    assert collator([dataset[1], dataset[4]]) == {"skipped": {"corrupt": [1], "missing": [4]}}
    assert collator([dataset[0]])["skipped"] == {}
    assert collator.processor is processor  # the wrapped collator's attributes stay reachable

    # strict: bad samples come back marked (nothing raised inside __getitem__, so workers cannot wrap it), and the
    # collator turns the first one of a batch into a one-line strict_error instead of collating
    strict = LongCaptionDataset(mixed_records, EvalTransform(32), strict=True)
    assert strict[0]["id"] == "g0"
    marker = strict[1]
    assert isinstance(marker, SkippedSample) and marker.strict and marker.index == 1 and marker.reason == "corrupt"
    assert marker.message().startswith("bad sample at index 1 (image ") and "corrupt.jpg" in marker.message()
    assert marker.message() == str(BadSampleError.from_skipped(marker))
    assert "index 2" in strict[2].message() and "empty_caption" in strict[2].message()
    loader = make_dataloader(strict, collator, batch_size=4, shuffle=False)
    first = next(iter(loader))
    assert set(first) == {"skipped", "strict_error"} and first["strict_error"] == marker.message()


def test_validate_records_counts_or_fails_up_front(mixed_records):
    report = validate_records(mixed_records)
    # cheap checks see missing / empty files and bad captions; corrupt / too_small need decoding
    assert report.total == 10
    assert report.bad == {"empty": 1, "empty_caption": 1, "missing": 1, "non_string_caption": 1}
    assert report.summary() == (
        "checked 10 records (captions; image files exist, are regular files and are not empty; image contents are "
        "checked as they are read): 4 bad: empty=1, empty_caption=1, missing=1, non_string_caption=1"
    )
    assert [e.index for e in report.examples] == [2, 4, 5, 6]
    with pytest.raises(BadSampleError, match="index 2"):
        validate_records(mixed_records, strict=True)
    captions_only = validate_records(mixed_records, check_files=False)
    assert captions_only.bad == {"empty_caption": 1, "non_string_caption": 1}
    assert captions_only.summary() == (
        "checked 10 records (captions only; image files and contents are checked as they are read): 2 bad: "
        "empty_caption=1, non_string_caption=1"
    )


def _covered(dataset_factory, world_size=2, num_workers=2):
    """Every id produced by every (rank, worker), through real DataLoader worker processes."""
    seen = []
    for rank in range(world_size):
        dataset = dataset_factory(rank, world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=lambda x: x)
        seen.extend(sample["caption"] for sample in loader)
    return seen


def test_iterable_dataset_covers_every_record_once_across_ranks_and_workers(tmp_path):
    png = io.BytesIO()
    _rgb(8, 8).save(png, format="PNG")
    records = [{"image": png.getvalue(), "caption": f"caption {i}"} for i in range(11)]
    expected = sorted(r["caption"] for r in records)

    def from_list(rank, world):
        return IterableLongCaptionDataset(records, rank=rank, world_size=world)

    assert sorted(_covered(from_list)) == expected

    # a datasets.IterableDataset: datasets splits by worker itself, we split by rank only
    table = datasets.Dataset.from_list(records).to_iterable_dataset(num_shards=4)

    def from_hf(rank, world):
        return IterableLongCaptionDataset(table, rank=rank, world_size=world)

    assert sorted(_covered(from_hf)) == expected

    # a generator factory (re-called each epoch), in-process: 4 shards of a 1-rank, 1-worker run cover it too
    def stream():
        yield from records

    samples = list(IterableLongCaptionDataset(stream, transform=EvalTransform(8)))
    assert [s["id"] for s in samples] == list(range(11)) and samples[0]["pixel_values"].shape == (3, 8, 8)

    # bad records stream through as SkippedSample (marked as strict failures in strict mode)
    bad = [{"image": b"", "caption": "x"}, {"image": png.getvalue(), "caption": 3}]
    assert [s.reason for s in IterableLongCaptionDataset(bad)] == ["empty", "non_string_caption"]
    assert not any(s.strict for s in IterableLongCaptionDataset(bad))
    strict = list(IterableLongCaptionDataset(bad, strict=True))
    assert all(s.strict for s in strict) and strict[0].message().startswith("bad sample at index 0 ")
    with pytest.raises(ValueError):
        IterableLongCaptionDataset(records, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------- transforms
def test_eval_transform_matches_clip_image_processor():
    for size, (width, height) in ((32, (57, 41)), (224, (300, 451)), (336, (640, 337))):
        image = _rgb(width, height, seed=size)
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        for transform in (EvalTransform(size), transform_from_processor(processor), build_transform("eval", size)):
            out = transform(image)
            assert out.shape == (3, size, size) and out.dtype == torch.float32
            # Both run the same PIL bicubic resize on 8-bit pixels and crop at the same (H - h) // 2 offset, so
            # the only possible difference is float32 rounding in rescale / normalise (~1e-7; measured 0.0).
            assert (out - expected).abs().max().item() < 1e-5
    # a 336 processor's sizes, mean and std are read, not assumed
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    transform = transform_from_processor(processor, "random_resized_crop")
    assert transform.size == (336, 336) and transform.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown transform"):
        build_transform("flip", 224)


def test_train_transform_is_seeded_and_shaped():
    image = _rgb(80, 60, seed=5)
    transform = TrainTransform(32)
    a = transform(image, rng=random.Random(0))
    b = transform(image, rng=random.Random(0))
    c = transform(image, rng=random.Random(1))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    seeded = TrainTransform(32, generator=random.Random(0))
    assert torch.equal(seeded(image), a)
    random.seed(3)
    first = transform(image)
    random.seed(3)
    assert torch.equal(transform(image), first)  # the default RNG is Python's global one (seeded per worker)
    assert build_transform("random_resized_crop", 16)(image).shape == (3, 16, 16)


def test_crop_box_sampler_respects_scale_and_ratio_and_falls_back():
    rng = random.Random(0)
    width, height = 640, 480
    areas = []
    for _ in range(2000):
        top, left, h, w = sample_crop_box(width, height, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        # w and h are rounded to integers: allow that rounding (<0.5 px per side) on top of the scale bounds
        fraction = w * h / (width * height)
        assert 0.5 * (1 - 0.01) <= fraction <= 1.0
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
        areas.append(fraction)
    assert min(areas) < 0.55 and max(areas) > 0.95  # the whole range is used

    class Fixed:
        """uniform() returns the interval's low end; randint() its high end."""

        def uniform(self, low, high):
            return low

        def randint(self, low, high):
            return high

    # area 0.5 * 640 * 480 at ratio 3/4: w = round(sqrt(153600 * 0.75)) = 339, h = round(sqrt(153600 / 0.75)) = 453
    assert sample_crop_box(640, 480, (0.5, 1.0), (3 / 4, 4 / 3), Fixed()) == (480 - 453, 640 - 339, 453, 339)
    # no box of ratio in [3/4, 4/3] and area >= half fits a 1000x10 strip: torchvision's centre fallback
    assert sample_crop_box(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (0, (1000 - 13) // 2, 10, 13)
    assert sample_crop_box(10, 1000, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(0)) == ((1000 - 13) // 2, 0, 13, 10)


# ----------------------------------------------------------------------------------------------- loading
class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, index):
        return {"index": index, "draw": random.random()}


def _collate(examples):
    return [(e["index"], e["draw"]) for e in examples]


def test_make_dataloader_shuffles_reproducibly():
    def order(seed, workers=0):
        loader = make_dataloader(_Numbers(), _collate, batch_size=4, shuffle=True, num_workers=workers, seed=seed)
        return [item for batch in loader for item in batch]

    first, again, other = order(0), order(0), order(1)
    assert [i for i, _ in first] == [i for i, _ in again]
    assert [i for i, _ in first] != [i for i, _ in other]
    assert sorted(i for i, _ in first) == list(range(24))

    # with workers, the per-worker `random` streams follow from the seed too, and differ between workers
    with_workers, with_workers_again = order(5, workers=2), order(5, workers=2)
    assert with_workers == with_workers_again
    draws = [d for _, d in with_workers]
    assert len(set(draws)) == len(draws)

    loader = make_dataloader(_Numbers(), _collate, batch_size=5, shuffle=False)
    assert len(list(loader)) == 4  # drop_last by default
    assert loader.pin_memory == torch.cuda.is_available()


def test_seeded_augmentation_is_a_function_of_sample_and_epoch(tmp_path):
    """With a seed, random crops depend only on (seed, epoch, index): order, workers and restarts cannot change them."""
    paths = [_save(_rgb(48, 40, seed=i), tmp_path / f"s{i}.png") for i in range(4)]
    records = [{"image": p, "caption": f"picture {i}", "sentences": [f"picture {i}"]} for i, p in enumerate(paths)]
    transform = TrainTransform(size=16, scale=(0.2, 0.6))
    first = LongCaptionDataset(records, transform, seed=3, passthrough=("sentences",))
    again = LongCaptionDataset(records, transform, seed=3)
    crops = [first[i]["pixel_values"] for i in range(4)]
    assert first[2]["sentences"] == ["picture 2"] and "sentences" not in again[2]
    for i in reversed(range(4)):  # another access order gives the same crops
        assert torch.equal(again[i]["pixel_values"], crops[i])
    again.set_epoch(1)
    assert not all(torch.equal(again[i]["pixel_values"], crops[i]) for i in range(4))
    other_seed = LongCaptionDataset(records, transform, seed=4)
    assert not all(torch.equal(other_seed[i]["pixel_values"], crops[i]) for i in range(4))


def test_sharegpt4v_caption_is_the_authors_turn_and_evaluation_reads_the_same(tmp_path):
    """One reader for training and the ShareGPT4V-1k benchmark: the caption is conversations[1] (what Long-CLIP,
    FineLIP and beta-CLIP read), even when an earlier turn is also the model's; a file with a system turn first
    falls back to the first gpt turn instead of training on the human prompt."""
    from hf_longclip.data.sources import sharegpt4v_caption
    from hf_longclip.evaluation import read_sharegpt4v_1k

    human = {"from": "human", "value": "<image>\nDescribe it."}
    assert sharegpt4v_caption([human, {"from": "gpt", "value": "A cat."}]) == "A cat."
    assert sharegpt4v_caption([{"from": "gpt", "value": "Hello."}, {"from": "gpt", "value": "A cat."}]) == "A cat."
    assert sharegpt4v_caption([{"from": "system", "value": "x"}, human, {"from": "gpt", "value": "A dog."}]) == "A dog."
    assert sharegpt4v_caption([human, {"value": "Unlabelled turn."}]) == "Unlabelled turn."
    assert sharegpt4v_caption([human]) is None and sharegpt4v_caption("not a list") is None

    _sharegpt4v_layout(tmp_path)  # entry 4 has a system turn first
    training = read_sharegpt4v(tmp_path / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json",
                               tmp_path / "sharegpt4v", split="holdout", holdout=5)
    benchmark = read_sharegpt4v_1k(tmp_path, count=5)
    assert benchmark.texts == [" ".join(r["caption"].split()) for r in training]
    assert benchmark.texts[4].startswith("Picture number 4") and benchmark.image_paths == [Path(r["image"]) for r in training]
