"""Training and evaluation data as the trainer's settings describe them: the training records, the sample order
(`GlobalBatchSampler`) and the held-out retrieval set.

See docs/training.md (Data; Order, scale and reproducibility).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from ..data.sources import TrainingSourceSpec, open_training_source
from ..evaluation.readers import RetrievalSet
from .arguments import DataArguments

logger = logging.getLogger(__name__)


def synthetic_paths(data_args: DataArguments, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Generate (or reuse) the synthetic scenes under ``<image_root or output_dir/data>``."""
    from ..data.synthetic import write_synthetic_dataset

    folder = Path(data_args.image_root) if data_args.image_root else Path(output_dir) / "synthetic_data"
    return write_synthetic_dataset(
        folder, data_args.synthetic_num_train, data_args.synthetic_num_eval, seed=0,
        image_size=data_args.synthetic_image_size,
    )


def training_records(data_args: DataArguments, output_dir: str | os.PathLike):
    """The training records: a list of dicts, a `datasets.Dataset` or a `datasets.IterableDataset`.

    A ShareGPT4V file loses its first ``holdout`` entries (the papers' 1k evaluation set); that split is logged
    (`log_sharegpt4v_holdout`).
    """
    if data_args.data_format == "synthetic" or (data_args.data_format == "auto" and data_args.train_data == "synthetic"):
        path, fmt = str(synthetic_paths(data_args, output_dir)["train"]), "jsonl"
        image_root = None
    elif data_args.data_format == "docci":
        return _head(docci_records(data_args.train_data, "train"), data_args.max_train_samples)
    else:
        path, fmt, image_root = data_args.train_data, data_args.data_format, data_args.image_root
    if _source_kind(path, fmt) == "sharegpt4v":
        from ..data.index import open_record_index, use_record_index
        from ..data.sources import read_sharegpt4v

        # read whole, then split here: the log needs the file's size, which the train split alone does not give
        if use_record_index(path, data_args.record_index):
            everything = open_record_index(path, "sharegpt4v", image_root=image_root, index_dir=data_args.index_dir)
        else:
            everything = read_sharegpt4v(path, image_root, split="all")
        log_sharegpt4v_holdout(path, data_args.holdout, len(everything))
        return _head(everything[data_args.holdout :], data_args.max_train_samples)
    spec = TrainingSourceSpec(
        path=path,
        format=fmt,
        image_root=image_root,
        split=data_args.hf_split if _source_kind(path, fmt) == "hf" else "train",  # ShareGPT4V: after the holdout
        holdout=data_args.holdout,
        streaming=data_args.streaming,
        image_column=data_args.image_column,
        caption_column=data_args.caption_column,
        short_caption_column=data_args.short_caption_column,
        record_index=data_args.record_index,
        index_dir=data_args.index_dir,
    )
    return _head(open_training_source(spec), data_args.max_train_samples)


def log_sharegpt4v_holdout(path: str | os.PathLike, holdout: int, total: int) -> None:
    """Log how a ShareGPT4V file is split by ``--holdout`` (INFO), and WARN when the held-out head is a quarter of the
    file or more (a small or subsampled file, where the 1000-entry default leaves little to train on)."""
    held = min(holdout, total)
    logger.info(
        "ShareGPT4V: %d of %d records held out for evaluation (--holdout), %d train (%s)", held, total, total - held, path
    )
    if total and held * 4 >= total:
        logger.warning(
            "ShareGPT4V: the held-out head (--holdout %d) is %.0f%% of %s; lower --holdout for a small file "
            "(--holdout 0 trains on every record)", holdout, 100.0 * held / total, path,
        )


def docci_records(data_root: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """DOCCI pairs of one split, from the evaluation layout (``<data_root>/docci/docci_descriptions.jsonlines``)."""
    from ..evaluation.readers import read_docci

    pairs = read_docci(data_root, split=split)
    return [
        {"image": str(path), "caption": text, "short_caption": None, "id": f"docci-{split}-{i}"}
        for i, (path, text) in enumerate(zip(pairs.image_paths, pairs.texts))
    ]


def _source_kind(path: str, fmt: str) -> str:
    from ..data.sources import detect_format

    return detect_format(path) if fmt == "auto" else fmt


def _head(records, count: int | None):
    if count is None:
        return records
    if isinstance(records, list):
        return records[:count]
    if hasattr(records, "select") and hasattr(records, "__len__"):
        return records.select(range(min(count, len(records))))
    return records.take(count)  # datasets.IterableDataset


def add_caption_hierarchies(records, data_args: DataArguments, cache_dir: str | os.PathLike, is_main: bool = True):
    """Parse beta-CLIP's caption -> sentences -> phrases hierarchy once per caption (spaCy never runs per step).

    Lists of records are parsed in one batched pass and cached as JSON next to the run (keyed by a hash of the
    captions), so a restarted run does not parse again; `datasets` sources use ``map`` (cached by `datasets`).
    """
    from ..data.index import is_record_index
    from ..text.hierarchy import HierarchyMapper, parse_hierarchies

    from ..data.shards import TarShardSource

    if isinstance(records, TarShardSource):  # parsed by make-shards --parse-hierarchy, else by the collator per batch
        return records
    if is_record_index(records):
        records = list(records)  # the parsed hierarchies are held in memory anyway, one per caption
    if not isinstance(records, list):
        return records.map(HierarchyMapper(caption_column="caption"), batched=True,
                           **({"num_proc": data_args.text_num_proc} if hasattr(records, "__len__") else {}))
    captions = [r.get("caption") if isinstance(r.get("caption"), str) else "" for r in records]
    digest = hashlib.sha1("\x00".join(captions).encode("utf-8")).hexdigest()[:16]
    cache = Path(cache_dir) / f"caption_hierarchies-{digest}.json"
    if cache.is_file():
        parsed = json.loads(cache.read_text(encoding="utf-8"))
    else:
        logger.info("parsing %d captions with spaCy (once; cached in %s)", len(captions), cache)
        parsed = parse_hierarchies(captions, n_process=data_args.text_num_proc, progress=is_main)
        if is_main:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(parsed), encoding="utf-8")
            os.replace(tmp, cache)
    return [{**record, **hierarchy} for record, hierarchy in zip(records, parsed)]


def eval_records(data_args: DataArguments, output_dir: str | os.PathLike) -> list[dict[str, Any]] | None:
    """Held-out (image, long caption) pairs for retrieval R@k, or None when there are none."""
    if data_args.eval_data and data_args.eval_format == "docci":
        records = docci_records(data_args.eval_data, "test")
    elif data_args.eval_data:
        spec = TrainingSourceSpec(
            path=data_args.eval_data,
            format=data_args.eval_format,
            image_root=data_args.image_root,
            split="holdout" if data_args.eval_split == "holdout" else "all",
            holdout=data_args.holdout,
            image_column=data_args.image_column,
            caption_column=data_args.caption_column,
            short_caption_column=data_args.short_caption_column,
            record_index=data_args.record_index,
            index_dir=data_args.index_dir,
        )
        records = open_training_source(spec)
    elif data_args.data_format == "synthetic" or data_args.train_data == "synthetic":
        if data_args.synthetic_num_eval == 0:
            return None
        records = open_training_source(str(synthetic_paths(data_args, output_dir)["eval"]))
    else:
        return None
    if data_args.max_eval_samples is not None:
        records = records[: data_args.max_eval_samples]
    return records


def synthetic_hard_negatives(data_args: DataArguments, output_dir: str | os.PathLike):
    """The attribute-binding hard negatives of the synthetic held-out split (a `HardNegativeSet`, the first
    ``max_eval_samples`` scenes, as the retrieval pairs), or None when the training data are not the generated scenes,
    another evaluation set is given, or there are no held-out scenes."""
    synthetic = data_args.data_format == "synthetic" or (
        data_args.data_format == "auto" and data_args.train_data == "synthetic"
    )
    if not synthetic or data_args.eval_data or data_args.synthetic_num_eval == 0:
        return None
    from ..evaluation.hard_negatives import HardNegativeSet, read_hard_negatives

    full = read_hard_negatives(synthetic_paths(data_args, output_dir)["hard_negatives"], name="attribute binding")
    count = len(full.captions) if data_args.max_eval_samples is None else data_args.max_eval_samples
    return HardNegativeSet(full.name, full.image_paths[:count], full.captions[:count], full.negatives[:count],
                           full.negative_types[:count])


def retrieval_set(records: Sequence[dict[str, Any]], name: str = "heldout") -> RetrievalSet:
    """One caption per image (image ``i`` <-> caption ``i``); records without a string caption are left out."""
    kept = [r for r in records if isinstance(r.get("caption"), str) and r["caption"].strip()]
    if not kept:
        raise ValueError("no evaluation pair has a caption")
    return RetrievalSet(
        name=name,
        image_paths=[Path(r["image"]) for r in kept],
        texts=[" ".join(r["caption"].split()) for r in kept],
        text_to_image=list(range(len(kept))),
        split="heldout",
    )


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of indices for one process: slice ``rank`` of each global batch of a seeded per-epoch permutation.

    Args:
        num_samples (`int`): dataset length.
        batch_size (`int`): samples per process per batch.
        num_processes (`int`), rank (`int`): this process's place.
        seed (`int`), epoch (`int`): the permutation is ``randperm(num_samples)`` from a generator seeded with
            ``seed + epoch`` (the identity when not `shuffle`).
        start_batch (`int`): global batches to skip (resuming inside an epoch).
    Incomplete global batches at the end are dropped, so every process gets the same number of batches.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
    ):
        if not 0 <= rank < num_processes:
            raise ValueError(f"rank {rank} outside [0, {num_processes})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_processes, self.rank = num_processes, rank
        self.seed, self.epoch, self.start_batch, self.shuffle = seed, epoch, start_batch, shuffle

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, num_processes: int) -> int:
        return num_samples // (batch_size * num_processes)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.num_samples, self.batch_size, self.num_processes) - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        global_batch = self.batch_size * self.num_processes
        total = self.batches_per_epoch(self.num_samples, self.batch_size, self.num_processes)
        for b in range(self.start_batch, total):
            start = b * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size]


__all__ = [
    "GlobalBatchSampler",
    "add_caption_hierarchies",
    "eval_records",
    "log_sharegpt4v_holdout",
    "retrieval_set",
    "synthetic_hard_negatives",
    "synthetic_paths",
    "training_records",
]


class SeededCollator:
    """Wrap a collator whose own sampler (``.rng``: beta-CLIP's sentence sampling, MulCLIP's random subcaptions)
    should be reproducible: before each batch the sampler is reseeded from (seed, epoch, the batch's example ids).

    Without this, each DataLoader worker advances its own copy of the sampler, so the draws depend on the number of
    workers and on where a resumed run restarted.
    """

    def __init__(self, collator, seed: int):
        self.collator = collator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, examples):
        if hasattr(self.collator, "rng"):
            import random

            ids = "\x00".join(str(e.get("id")) for e in examples)
            digest = hashlib.blake2b(f"{self.seed}|{self.epoch}|{ids}".encode("utf-8"), digest_size=8).digest()
            self.collator.rng = random.Random(int.from_bytes(digest, "little"))
        return self.collator(examples)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (every device) from (seed, step, rank) at the start of an optimiser step, with
    accelerate's `set_seed`.

    Random choices inside the model (Fix-CLIP's patch masks, dropout) then depend only on the step, not on how much
    randomness earlier steps, data loading or evaluation consumed, which makes resumed runs bit-identical.
    """
    from accelerate.utils import set_seed

    set_seed(((seed * 1_000_003 + step) * 10_007 + rank) % 2**32)  # numpy takes seeds below 2**32


__all__ += ["SeededCollator", "seed_step"]
