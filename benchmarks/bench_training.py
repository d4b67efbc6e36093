"""Training step time and peak memory of every variant against a stock CLIP step, with a per-part breakdown; the
training script's throughput; and the quickstart's wall time.

All runs use the same data: a randomly initialised ViT-B/16-shaped CLIP (12 + 12 layers, width 768 / 512, 224 px,
248 text positions after the stretch), saved to a temporary folder as a stock CLIP checkpoint, and JSONL pairs of
224 px scene images with ShareGPT4V-like long captions (8 sentences, about 150 tokens).

* **Model steps** (default): each variant, and a stock transformers ``CLIPModel`` with a 248-row position table
  (InfoNCE on the long captions: the floor), runs in its own subprocess (peak RSS per variant) on batches from the
  variant's own collator (beta-CLIP's hierarchy parsed with spaCy). Reported: the median step time after a warm-up
  step (forward + backward + AdamW), peak RSS, both as ratios to the stock step of the same run, and from one more
  profiled step the per-part breakdown (``step_profile.py``): image tower, text tower, heads, loss & glue and
  optimiser time, and the activations each part saves for the backward pass.
* **Training script** (``--trainer``): each variant through ``hf_longclip.training.main`` (data loading included):
  median step time after the first, samples/s, peak RSS.

Usage::

    python benchmarks/bench_training.py                     # model steps: stock + every variant, batch 16, fp32 CPU
    python benchmarks/bench_training.py --variants longclip,betaclip --batch-size 8 --steps 2
    python benchmarks/bench_training.py --variants longclip,fixclip --extra fixclip-drop fixclip '{"masked_patches": "drop"}'
    python benchmarks/bench_training.py --variants longclip,betaclip --extra betaclip-before betaclip \
        '{"pack_query_texts": false, "memory_efficient_activations": false}'   # before issue 20's changes
    python benchmarks/bench_training.py --trainer --no-steps   # the training script only
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


#: Runs in the child: direct training steps of one model on the variant's batches, then one profiled step.
STEP_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench_training import step_child
print("BENCH " + json.dumps(step_child(*sys.argv[2:])))
"""


def step_child(label: str, variant: str, fields: str, base: str, table: str, batch_size: str, steps: str,
               device: str) -> dict:
    """One model's step time, peak memory and per-part breakdown (runs in its own process)."""
    import resource
    import statistics

    import torch
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel

    from hf_longclip.models.processing_longclip import LongCLIPProcessor
    from step_profile import StepProfiler

    torch.manual_seed(0)
    batch_size, steps = int(batch_size), int(steps)
    records = [json.loads(line) for line in Path(table).read_text().splitlines()][:batch_size]
    processor = LongCLIPProcessor.from_clip(base)
    examples = [{"image": Image.open(r["image"]).convert("RGB"), "caption": r["caption"], "id": i}
                for i, r in enumerate(records)]
    if variant == "stock":
        collator = VARIANTS["longclip"].make_collator(processor, seed=0)
        config = CLIPConfig.from_pretrained(base)
        config.text_config.max_position_embeddings = 248
        model = CLIPModel(config)
        keep = ("pixel_values", "input_ids", "attention_mask")
    else:
        entry = VARIANTS[variant]
        if entry.record_fields:
            from hf_longclip.text import parse_hierarchies

            for example, parsed in zip(examples, parse_hierarchies([e["caption"] for e in examples])):
                example.update({k: parsed[k] for k in entry.record_fields if k in parsed})
        collator = entry.make_collator(processor, seed=0)
        fields = json.loads(fields)
        efficient = fields.pop("memory_efficient_activations", True)  # False: transformers' QuickGELU (the "before")
        model = entry.model_class.from_clip(base, **fields)
        if not efficient:
            from hf_longclip.models.activations import use_memory_efficient_activations

            use_memory_efficient_activations(model, False)
        keep = None
    batch = collator(examples)
    batch = {k: v.to(device) for k, v in batch.items() if keep is None or k in keep}
    model = model.train().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    after = getattr(model, "after_optimizer_step", None)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        if after is not None:
            after()
        return loss

    times = []
    for i in range(steps + 1):  # the first step is a warm-up
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    profiler = StepProfiler(model, device)
    profiler.step(batch, optimizer, after)
    return {"label": label, "step_s": statistics.median(times), "peak_mib": peak, "parts": profiler.report(),
            "text_positions": text_positions(batch)}


def text_positions(batch: dict) -> int:
    """Token positions of the batch's text tensors as collated (padding included)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))


def bench_steps(args) -> None:
    from step_profile import format_breakdown

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_base_model(tmp / "base", args.tiny)
        table = make_pairs(tmp / "data", args.batch_size, 64 if args.tiny else 224)
        runs = [("stock CLIP", "stock", {})] + [(variant, variant, {}) for variant in args.variants]
        runs += [(label, variant, json.loads(fields)) for label, variant, fields in args.extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        results = []
        for label, variant, fields in runs:
            if args.tiny and variant != "stock":
                fields = {**dict(VARIANTS[variant].tiny_config), **fields}
            cmd = [sys.executable, "-c", STEP_CHILD, str(ROOT / "benchmarks"), label, variant, json.dumps(fields),
                   str(tmp / "base"), str(table), str(args.batch_size), str(args.steps), args.device]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-4000:])
            result = json.loads([l for l in done.stdout.splitlines() if l.startswith("BENCH ")][-1][6:])
            results.append(result)
            stock = results[0]
            print(f"{label:14s} step {result['step_s']:7.2f} s ({result['step_s'] / stock['step_s']:.2f}x stock)  "
                  f"peak {result['peak_mib']:7.0f} MiB ({result['peak_mib'] / stock['peak_mib']:.2f}x stock)  "
                  f"text positions {result['text_positions']}", flush=True)
        print("per-part breakdown of one profiled step (time share; activations saved for backward):")
        for result in results:
            print(format_breakdown(result["label"], result["parts"]))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


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
    parser.add_argument("--trainer", action="store_true", help="also time the training script (data loading included)")
    parser.add_argument("--no-steps", action="store_true", help="skip the model-step comparison")
    parser.add_argument("--device", default="cpu", help="model steps: cpu or cuda")
    parser.add_argument("--json", default=None, help="model steps: also write the results here")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{'tiny' if args.tiny else 'ViT-B/16'} shapes, fp32 CPU")
    if not args.quickstart_only and not args.no_steps:
        bench_steps(args)
    if not args.quickstart_only and args.trainer:
        bench_variants(args)
    if not args.no_quickstart:
        bench_quickstart()


if __name__ == "__main__":
    main()
