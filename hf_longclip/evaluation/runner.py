"""Run a list of benchmarks on one model and write one JSON results file."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from .fgovd import evaluate_fgovd
from .hard_negatives import HARD_NEGATIVE_PREFIX, evaluate_hard_negatives, read_hard_negatives, resolve_hard_negative_path
from .readers import RETRIEVAL_READERS, read_fgovd, read_zeroshot
from .retrieval import EvalSettings, check_scoring, evaluate_retrieval
from .zeroshot import evaluate_zeroshot

#: Every benchmark name `evaluate` accepts.
BENCHMARKS: tuple[str, ...] = (*RETRIEVAL_READERS, "fgovd", "zeroshot")
#: The long-caption benchmarks (for cards and summaries).
LONG_TEXT_BENCHMARKS = ("urban1k", "dci", "sharegpt4v-1k", "docci")


def parse_benchmarks(spec: str | Sequence[str]) -> list[str]:
    """`"urban1k,coco"` or a list -> validated names (``"all"`` = every benchmark).

    ``hardneg:<path.jsonl>`` adds a hard-negative file (`evaluate_hard_negatives`); its path keeps its case and may not
    contain a comma. It may follow ``all`` (``"all,hardneg:x.jsonl"``).
    """
    names = []
    for raw in spec.split(",") if isinstance(spec, str) else spec:
        raw = raw.strip()
        if raw.lower().startswith(HARD_NEGATIVE_PREFIX):
            path = raw[len(HARD_NEGATIVE_PREFIX) :].strip()
            if not path:
                raise ValueError(f"benchmark {raw!r} names no file; write {HARD_NEGATIVE_PREFIX}<path.jsonl>")
            names.append(HARD_NEGATIVE_PREFIX + path)
        elif raw:
            names.append(raw.lower())
    if "all" in names:
        names = [*BENCHMARKS, *(n for n in names if n != "all" and n not in BENCHMARKS)]
    unknown = [n for n in names if n not in BENCHMARKS and not n.startswith(HARD_NEGATIVE_PREFIX)]
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)} or {HARD_NEGATIVE_PREFIX}<path.jsonl>"
        )
    return list(dict.fromkeys(names))


def needs_data_root(names: Sequence[str]) -> bool:
    """Whether any of the (parsed) benchmark names is read from ``--data-root`` (a ``hardneg:`` file is not)."""
    return any(not name.startswith(HARD_NEGATIVE_PREFIX) for name in names)


def check_output_path(output: str | os.PathLike) -> Path:
    """`output` as a `Path` if a results file can be written there, else a one-line `ValueError`: an existing folder,
    an existing file that is not writable, a parent path that is a file, or a folder without write permission. Run
    before any model work, so a long evaluation never ends in an unwritable path."""
    path = Path(output)
    if str(output).strip() == "":
        raise ValueError("the results path is empty; give a file path such as results.json")
    if path.is_dir():
        raise ValueError(f"results path {str(output)!r} is a folder; give a file path such as {str(path / 'results.json')!r}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"results file {str(output)!r} exists and is not writable")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot write results to {str(output)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write results to {str(output)!r}: no write permission in {str(ancestor)!r}")
    return path


def evaluate(
    model,
    processor,
    benchmarks: str | Sequence[str],
    data_root: str | Path | None,
    scoring: str = "global",
    settings: EvalSettings | None = None,
    fgovd_splits: Sequence[str] | None = None,
    zeroshot_templates=None,
    output: str | Path | None = None,
    model_name: str | None = None,
) -> dict:
    """Evaluate `model` on `benchmarks` read from `data_root`; optionally write the results JSON to `output`.

    Every benchmark's layout is read (and checked) before any model work starts, so a missing folder fails fast with
    the expected layout in the message; so is `output` (`check_output_path`: not a folder, writable). `data_root`
    may be None when every benchmark is a ``hardneg:<path>`` file.

    Returns:
        ``{"model", "scoring", "settings", "date", "benchmarks": {name: metrics}}``; retrieval metrics are
        `t2i_R@k` / `i2t_R@k` in percent, FG-OVD ``{"splits": {split: {"accuracy", ...}}, "mean_accuracy"}``,
        zero-shot `top1` / `top5`, hard negatives (``hardneg:<path>``) `accuracy`, `mean_rank`, `chance`,
        `per_type` (see `hard_negative_accuracy`).
    """
    settings = settings or EvalSettings()
    names = parse_benchmarks(benchmarks)
    if data_root is None and needs_data_root(names):
        raise ValueError("a data root is needed for " + ", ".join(n for n in names if not n.startswith(HARD_NEGATIVE_PREFIX)))
    if output is not None:
        output = check_output_path(output)
    check_scoring(model, scoring)
    data = {}
    for name in names:
        if name.startswith(HARD_NEGATIVE_PREFIX):
            data[name] = read_hard_negatives(resolve_hard_negative_path(name, data_root), name=name)
        elif name in RETRIEVAL_READERS:
            data[name] = RETRIEVAL_READERS[name](data_root)
        elif name == "fgovd":
            data[name] = read_fgovd(data_root, fgovd_splits)
        else:
            data[name] = read_zeroshot(data_root)
    results = {}
    for name in names:
        start = time.perf_counter()
        if name.startswith(HARD_NEGATIVE_PREFIX):
            results[name] = evaluate_hard_negatives(model, processor, data[name], scoring, settings)
        elif name in RETRIEVAL_READERS:
            results[name] = evaluate_retrieval(model, processor, data[name], scoring, settings)
        elif name == "fgovd":
            results[name] = evaluate_fgovd(model, processor, data[name], settings)
        else:
            results[name] = evaluate_zeroshot(model, processor, data[name], zeroshot_templates, settings)
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
    report = {
        "model": model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "scoring": scoring,
        "settings": {
            "batch_size": settings.batch_size,
            "dtype": settings.dtype,
            "device": str(settings.device or next(model.parameters()).device),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "benchmarks": results,
    }
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


__all__ = ["BENCHMARKS", "LONG_TEXT_BENCHMARKS", "check_output_path", "evaluate", "needs_data_root", "parse_benchmarks"]
