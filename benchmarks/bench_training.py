"""Training throughput and peak memory of every variant through the real training script, and the quickstart's
wall time.

Each variant runs the trainer (``hf_longclip.training.main``) in its own subprocess (peak memory per variant) on the
same data: a randomly initialised ViT-B/16-shaped CLIP (12 + 12 layers, width 768 / 512, 224 px, 248 text positions
after the stretch), saved to a temporary folder as a stock CLIP checkpoint, and JSONL pairs of 224 px scene images
with ShareGPT4V-like long captions (8 sentences, about 150 tokens). Reported per variant: the median step time after
the first step (data loading + forward + backward + AdamW), samples/s, and the process's peak RSS.

Usage::

    python benchmarks/bench_training.py                     # all variants, batch 16, 4 steps each, fp32 CPU
    python benchmarks/bench_training.py --variants longclip,finelip --steps 3
    python benchmarks/bench_training.py --variants longclip,fixclip --extra fixclip-drop fixclip '{"masked_patches": "drop"}'
    python benchmarks/bench_training.py --quickstart-only   # only the quickstart's wall time
    python benchmarks/bench_training.py --tiny              # small shapes: a smoke test in seconds

The machine may be shared: compare the ratios of one run rather than absolute seconds.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from hf_longclip.variants import VARIANTS  # noqa: E402

#: Runs in the child: train, then report the summary and the peak RSS as one JSON line.
CHILD = """
import json, resource, sys
from hf_longclip.training import main
summary = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("BENCH " + json.dumps({"summary": summary, "peak_rss_mib": peak}))
"""


def make_base_model(folder: Path, tiny: bool) -> None:
    """A random stock CLIP checkpoint (ViT-B/16 shapes) with a locally built tokenizer and PIL image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from bench_mulclip import COLOURS, PLACES, PREPS, SUBJECTS, VERBS
    from hf_longclip.data.synthetic import SYNTHETIC_WORDS
    from hf_longclip.data.tokenizer import build_clip_tokenizer

    words = set(SYNTHETIC_WORDS) | set(SUBJECTS + COLOURS + PLACES + VERBS + PREPS)
    words |= set("the image shows a in bright room is of scene and can be seen next to it on".split())
    tokenizer = build_clip_tokenizer(sorted(words), model_max_length=77)
    eos = len(tokenizer) - 1
    text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                  patch_size=16)
    size = 224
    if tiny:
        text.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=eos + 1)
        vision.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64)
        size = 64
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64 if tiny else 512)).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def make_pairs(folder: Path, count: int, size: int) -> Path:
    """`count` JSONL pairs: rendered scenes at `size` px with 8-sentence long captions."""
    from bench_mulclip import synthetic_caption
    from hf_longclip.data.synthetic import iter_scenes

    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(iter_scenes(count, seed=3)):
        path = folder / "images" / f"{i:04d}.png"
        scene.render(size).save(path)
        lines.append(json.dumps({"image": str(path), "caption": synthetic_caption(rng, 8)}))
    table = folder / "pairs.jsonl"
    table.write_text("\n".join(lines) + "\n")
    return table


def run_child(flags: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = CHILD
    done = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    line = [l for l in done.stdout.splitlines() if l.startswith("BENCH ")][-1]
    return json.loads(line[len("BENCH "):])


def bench_variants(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_base_model(tmp / "base", args.tiny)
        size = 64 if args.tiny else 224
        table = make_pairs(tmp / "data", args.batch_size * (args.steps + 1), size)
        rows = []
        runs = [(variant, variant, {}) for variant in args.variants]
        runs += [(label, variant, json.loads(fields)) for label, variant, fields in args.extra]
        for label, variant, fields in runs:
            flags = ["--variant", variant, "--base", str(tmp / "base"), "--train_data", str(table),
                     "--output_dir", str(tmp / f"run-{variant}"), "--per_device_train_batch_size", str(args.batch_size),
                     "--max_steps", str(args.steps), "--save_steps", "0", "--save_final_model", "false",
                     "--num_workers", str(args.workers), "--mixed_precision", "no", "--disable_progress_bar", "true",
                     "--logging_steps", "1", "--eval_before_training", "false", "--transform", "eval"]
            model_config = {**(dict(VARIANTS[variant].tiny_config) if args.tiny else {}), **fields}
            if model_config:  # tiny: 2-layer towers (e.g. Fix-CLIP's groups must divide them); --extra settings
                flags += ["--model_config", json.dumps(model_config)]
            flags[flags.index("--output_dir") + 1] = str(tmp / f"run-{label}")
            start = time.perf_counter()
            result = run_child(flags)
            summary = result["summary"]
            rows.append((label, summary["seconds_per_step"], summary["samples_per_second"], result["peak_rss_mib"],
                         time.perf_counter() - start))
            print(f"{label:12s} step {summary['seconds_per_step']:7.2f} s  {summary['samples_per_second']:6.2f} "
                  f"samples/s  peak RSS {result['peak_rss_mib']:7.0f} MiB  (process {rows[-1][4]:.0f} s)", flush=True)
        base = {r[0]: r for r in rows}.get("longclip")
        if base:
            print("ratios to Long-CLIP (step time, peak RSS): " + ", ".join(
                f"{r[0]} {r[1] / base[1]:.2f}x / {r[3] / base[3]:.2f}x" for r in rows))


def bench_quickstart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = run_child(["--config", str(ROOT / "training_scripts" / "configs" / "quickstart.yaml"),
                            "--output_dir", str(Path(tmp) / "quickstart"), "--disable_progress_bar", "true"])
        wall = time.perf_counter() - start
        evals = result["summary"]["evaluations"]
        print(f"quickstart: {wall:.0f} s wall (data generation, 2 evaluations, {result['summary']['global_step']} "
              f"steps, save), held-out t2i R@1 {evals['before']['t2i_R@1']:.1f} -> {evals['after']['t2i_R@1']:.1f}, "
              f"i2t R@1 {evals['before']['i2t_R@1']:.1f} -> {evals['after']['i2t_R@1']:.1f}, peak RSS "
              f"{result['peak_rss_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant (the first is not timed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--extra", nargs=3, action="append", default=[], metavar=("LABEL", "VARIANT", "JSON"),
        help="one more run of VARIANT with these model settings, reported as LABEL (repeatable), e.g. --extra "
        "fixclip-drop fixclip '{\"masked_patches\": \"drop\"}'",
    )
    parser.add_argument("--quickstart-only", action="store_true")
    parser.add_argument("--no-quickstart", action="store_true")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{'tiny' if args.tiny else 'ViT-B/16'} shapes, fp32 CPU")
    if not args.quickstart_only:
        bench_variants(args)
    if not args.no_quickstart:
        bench_quickstart()


if __name__ == "__main__":
    main()
