"""Fine-grained quality of every variant at the quickstart scale: the same generated scenes, the same step budget,
batch and seeds, through the real trainer; several seeds, mean and spread.

Each run is one subprocess that calls ``hf_longclip.training.main`` with the quickstart recipe
(``--config quickstart --variant V``, plus the variant's quickstart settings, `variant_flags`) and then, on the saved
model, scores the 200 held-out scenes:

- long-caption R@1 both ways (the trainer's own before/after evaluation, global CLS / EOT scoring);
- short-caption R@1: the first sentence ("The image shows four shapes on a gray background") as the query. Many
  scenes share it (8 distinct first sentences), so a hit is any image / caption the query describes: t2i counts the
  top image as right when its own first sentence is the query, i2t ranks the distinct first sentences. The
  chance levels of both are reported next to them;
- attribute binding (5 one-edit hard negatives per image, `hf_longclip.evaluation.hard_negatives`): accuracy and
  the pairwise accuracy per negative type;
- the same three with each fine-grained scoring the model offers (FineLIP "clim" / "fused", beta-CLIP "tci").

Every run's wall time (training with both evaluations, as the trainer runs them) is recorded. The table prints
mean +- std over seeds (population std, ``std`` of numpy, ddof 0) and the min-max range of the headline numbers.

Usage::

    python benchmarks/bench_finegrained.py                          # 5 variants x seeds 0 1 2 (CPU: ~40 min)
    python benchmarks/bench_finegrained.py --variants longclip,finelip --seeds 0
    python benchmarks/bench_finegrained.py --smoke                  # tiny model, 3 steps, 1 seed, 2 variants (< 60 s)
    python benchmarks/bench_finegrained.py --table a.json b.json    # the table of earlier runs' JSON files, pooled

Runs run one after another (one CPU process each); a shared machine makes wall times noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_longclip.variants import VARIANTS  # noqa: E402

QUICKSTART = ROOT / "training_scripts" / "configs" / "quickstart.yaml"
NEGATIVE_TYPES = ("colour", "shape", "size", "position", "swap")

#: The tests' tiny model and data (tests/test_train_script.py), for --smoke.
SMOKE_FLAGS = [
    "--base", "tiny-random", "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "4",
    "--tiny_projection_dim", "32", "--tiny_image_size", "48", "--tiny_patch_size", "16",
    "--synthetic_image_size", "48", "--synthetic_num_train", "32", "--synthetic_num_eval", "12",
    "--max_steps", "3", "--warmup_steps", "1", "--per_device_train_batch_size", "8", "--eval_batch_size", "16",
]


def variant_flags(variant: str) -> list[str]:
    """The variant's quickstart settings: ``--config quickstart-<variant>`` when that recipe ships, else the plain
    quickstart recipe under ``--variant``."""
    own = ROOT / "training_scripts" / "configs" / f"quickstart-{variant}.yaml"
    return ["--config", str(own if own.is_file() else QUICKSTART), "--variant", variant]


# ------------------------------------------------------------------------------------------------ child process
def short_caption_recall(model, processor, records: list[dict], scoring: str, batch_size: int) -> dict:
    """R@1 with the first sentence as the query, any described image / caption counting as a hit (see the module
    docstring), plus the chance level of each direction."""
    from hf_longclip.evaluation.retrieval import EvalSettings, encode_images, encode_texts, score_matrix

    settings = EvalSettings(batch_size=batch_size, device="cpu", progress=False)
    shorts = [r["short_caption"] for r in records]
    distinct = sorted(set(shorts))
    label = np.array([distinct.index(s) for s in shorts])
    images, kept, _ = encode_images(model, processor.image_processor, [r["image"] for r in records], scoring, settings)
    label = label[kept]
    texts = encode_texts(model, processor.tokenizer, distinct, scoring, settings)
    scores = score_matrix(model, images, texts, scoring, settings).numpy()  # (images, distinct captions)
    i2t = float((scores.argmax(1) == label).mean() * 100)
    t2i = float(np.mean([label[scores[:, c].argmax()] == c for c in label]) * 100)  # one query per scene
    counts = np.bincount(label, minlength=len(distinct))
    return {
        "short_t2i_R@1": t2i,
        "short_i2t_R@1": i2t,
        "short_t2i_chance": float((counts / counts.sum()) @ (counts / counts.sum()) * 100),
        "short_i2t_chance": 100.0 / len(distinct),
        "short_num_distinct": len(distinct),
    }


def evaluate_saved(output_dir: Path, data_dir: Path, batch_size: int) -> dict:
    """Short-caption R@1 (global scoring) and, per fine-grained scoring of the model, long R@1, short R@1 and
    attribute binding, on the held-out scenes of `data_dir`."""
    import torch
    from transformers import AutoModel, AutoProcessor

    import hf_longclip  # noqa: F401  (Auto registration)
    from hf_longclip.evaluation.hard_negatives import evaluate_hard_negatives, read_hard_negatives
    from hf_longclip.evaluation.retrieval import EvalSettings, evaluate_retrieval
    from hf_longclip.training.data import retrieval_set

    model = AutoModel.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    records = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    for record in records:
        record["image"] = str(data_dir / record["image"])
    hard = read_hard_negatives(data_dir / "hard_negatives.jsonl")
    settings = EvalSettings(batch_size=batch_size, device="cpu", progress=False)
    result: dict = {"global": short_caption_recall(model, processor, records, "global", batch_size)}
    for scoring in getattr(model, "retrieval_scorings", ("global",)):
        if scoring == "global":
            continue
        with torch.inference_mode():
            long = evaluate_retrieval(model, processor, retrieval_set(records), scoring=scoring, settings=settings)
            binding = evaluate_hard_negatives(model, processor, hard, scoring=scoring, settings=settings)
        metrics = {"t2i_R@1": long["t2i_R@1"], "i2t_R@1": long["i2t_R@1"],
                   "attribute_binding_accuracy": binding["accuracy"]}
        metrics.update({f"attribute_binding_{k}": v["accuracy"] for k, v in binding.get("per_type", {}).items()})
        metrics.update(short_caption_recall(model, processor, records, scoring, batch_size))
        result[scoring] = metrics
    return result


def train_and_evaluate(data_dir: Path, batch_size: int, flags: list[str]) -> dict:
    """Train (timed), then evaluate the saved model."""
    from hf_longclip.training import main

    start = time.perf_counter()
    summary = main(flags)
    wall = time.perf_counter() - start
    extra = evaluate_saved(Path(summary["output_dir"]), data_dir, batch_size)
    keep = {k: summary.get(k) for k in ("global_step", "total_steps", "first_loss_terms", "last_loss_terms",
                                         "evaluations", "seconds_per_step", "finished")}
    return {"summary": keep, "wall_s": wall, "extra": extra}


def child(argv: list[str]) -> None:
    """`train_and_evaluate` in a subprocess; prints one ``BENCH {json}`` line."""
    record = train_and_evaluate(Path(argv[0]), int(argv[1]), argv[2:])
    print("BENCH " + json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------ parent
def run_one(variant: str, seed: int, work: Path, smoke: bool, extra: list[str], in_process: bool = False) -> dict:
    """One run; in its own subprocess (clean state, its own imports), or `in_process` (faster start: --smoke)."""
    data = work / "data"
    out = work / "runs" / f"{variant}-seed{seed}"
    flags = variant_flags(variant) + [
        "--output_dir", str(out), "--overwrite_output_dir", "true", "--seed", str(seed), "--image_root", str(data),
        "--text_cache_dir", str(data), "--save_steps", "0", "--disable_progress_bar", "true",
    ] + (SMOKE_FLAGS if smoke else []) + extra
    batch = "16" if smoke else "200"
    if in_process:
        start = time.perf_counter()
        record = train_and_evaluate(data, int(batch), flags)
        record.update(variant=variant, seed=seed, flags=flags, process_wall_s=time.perf_counter() - start)
        return record
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{variant}-seed{seed}.log"  # the trainer's log (per-term losses), written as it runs
    start = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(data), batch, *flags],
                              stdout=subprocess.PIPE, stderr=stream, text=True, env=env, cwd=ROOT)
    total = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{variant} seed {seed} failed (exit {done.returncode}):\n{log.read_text()[-3000:]}")
    record = json.loads(lines[-1][len("BENCH "):])
    record.update(variant=variant, seed=seed, flags=flags, process_wall_s=total)
    return record


def headline(run: dict) -> dict[str, float]:
    """The numbers of one run the table shows (global scoring unless a key says otherwise)."""
    after = run["summary"]["evaluations"]["after"]
    row = {
        "long_t2i_R@1": after["t2i_R@1"],
        "long_i2t_R@1": after["i2t_R@1"],
        "short_t2i_R@1": run["extra"]["global"]["short_t2i_R@1"],
        "short_i2t_R@1": run["extra"]["global"]["short_i2t_R@1"],
        "binding": after["attribute_binding_accuracy"],
        **{f"binding_{t}": after[f"attribute_binding_{t}"] for t in NEGATIVE_TYPES if f"attribute_binding_{t}" in after},
        "wall_s": run["wall_s"],
    }
    for scoring, metrics in run["extra"].items():
        if scoring != "global":
            row[f"{scoring}:long_t2i_R@1"] = metrics["t2i_R@1"]
            row[f"{scoring}:long_i2t_R@1"] = metrics["i2t_R@1"]
            row[f"{scoring}:binding"] = metrics["attribute_binding_accuracy"]
    return row


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """Per variant: for each headline number, mean, std (ddof 0), min, max and the number of seeds."""
    table: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = [headline(r) for r in runs if r["variant"] == variant]
        keys = [k for k in rows[0] if all(k in row for row in rows)]
        table[variant] = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                "n": len(v)}
            for k in keys
            for v in [[row[k] for row in rows]]
        }
    return table


def format_table(table: dict[str, dict]) -> str:
    """Text table: mean +- std over seeds (population std) per column, plus min-max of binding and wall time."""
    def cell(stats, key, width=12):
        s = stats.get(key)
        return (f"{s['mean']:.1f}+-{s['std']:.1f}" if s else "-").rjust(width)

    cols = [("long t2i", "long_t2i_R@1"), ("long i2t", "long_i2t_R@1"), ("short t2i", "short_t2i_R@1"),
            ("short i2t", "short_i2t_R@1"), ("binding", "binding")]
    lines = ["R@1 / accuracy in %, mean+-std over seeds (std: population, ddof 0); global CLS/EOT scoring",
             "variant    seeds" + "".join(n.rjust(12) for n, _ in cols) + "  binding min-max      wall s (min-max)"]
    for variant, stats in table.items():
        b, w = stats["binding"], stats["wall_s"]
        lines.append(f"{variant:<10} {b['n']:>5}" + "".join(cell(stats, k) for _, k in cols)
                     + f"  {b['min']:5.1f}-{b['max']:<5.1f}   {w['mean']:6.0f} ({w['min']:.0f}-{w['max']:.0f})")
    lines += ["", "attribute binding per negative type (pairwise accuracy %, mean+-std)",
              "variant   " + "".join(t.rjust(12) for t in NEGATIVE_TYPES)]
    for variant, stats in table.items():
        lines.append(f"{variant:<10}" + "".join(cell(stats, f"binding_{t}") for t in NEGATIVE_TYPES))
    fine = [(v, k.split(":")[0]) for v, stats in table.items() for k in stats if k.endswith(":binding")]
    if fine:
        lines += ["", "fine-grained scorings of the same models (mean+-std)",
                  "variant   scoring " + "".join(n.rjust(12) for n in ("long t2i", "long i2t", "binding"))]
        for variant, scoring in fine:
            stats = table[variant]
            lines.append(f"{variant:<10}{scoring:<8}" + "".join(
                cell(stats, f"{scoring}:{k}") for k in ("long_t2i_R@1", "long_i2t_R@1", "binding")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, seed 0, longclip + finelip")
    parser.add_argument("--work-dir", default=None, help="data and run folders (default: a temporary folder)")
    parser.add_argument("--json", default=str(ROOT / "outputs" / "bench_finegrained.json"), help="results file")
    parser.add_argument("--table", nargs="+", default=None, help="only print the table of these results files")
    parser.add_argument("--in-process", action="store_true", help="train in this process (default with --smoke)")
    parser.add_argument("--trainer-args", default="", help="extra trainer words for every run (one string)")
    args = parser.parse_args(argv)
    if args.table:  # one or more results files: their runs are pooled (e.g. seed 0 of one run, seeds 1-2 of another)
        runs = [run for path in args.table for run in json.loads(Path(path).read_text())["runs"]]
        results = {"table": aggregate(runs), "runs": runs}
        print(format_table(results["table"]))
        return results
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    seeds = args.seeds
    if args.smoke:
        variants = variants if args.variants != ",".join(VARIANTS) else ["longclip", "finelip"]
        seeds = [seeds[0]] if args.seeds != [0, 1, 2] else [0]
    extra = args.trainer_args.split()
    with tempfile.TemporaryDirectory(prefix="bench-finegrained-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        runs = []
        for seed in seeds:  # seed-major: a cut-short benchmark still has every variant at the first seed
            for variant in variants:
                run = run_one(variant, seed, work, args.smoke, extra, in_process=args.smoke or args.in_process)
                h = headline(run)
                print(f"{variant} seed {seed}: long R@1 t2i {h['long_t2i_R@1']:.1f} i2t {h['long_i2t_R@1']:.1f}  "
                      f"short t2i {h['short_t2i_R@1']:.1f} i2t {h['short_i2t_R@1']:.1f}  binding {h['binding']:.1f}  "
                      f"{run['wall_s']:.0f} s", flush=True)
                runs.append(run)
                table = aggregate(runs)
                results = {"smoke": args.smoke, "variants": variants, "seeds": seeds, "trainer_args": extra,
                           "spread": "std over seeds, population (ddof 0); min and max also given",
                           "table": table, "runs": runs}
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=1))  # after every run: partial results survive
    print()
    print(format_table(table))
    print(f"\nresults: {args.json}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
