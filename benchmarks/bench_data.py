"""Start-up time, memory and loader throughput of a 1.2M-caption ShareGPT4V file: the JSON read into memory vs the
memory-mapped record index (`hf_longclip.data.index`).

The data: N synthetic ShareGPT4V entries (default 1.2M, the size of ``share-captioner_coco_lcs_sam_1246k_1107.json``)
with ~150-word long captions in paragraphs, all pointing at a few hundred 320 px JPEGs in a temporary folder.

Each measurement runs in its own subprocess, doing what the trainer does at start-up: open the source (ShareGPT4V,
train split after the 1000-entry holdout), `validate_records` (captions / ids, no file checks), `LongCaptionDataset`
with the train transform (random resized crop to 224 px), the Long-CLIP collator (248-token tokenizer) wrapped in
`SkipCountingCollator`, `GlobalBatchSampler` and a DataLoader with worker processes; then it reads batches. No model.

Reported per run:

* ``records``: seconds to get the records (JSON parse, or open the index; the cold index run includes its build),
  wall clock and, in brackets, the main process's CPU time (what the wall time would be on an idle core);
* ``validate``: seconds of the start-up check;
* ``first batch``: seconds from the start of reading to the first batch out of the DataLoader (what a rank waits;
  CPU time of the main process in brackets, the workers' not included);
* ``samples/s/worker``: loader throughput after the first batch (image decode + transform + tokenisation);
* ``main peak RSS``: the main process's ``VmHWM`` (the memory-mapped index's file pages count in RSS, but they are
  one copy in the page cache for every process on the machine); ``main RssAnon``: its anonymous (heap) memory at the
  first batch;
* ``worker private``: the largest ``Private_Dirty`` of the DataLoader workers after the timed batches: memory the
  worker alone holds (its own allocations and pages copied on write);
* ``worker private after epoch``: a process forked from the main process (as DataLoader workers are) reads every
  record once, as a worker does over an epoch, then reports its ``Private_Dirty``. For the JSON path that is the
  copy-on-write copying that reference counting causes, per worker and per rank; for the index it stays small;
* ``all processes peak``: the largest sum of ``Pss`` over the run's process tree (sampled every 0.25 s).

Runs: ``json`` (the list-of-dicts path), ``index-cold`` (no index yet: build + open), ``index-warm`` (reuse).
The time to import torch/transformers/hf_longclip is the same for every run and is reported once, separately.
Page-cache state is not controlled (that needs root): "cold" means the index did not exist, not an empty cache.

Usage::

    python benchmarks/bench_data.py                        # 1.2M entries (writes ~1.3 GB of JSON + ~1.2 GB index)
    python benchmarks/bench_data.py --records 100000 --batches 10
    python benchmarks/bench_data.py --modes index-cold,index-warm --keep bench_data_cache   # keep the generated data for a rerun

The machine may be shared: times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = {
    "subjects": "dog cat man woman child car tree house table chair lamp sofa rug window bicycle boat bird horse "
                "building street sign fence bench flower cup plate book clock mirror door wall".split(),
    "colours": "red green blue yellow white black brown striped wooden small large old bright dark".split(),
    "places": "left right top bottom front back middle center corner edge".split(),
    "verbs": "sitting standing leaning lying resting parked hanging placed visible positioned".split(),
    "preps": "against on near under beside behind above below".split(),
}
PROMPT = "<image>\nWhat do you see happening in this image?"

#: Modes: how the child opens the records. (a) ``json``: the list of dicts; (b) ``index-cold`` / ``index-warm``: the
#: record index; (c) ``shards``: webdataset shards written by ``hf-longclip make-shards`` (`make_shards`) from the
#: first ``--shard-records`` training entries (the shards embed the images: 1.2M would be ~50 GB here), read as the
#: trainer reads them (`TarShardSource.dataset`, a stream). Another source: add a mode here and in `child`.
MODES = ("json", "index-cold", "index-warm", "shards")


def caption(rng: random.Random, sentences: int = 10) -> str:
    """A ShareGPT4V-like long caption: about 150 words in two paragraphs."""
    w = WORDS
    out = [f"The image shows a {rng.choice(w['colours'])} {rng.choice(w['subjects'])} in a bright room"]
    for _ in range(sentences - 1):
        a, b, c = rng.sample(w["subjects"], 3)
        sentence = (f"A {rng.choice(w['colours'])} {a} is {rng.choice(w['verbs'])} {rng.choice(w['preps'])} the "
                    f"{rng.choice(w['colours'])} {b} on the {rng.choice(w['places'])} side of the scene")
        if rng.random() < 0.5:
            sentence += f", and a {rng.choice(w['colours'])} {c} can be seen next to it"
        out.append(sentence)
    half = len(out) // 2
    return ". ".join(out[:half]) + ".\n\n" + ". ".join(out[half:]) + "."


def prepare(folder: Path, records: int, images: int, seed: int = 0) -> Path:
    """Write `images` JPEGs and a ShareGPT4V JSON file of `records` entries; reuse them if already there."""
    import numpy as np

    from hf_longclip.data.synthetic import iter_scenes

    path = folder / f"sharegpt4v_{records}.json"
    if path.is_file():
        return path
    (folder / "images").mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed)
    for i, scene in enumerate(iter_scenes(images, seed=seed)):
        pixels = np.asarray(scene.render(320), dtype=np.int16) + noise.integers(-20, 21, (320, 320, 3))
        from PIL import Image

        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / "images" / f"{i:05d}.jpg", quality=90)
    rng = random.Random(seed)
    captions = [caption(rng) for _ in range(4096)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        for i in range(records):
            entry = {"id": f"{i:012d}", "image": f"images/{rng.randrange(images):05d}.jpg",
                     "conversations": [{"from": "human", "value": PROMPT},
                                       {"from": "gpt", "value": captions[rng.randrange(len(captions))]}]}
            handle.write(json.dumps(entry) + (",\n" if i + 1 < records else "\n"))
        handle.write("]\n")
    os.replace(tmp, path)
    return path


def make_shard_set(folder: Path, args) -> tuple[Path, dict]:
    """(c): webdataset shards of the first ``--shard-records`` training entries (a ShareGPT4V file of that many +
    the 1000-entry holdout, same images and captions), written with `make_shards` as ``hf-longclip make-shards``
    does; returns the shard folder and the build's seconds and bytes (reused when already there)."""
    from hf_longclip.data.shards import make_shards

    count = args.shard_records
    shards = folder / f"shards_{count}"
    if shards.is_dir() and (shards / "build.json").is_file():
        return shards, json.loads((shards / "build.json").read_text())
    source = prepare(folder / f"shard_source_{count}", count + 1000, args.images)
    started = time.perf_counter()
    report = make_shards(source, shards, samples_per_shard=args.samples_per_shard, data_format="sharegpt4v",
                         overwrite=True)
    build = {"records": count, "seconds": time.perf_counter() - started, "shards": len(list(shards.glob("*.tar"))),
             "bytes": sum(path.stat().st_size for path in shards.glob("*.tar")), "summary": report.summary()}
    (shards / "build.json").write_text(json.dumps(build))
    return shards, build


# ------------------------------------------------------------------------------------------------ child process
def _status(pid: int | str = "self") -> dict[str, float]:
    """VmHWM / VmRSS / RssAnon / RssFile of a process, in MiB (Linux)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _private_mib(pid: int | str = "self") -> dict[str, float]:
    """Pss, USS (private clean + dirty) and Private_Dirty from /proc/<pid>/smaps_rollup, in MiB. Private_Dirty is
    memory this process alone wrote (its own allocations, pages copied on write): what it costs the machine.
    Private_Clean also counts page-cache pages of a mapped file that no other process maps at the moment, which are
    shared as soon as another process reads them, so USS overstates a memory-mapped reader."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    values[key] = int(value.split()[0]) / 1024
    except OSError:
        return {}
    return {"Pss": values.get("Pss", 0.0), "USS": values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0),
            "Private_Dirty": values.get("Private_Dirty", 0.0)}


def _memory(pid: int | str = "self") -> dict[str, float]:
    return {**_status(pid), **_private_mib(pid)}


def _touch_all_in_fork(records) -> dict[str, float]:
    """Fork (as DataLoader workers are started on Linux), read every record once in the child, and report the
    child's memory: what each worker holds after an epoch."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            count = 0
            for position in range(len(records)):  # as a worker reads them: dataset[i] -> records[i]
                count += len(records[position]["caption"] or "")
            payload = json.dumps(_memory()).encode()
        except BaseException as error:  # pragma: no cover
            payload = json.dumps({"error": repr(error)}).encode()
        os.write(write, payload)
        os._exit(0)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def child(args) -> None:
    started = time.perf_counter()
    import torch
    from torch.utils.data import DataLoader
    from transformers import CLIPImageProcessorPil

    from hf_longclip.data import LongCaptionDataset, LongCLIPCollator, SkipCountingCollator, validate_records
    from hf_longclip.data.sources import TrainingSourceSpec, open_training_source
    from hf_longclip.data.tokenizer import build_clip_tokenizer
    from hf_longclip.data.transforms import transform_from_processor
    from hf_longclip.models.processing_longclip import LongCLIPProcessor
    from hf_longclip.training.data import GlobalBatchSampler

    torch.set_num_threads(1)
    words = sorted({word for group in WORDS.values() for word in group}
                   | set("the image shows a in bright room is of scene and can be seen next to it side".split()))
    tokenizer = build_clip_tokenizer(words, model_max_length=248)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor = LongCLIPProcessor.from_parts(image_processor, tokenizer, 248)
    imports = time.perf_counter() - started
    before = _status()

    transform = transform_from_processor(processor, "random_resized_crop")
    collator = SkipCountingCollator(LongCLIPCollator(processor))
    t0, c0 = time.perf_counter(), time.process_time()
    if args.mode == "shards":  # (c) a stream: no length, no start-up check, no sampler (as the trainer reads it)
        records = open_training_source(TrainingSourceSpec(path=args.data, format="webdataset"))
        t_records, c_records = time.perf_counter() - t0, time.process_time() - c0
        after_records = _status()
        report, t_validate = None, 0.0
        dataset = records.dataset(transform, rank=0, world_size=1, seed=0)
        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collator, num_workers=args.workers,
                            drop_last=True)
    else:
        spec = TrainingSourceSpec(path=args.data, format="sharegpt4v", split="train", holdout=1000,
                                  record_index="never" if args.mode == "json" else "always", index_dir=args.index_dir)
        records = open_training_source(spec)
        t_records, c_records = time.perf_counter() - t0, time.process_time() - c0
        after_records = _status()
        report = validate_records(records, check_files=False)
        t_validate = time.perf_counter() - t0 - t_records
        dataset = LongCaptionDataset(records, transform, seed=0)
        sampler = GlobalBatchSampler(len(dataset), args.batch_size, 1, 0, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.workers)
    batches = iter(loader)
    first = next(batches)
    t_first, c_first = time.perf_counter() - t0, time.process_time() - c0
    at_first = _memory()
    assert first["pixel_values"].shape == (args.batch_size, 3, 224, 224), first["pixel_values"].shape

    t1 = time.perf_counter()
    samples = 0
    for _ in range(args.batches):
        samples += len(next(batches)["pixel_values"])
    throughput = samples / (time.perf_counter() - t1)
    workers = [_memory(worker.pid) for worker in getattr(batches, "_workers", [])]
    del batches, loader
    touched = _touch_all_in_fork(records) if args.touch and args.mode != "shards" else {}
    result = {
        "mode": args.mode, "records": len(records) if hasattr(records, "__len__") else None, "imports_s": imports, "records_s": t_records, "records_cpu_s": c_records,
        "first_batch_cpu_s": c_first,
        "validate_s": t_validate, "first_batch_s": t_first, "samples_per_s": throughput,
        "samples_per_s_per_worker": throughput / max(1, args.workers),
        "bad": None if report is None else report.num_bad,
        "rss_before": before, "rss_after_records": after_records, "rss_first_batch": at_first, "rss_end": _memory(),
        "workers": workers, "touched": touched,
        "index": getattr(records, "info", None),
    }
    print("BENCH " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def run_child(mode: str, data: Path, index_dir: Path, args) -> dict:
    flags = [sys.executable, __file__, "--child", "--mode", mode, "--data", str(data), "--index-dir", str(index_dir),
             "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
    if not args.no_touch:
        flags.append("--touch")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(flags, stdout=out, stderr=err, text=True, env=env)
        peak = 0.0
        while process.poll() is None:  # watchdog: the whole process tree's memory (Pss: shared pages split)
            total = sum(_private_mib(pid).get("Pss", 0.0) for pid in _tree(process.pid))
            peak = max(peak, total)
            if total > args.memory_limit_gib * 1024:
                process.kill()
                process.wait()
                raise RuntimeError(f"{mode}: stopped at {total:,.0f} MiB (over --memory-limit-gib)")
            time.sleep(0.25)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{stderr[-4000:]}")
    line = [text for text in stdout.splitlines() if text.startswith("BENCH ")][-1]
    result = json.loads(line[len("BENCH "):])
    result["tree_peak_pss_mib"] = peak
    return result


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children", encoding="ascii") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:
            pass
    return found


def _mib(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def print_table(results: list[dict], args, data: Path, prepare_s: float) -> None:
    size = data.stat().st_size
    train = max(0, args.records - 1000)
    print(f"\nShareGPT4V file: {args.records:,} entries ({size / 2**20:,.0f} MiB), train split "
          f"{train:,}; batch {args.batch_size}, {args.workers} DataLoader workers, {args.batches} "
          f"batches timed; data written in {prepare_s:.0f} s; imports {results[0]['imports_s']:.1f} s (not counted)")
    for result in results:
        if result.get("index"):
            info = result["index"]
            print(f"  {result['mode']}: index {info['bytes'] / 2**20:,.0f} MiB, "
                  f"{'built' if info['built'] else 'opened'} in {info['seconds']:.2f} s"
                  f" (build {info['build_seconds']:.1f} s)")
        if result.get("make_shards"):
            build = result["make_shards"]
            scale = train / build["records"]
            print(f"  {result['mode']}: make-shards wrote {build['records']:,} samples in {build['shards']} shards "
                  f"({build['bytes'] / 2**20:,.0f} MiB, images embedded) in {build['seconds']:.1f} s; at "
                  f"{train:,} samples: ~{build['seconds'] * scale:,.0f} s and "
                  f"~{build['bytes'] * scale / 2**30:,.0f} GiB (linear)")
    header = ("run", "records s (CPU)", "validate s", "first batch s (CPU)", "samples/s/worker", "main peak RSS MiB",
              "main RssAnon MiB", "worker private MiB", "worker private after epoch MiB", "all processes peak MiB")
    rows = []
    for r in results:
        worker_private = max((w.get("Private_Dirty", 0) for w in r["workers"]), default=None)
        rows.append((r["mode"], f"{r['records_s']:.2f} ({r['records_cpu_s']:.1f})", f"{r['validate_s']:.2f}",
                     f"{r['first_batch_s']:.2f} ({r['first_batch_cpu_s']:.1f})",
                     f"{r['samples_per_s_per_worker']:.1f}", _mib(r["rss_end"].get("VmHWM")),
                     _mib(r["rss_first_batch"].get("RssAnon")), _mib(worker_private),
                     _mib(r["touched"].get("Private_Dirty")) if r["touched"] else "-",
                     _mib(r.get("tree_peak_pss_mib"))))
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  " + " | ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    print("  goals at 1.2M: first batch < 60 s, < 2048 MiB per process")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_200_000, help="ShareGPT4V entries (default 1.2M)")
    parser.add_argument("--images", type=int, default=300, help="distinct images the entries point at")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20, help="batches timed after the first")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    parser.add_argument("--keep", type=Path, default=None, help="folder for the data (kept; default: a temp folder)")
    parser.add_argument("--shard-records", type=int, default=10000,
                        help="(c) training entries written as shards (they embed the images; default 10000)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="(c) samples per shard (default 1000)")
    parser.add_argument("--no-touch", action="store_true", help="skip the epoch-touch measurement")
    parser.add_argument("--memory-limit-gib", type=float, default=6.0,
                        help="stop a run whose process tree holds more (sampled Pss)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    # child-only
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--index-dir", help=argparse.SUPPRESS)
    parser.add_argument("--touch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data = prepare(folder, args.records, args.images)
        prepare_s = time.perf_counter() - started
        index_dir = folder / "index"
        results = []
        for mode in modes:
            if mode == "index-cold" and index_dir.exists():
                for stale in index_dir.iterdir():
                    stale.unlink()
            source, build = data, None
            if mode == "shards":
                source, build = make_shard_set(folder, args)
            results.append(run_child(mode, source, index_dir, args))
            results[-1]["make_shards"] = build
            print(f"{mode}: {json.dumps(results[-1])}", flush=True)
        print_table(results, args, data, prepare_s)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
