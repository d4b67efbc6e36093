"""webdataset tar shards as a training source (hf_longclip.data.shards) and ``hf-longclip make-shards``: the split over
processes and workers, resuming at a step, bad input, the make-shards round trip, and the trainer on shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from hf_longclip.cli import main as cli
from hf_longclip.data import LongCaptionDataset, SkipCounter, SkipCountingCollator
from hf_longclip.data.shards import (
    FAST_FORWARD,
    TarShardDataset,
    TarShardSource,
    looks_like_shards,
)
from hf_longclip.data.sources import detect_format, open_training_source, read_caption_table
from hf_longclip.data.transforms import EvalTransform

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _image(seed: int, ext: str = "png", size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=FORMATS[ext])
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, seed: int, ext: str = "png") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", _image(seed, ext)), (f"{key}.txt", f"caption of {key}. more text.".encode())]


def _shards(folder: Path, sizes: list[int]) -> list[str]:
    """Shards with `sizes` samples each; keys are unique over all of them (``s<shard>_<n>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for shard, size in enumerate(sizes):
        members = [m for n in range(size) for m in _sample(f"s{shard}_{n:02d}", 100 * shard + n)]
        urls.append(str(_tar(folder / f"{shard:05d}.tar", members)))
    return urls


def _as_list(items):
    return items


class _Ids:
    """Collator of the resume tests: the batch's ids (bad samples dropped and reported by SkipCountingCollator)."""

    def __call__(self, examples):
        return {"ids": [e["id"] for e in examples]}


def _epoch_ids(dataset: TarShardDataset, num_workers: int) -> list:
    loader = DataLoader(dataset, batch_size=None, collate_fn=_as_list, num_workers=num_workers)
    return [example["id"] for example in loader]


# ----------------------------------------------------------------------------------------------- format
def test_shard_specs_are_detected_as_webdataset(tmp_path):
    for spec in ("shards/{00000..00099}.tar", "a.tar", "b.TAR.gz", "c.tgz", "pipe:curl -s https://x/y.tar",
                 "https://host/data/{000..009}.tar", "https://host/x.tar?download=1", "a.tar::b.tar"):
        assert looks_like_shards(spec) and detect_format(spec) == "webdataset", spec
    table = tmp_path / "pairs.jsonl"
    table.write_text('{"image": "a.png", "caption": "x"}\n')
    for spec in ("data.tar.json", "x.parquet", "user/dataset", "a.tar::b.jsonl"):
        assert not looks_like_shards(spec), spec
    assert detect_format(table) == "jsonl"
    urls = _shards(tmp_path / "s", [1, 1])
    source = open_training_source(str(tmp_path / "s" / "{00000..00001}.tar"))
    assert isinstance(source, TarShardSource) and source.urls == urls
    assert not hasattr(source, "__len__")  # a stream: the trainer needs max_steps
    # a brace range past the last shard is a typo, named at start-up
    with pytest.raises(ValueError, match=r"1 of the 3 shards .* do not exist: .*00002\.tar"):
        open_training_source(str(tmp_path / "s" / "{00000..00002}.tar"))
    with pytest.raises(ValueError, match="max_train_samples cannot cut webdataset shards"):
        source.take(3)


# ----------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("sizes", [[5, 3, 7, 2, 6, 4, 1, 5], [9, 4, 6]], ids=["8-shards", "3-shards-for-4-slots"])
def test_two_ranks_two_workers_see_every_sample_exactly_once(tmp_path, sizes):
    """2 processes x 2 DataLoader workers: every sample of an epoch once, none twice, in two epochs (whose orders
    differ); with fewer shards than the 4 slots, the split is by sample."""
    urls = _shards(tmp_path, sizes)
    everything = sorted(f"s{shard}_{n:02d}" for shard, size in enumerate(sizes) for n in range(size))
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            dataset = TarShardDataset(urls, rank=rank, world_size=2, seed=3, shuffle_buffer=4)
            dataset.set_epoch(epoch)
            ids = _epoch_ids(dataset, num_workers=2)
            assert ids, f"rank {rank} got nothing"
            seen += ids
        assert sorted(seen) == everything
        orders.append(seen)
    assert orders[0] != orders[1]
    # the same (seed, epoch) gives the same order
    again = TarShardDataset(urls, rank=1, world_size=2, seed=3, shuffle_buffer=4)
    again.set_epoch(1)
    first = TarShardDataset(urls, rank=1, world_size=2, seed=3, shuffle_buffer=4)
    first.set_epoch(1)
    assert _epoch_ids(again, 2) == _epoch_ids(first, 2)


def test_shards_are_dealt_to_slots_and_shuffled_within_them(tmp_path):
    """Slot (rank, worker) reads whole shards of its own: the shard-level split (not every shard read by every
    slot), and the buffer mixes samples of a slot's shards."""
    urls = _shards(tmp_path, [6, 6, 6, 6])
    dataset = TarShardDataset(urls, rank=1, world_size=2, seed=0, shuffle_buffer=5)
    items = list(dataset.slot_items(worker=1, num_workers=2))  # slot 3 of 4: one shard
    shards = {item["__shard__"] for item in items}
    assert len(shards) == 1 and len(items) == 6
    assert [i["__key__"] for i in items] != sorted(i["__key__"] for i in items)  # shuffled
    plain = TarShardDataset(urls, shuffle=False)
    assert [i["__key__"] for i in plain.slot_items()] == [f"s{s}_{n:02d}" for s in range(4) for n in range(6)]


# ----------------------------------------------------------------------------------------------- resume
def _batches(dataset, batch_size, num_workers, skip=0):
    dataset.skip_batches(skip, batch_size)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=SkipCountingCollator(_Ids()),
                        num_workers=num_workers, drop_last=True)
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_a_batch_continues_with_the_same_samples(tmp_path, num_workers):
    """Skipping k batches (as the trainer does on resume) leaves exactly the batches an uninterrupted epoch has after
    k, for k inside the epoch and in its tail, where one worker has run out; the dropped batches a worker can place
    for certain are fast-forwarded (not decoded)."""
    # uneven shards: however they are dealt, one worker runs out long before the other
    urls = _shards(tmp_path, [12, 1, 1, 2])
    dataset = TarShardDataset(urls, seed=5, shuffle_buffer=3, shuffle=True)
    dataset.set_epoch(2)
    whole = _batches(dataset, 2, num_workers)
    assert all(not b["skipped"] for b in whole) and len(whole) >= 7
    for k in (1, 2, len(whole) - 2, len(whole)):
        resumed = _batches(dataset, 2, num_workers, skip=k)
        assert [b.get("ids") for b in resumed[k:]] == [b["ids"] for b in whole[k:]], k
        placeholders = [b for b in resumed[:k] if b["skipped"].get(FAST_FORWARD)]
        assert all("ids" not in b for b in placeholders)
        if num_workers == 0 or k <= 2:  # while every worker has data, every dropped batch is a placeholder batch
            assert len(placeholders) == k
        elif k == len(whole):  # in the tail, after one worker ran out, some dropped batches were read in full
            assert 0 < len(placeholders) < k
        assert all(FAST_FORWARD not in b["skipped"] for b in resumed[k:])


# ----------------------------------------------------------------------------------------------- bad input
def _bad_shards(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    good = _tar(folder / "good.tar", _sample("a", 1, "jpg") + _sample("b", 2, "png") + _sample("c", 3, "webp"))
    bad = _tar(folder / "bad.tar", [
        *_sample("d", 4),
        ("e.jpg", b"this is not a jpeg" * 20),                 # corrupt image member
        ("e.txt", b"a corrupt image"),
        ("f.txt", b"a caption without its image"),             # missing_image
        ("g.png", _image(5)),                                  # missing_caption
        ("h.png", _image(6)),
        ("h.json", json.dumps({"caption": "json caption", "short_caption": "short", "id": 77,
                               "hierarchy": {"sentences": ["json caption"], "phrases": ["json"],
                                             "phrase_sentence": [0], "phrase_kind": [0]}}).encode()),
    ])
    whole = _tar(folder / "whole.tar", _sample("i", 7) + _sample("j", 8) + _sample("k", 9))
    with tarfile.open(whole) as tar:
        cut = tar.getmember("j.png").offset_data + 100
    truncated = folder / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[:cut])             # "i" complete, "j" cut inside its image
    whole = _tar(folder / "whole.tar", _sample("l", 10) + _sample("m", 11) + _sample("n", 12))
    with tarfile.open(whole) as tar:
        cut = tar.getmember("n.png").offset
    ends_early = folder / "ends_early.tar"
    ends_early.write_bytes(whole.read_bytes()[:cut])            # cut between members: "m" may be incomplete
    whole.unlink()
    return [str(good), str(bad), str(truncated), f"pipe:cat {folder / 'gone.tar'} 2>/dev/null", str(ends_early)]


def test_bad_members_and_shards_are_counted_not_fatal(tmp_path):
    urls = _bad_shards(tmp_path)
    dataset = TarShardDataset(urls, EvalTransform(16), shuffle=False, passthrough=("sentences", "phrases"))
    loader = DataLoader(dataset, batch_size=4, collate_fn=SkipCountingCollator(_Ids()), num_workers=0)
    counter, ids = SkipCounter(), []
    for batch in loader:
        counter.update(batch.pop("skipped"))
        ids += batch.get("ids", [])
    # mixed formats (jpg, png, webp) just work; the truncated shard keeps what precedes the cut
    assert sorted(map(str, ids)) == ["77", "a", "b", "c", "d", "i", "l"]
    assert counter.samples_by_reason() == {"bad_shard": 3, "corrupt": 1, "missing_caption": 1, "missing_image": 1}
    keys = counter.as_dict()
    assert keys["corrupt"]["samples"] == [f"{urls[1]}:e"]
    assert keys["missing_image"]["samples"] == [f"{urls[1]}:f"]
    assert keys["missing_caption"]["samples"] == [f"{urls[1]}:g"]
    assert sorted(keys["bad_shard"]["samples"]) == sorted([urls[2], urls[3], urls[4]])
    # the .json member's caption, short caption, id and pre-parsed hierarchy pass through
    example = next(e for e in TarShardDataset(urls[1:2], shuffle=False, passthrough=("sentences", "phrases"))
                   if isinstance(e, dict) and e["id"] == 77)
    assert (example["caption"], example["short_caption"]) == ("json caption", "short")
    assert example["sentences"] == ["json caption"] and example["phrases"] == ["json"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_stops_at_the_first_bad_sample_with_one_line_naming_shard_and_key(tmp_path, num_workers):
    urls = _bad_shards(tmp_path)
    dataset = TarShardDataset(urls[:2], EvalTransform(16), shuffle=False, strict=True)
    loader = DataLoader(dataset, batch_size=8, collate_fn=SkipCountingCollator(_Ids()), num_workers=num_workers)
    errors = [b["strict_error"] for b in loader if b.get("strict_error")]
    assert errors, "strict mode let a bad sample through"
    # with 2 workers each reads one shard: the bad one gives the error either way
    assert re.fullmatch(re.escape(f"bad sample at index {urls[1]}:e (image e.jpg): corrupt") + r"[^\n]*", errors[0])
    truncated = TarShardDataset(urls[2:3], shuffle=False, strict=True)
    bad = [s for s in truncated if not isinstance(s, dict)][0]
    assert bad.strict and bad.reason == "bad_shard" and "truncated.tar" in bad.message()


# ----------------------------------------------------------------------------------------------- make-shards
def _table(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        ext = ("png", "jpg", "webp")[n % 3]
        (folder / f"im{n}.{ext}").write_bytes(_image(n, ext))
        rows.append({"image": f"im{n}.{ext}", "caption": f"Picture {n}. It has detail {n * 7}.", "id": n})
    rows.append({"image": "missing.png", "caption": "no such file", "id": 100})
    rows.append({"image": "im0.png", "caption": "   ", "id": 101})
    table = folder / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def test_make_shards_round_trip_gives_the_json_sources_pairs(tmp_path, capsys):
    table = _table(tmp_path / "data", 23)
    out = tmp_path / "shards"
    assert cli(["make-shards", "--input", str(table), "--out", str(out), "--samples-per-shard", "10"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 shard(s), 23 samples" in printed and "skipped 2 record(s): empty_caption 1, missing 1" in printed
    assert f"--train_data '{out}/{{00000..00002}}.tar'" in printed
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]  # no temporary files
    with tarfile.open(out / "00000.tar") as tar:
        assert len(tar.getnames()) == 3 * 7  # 23 samples spread 7 / 8 / 8, three members each
    records = {r["id"]: r for r in read_caption_table(table) if r["caption"].strip() and "missing" not in r["image"]}
    source = open_training_source(str(out / "{00000..00002}.tar"))
    from_shards = {r["id"]: r for r in source.records()}
    assert sorted(from_shards) == sorted(records)
    for ident, record in records.items():
        assert from_shards[ident]["image"] == Path(record["image"]).read_bytes()  # the file's bytes, not re-encoded
        assert from_shards[ident]["caption"] == record["caption"]
    # ... and the training examples equal those of the table, pixel for pixel
    transform = EvalTransform(16)
    expected = {e["id"]: e for e in LongCaptionDataset(list(records.values()), transform)}
    for example in TarShardDataset(source.urls, transform, seed=1):
        reference = expected.pop(example["id"])
        assert torch.equal(example["pixel_values"], reference["pixel_values"])
        assert (example["caption"], example["short_caption"]) == (reference["caption"], reference["short_caption"])
    assert not expected
    # a folder holding shards is not overwritten by accident; --overwrite replaces them and removes stale ones
    assert cli(["make-shards", "--input", str(table), "--out", str(out), "--samples-per-shard", "30"]) == 1
    assert "already holds shards" in capsys.readouterr().err
    assert cli(["make-shards", "--input", str(table), "--out", str(out), "--samples-per-shard", "30",
                "--overwrite", "--no-shuffle"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar"]
    assert [r["id"] for r in open_training_source(str(out / "00000.tar")).records()] == list(range(23))


def test_make_shards_keeps_sharegpt4v_training_split_and_parses_hierarchies(tmp_path):
    pytest.importorskip("spacy")
    from hf_longclip.text.hierarchy import parse_hierarchies

    folder = tmp_path / "data"
    folder.mkdir()
    entries = []
    for n in range(6):
        (folder / f"im{n}.png").write_bytes(_image(n))
        entries.append({"image": f"im{n}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"A red dog on the left.\nA cat number {n} sleeps."}]})
    share = folder / "share.json"
    share.write_text(json.dumps(entries))
    out = tmp_path / "shards"
    code = cli(["make-shards", "--input", str(share), "--out", str(out), "--holdout", "2", "--parse-hierarchy",
                "--samples-per-shard", "3", "--workers", "1"])
    assert code == 0
    records = list(open_training_source(str(out / "{00000..00001}.tar")).records())
    assert sorted(r["id"] for r in records) == [2, 3, 4, 5]  # the held-out head is not in the shards
    for record in records:
        caption = f"A red dog on the left. A cat number {record['id']} sleeps."
        assert record["caption"] == caption and record["image"] == (folder / f"im{record['id']}.png").read_bytes()
        assert {k: record[k] for k in ("sentences", "phrases", "phrase_sentence", "phrase_kind")} == \
            parse_hierarchies([caption])[0]


# ----------------------------------------------------------------------------------------------- trainer
def _shard_flags(out_dir, shards, *extra):
    from test_train_script import TINY

    return [*TINY, "--train_data", shards, "--output_dir", out_dir, "--variant", "longclip",
            "--per_device_train_batch_size", 4, "--max_steps", 8, "--save_steps", 2, "--num_workers", 2,
            "--shuffle_buffer", 6, "--transform", "random_resized_crop", "--save_final_model", "false",
            "--eval_before_training", "false", "--logging_steps", 1, *extra]


def test_trainer_on_shards_resumes_bit_identical(tmp_path):
    """``hf-longclip train`` on shards (2 data workers, random crops): stopping mid-epoch and resuming from the
    checkpoint ends with exactly the weights of an uninterrupted run, across an epoch boundary; bad samples are
    counted; --strict stops with one line naming the shard and key."""
    from test_train_script import train

    table = _table(tmp_path / "data", 30)
    out = tmp_path / "shards"
    assert cli(["make-shards", "--input", str(table), "--out", str(out), "--samples-per-shard", "8"]) == 0
    corrupt = out / "00004.tar"
    _tar(corrupt, [("bad.png", b"broken" * 10), ("bad.txt", b"a broken picture")])
    shards = str(out / "{00000..00004}.tar")
    # 31 samples over 2 workers in batches of 4: an epoch is at most 7 steps, so 8 steps cross into epoch 1
    whole = train(*_shard_flags(tmp_path / "whole", shards))
    assert whole["global_step"] == 8 and whole["skipped_samples"] == {"corrupt": 1}
    part = train(*_shard_flags(tmp_path / "parts", shards, "--stop_after_steps", 3))
    assert part["global_step"] == 3

    def state(run, step):
        return json.loads((tmp_path / run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())

    assert (state("parts", 3)["epoch"], state("parts", 3)["batch_in_epoch"]) == (0, 3)  # resumes inside epoch 0
    rest = train(*_shard_flags(tmp_path / "parts", shards, "--resume_from_checkpoint", "latest"))
    assert rest["global_step"] == 8 and rest["skipped_visits"] == whole["skipped_visits"]
    assert state("whole", 8)["epoch"] == 1  # ... and ends in epoch 1
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000008" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the order follows from the (process, worker) split: another num_workers is refused on resume
    with pytest.raises(SystemExit, match="order depends on num_workers; resume with --num_workers 2"):
        train(*_shard_flags(tmp_path / "parts", shards, "--resume_from_checkpoint", "latest", "--num_workers", 0,
                            "--max_steps", 8))
    with pytest.raises(SystemExit, match=re.escape(f"error: bad sample at index {corrupt}:bad (image bad.png): "
                                                   "corrupt")):
        train(*_shard_flags(tmp_path / "strict", str(corrupt), "--strict", "true", "--per_device_train_batch_size",
                            1, "--num_workers", 0))


def _distributed_shards_worker(out_dir, shards, *extra):
    from test_train_script import train

    train(*_shard_flags(out_dir, shards, "--num_workers", 0, "--max_steps", 12, *extra))


@pytest.mark.slow
def test_two_processes_on_shards_end_epochs_together_and_resume_bit_identical(tmp_path):
    """2 processes whose shards hold different numbers of samples (5 shards: 48 and 32 samples, 12 and 8 batches):
    every process ends an epoch when the first one runs out (step 8), so a run stopped after that boundary (step 9)
    resumes exactly; were each process to run its own epochs, the one not saving its place would resume elsewhere.
    (2.5 min on 2 cores.)"""
    from hf_longclip.testing_utils import spawn_distributed

    out = tmp_path / "shards"
    _shards(out, [16] * 5)  # dealt to 2 slots: 3 shards to one process, 2 to the other
    shards = str(out / "{00000..00004}.tar")
    spawn_distributed(_distributed_shards_worker, args=(str(tmp_path / "whole"), shards))
    spawn_distributed(_distributed_shards_worker, args=(str(tmp_path / "parts"), shards, "--stop_after_steps", 9))
    spawn_distributed(_distributed_shards_worker, args=(str(tmp_path / "parts"), shards, "--resume_from_checkpoint",
                                                        "latest"))
    whole = json.loads((tmp_path / "whole" / "train_summary.json").read_text())
    assert whole["global_step"] == 12
    final = json.loads((tmp_path / "whole" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert (final["epoch"], final["batch_in_epoch"]) == (1, 4)  # epoch 0 ended after 8 steps on both processes
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000012" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
