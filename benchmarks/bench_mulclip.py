"""Time one MulCLIP training step against a stock CLIP step and a Long-CLIP step on the same batch.

Modes (each in its own subprocess, so peak memory is per mode), same synthetic batch and random weights:

* ``stock``: transformers' ``CLIPModel`` (248 text positions), long captions padded to the batch's longest caption,
  symmetric InfoNCE: the floor of DESIGN.md's performance table.
* ``longclip``: ``LongCLIPModel`` with long + short captions (short ones at their own length, PCA term).
* ``mulclip``: ``MulCLIPModel`` with long captions, summaries and up to ``M`` subcaptions per image (only real
  subcaptions encoded, packed at their own length), calibration heads, ``L_word`` and ``L_sub``.
* ``interleaved``: the three models in one process, timed alternately (best of ``--repeats`` rounds): the ratios least
  disturbed by other load on a shared machine.

A step is forward + backward + AdamW step. Peak memory: the increase of the process's peak RSS over its RSS before
the first step on CPU, or ``torch.cuda.max_memory_allocated`` on CUDA. The machine may be shared: compare the ratios
of one run rather than absolute seconds.

Usage::

    python benchmarks/bench_mulclip.py                # tiny shapes, seconds
    python benchmarks/bench_mulclip.py --full         # ViT-B/16 + 12-layer text tower, 224 px, batch 16, fp32
    python benchmarks/bench_mulclip.py --full --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SUBJECTS = "dog cat man woman car tree house table chair lamp sofa rug window bicycle boat bird horse".split()
COLOURS = "red green blue yellow white black brown striped wooden small large old".split()
PLACES = "left right top bottom front back middle center".split()
VERBS = "sitting standing leaning lying resting parked hanging".split()
PREPS = "against on near under beside behind".split()


def synthetic_caption(rng: random.Random, sentences: int) -> str:
    """A ShareGPT4V / DOCCI-like long caption (about 10-25 words per sentence)."""
    out = ["The image shows a " + rng.choice(COLOURS) + " " + rng.choice(SUBJECTS) + " in a bright room"]
    for _ in range(sentences - 1):
        a, b, c = rng.sample(SUBJECTS, 3)
        sentence = f"A {rng.choice(COLOURS)} {a} is {rng.choice(VERBS)} {rng.choice(PREPS)} the {rng.choice(COLOURS)} {b}"
        if rng.random() < 0.5:
            sentence += f" on the {rng.choice(PLACES)} of the scene"
        if rng.random() < 0.5:
            sentence += f", and a {rng.choice(COLOURS)} {c} can be seen next to it"
        out.append(sentence)
    return ". ".join(out) + "."


def build_batch(args):
    """(eos id, bos id, collated MulCLIP batch)."""
    from transformers import CLIPImageProcessorPil

    from hf_longclip.data import MulCLIPCollator
    from hf_longclip.data.tokenizer import build_clip_tokenizer
    from hf_longclip.models.processing_longclip import LongCLIPProcessor

    rng = random.Random(0)
    captions = [synthetic_caption(rng, rng.randint(args.min_sentences, args.max_sentences)) for _ in range(args.batch)]
    words = {w.strip(".,").lower() for c in captions for w in c.split()}
    tokenizer = build_clip_tokenizer(words, model_max_length=248)
    size = args.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LongCLIPProcessor.from_parts(image_processor, tokenizer, 248)
    torch.manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, size, size), "caption": c} for c in captions]
    batch = MulCLIPCollator(processor, max_subcaptions=args.max_subcaptions)(examples)
    return tokenizer.eos_token_id, tokenizer.bos_token_id, batch


def clip_config(args, eos, bos):
    from transformers import CLIPConfig

    if args.full:
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        projection = 512
    else:
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        projection = 64
    text.update(vocab_size=49408, max_position_embeddings=77, eos_token_id=eos, bos_token_id=bos, pad_token_id=eos)
    vision.update(image_size=args.image_size, patch_size=16 if args.full else 8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def build_models(args, names):
    """Models named in `names`, all from one random stock CLIP (stretched to 248 positions where needed)."""
    from transformers import CLIPModel

    from hf_longclip import LongCLIPModel, MulCLIPModel

    eos, bos, batch = build_batch(args)
    torch.manual_seed(0)
    source = CLIPModel(clip_config(args, eos, bos))
    longclip = LongCLIPModel.from_clip(source)
    models = {}
    for name in names:
        if name == "stock":
            models[name] = longclip.to_clip_model()  # a plain CLIPModel with the same 248-row table
        elif name == "longclip":
            models[name] = LongCLIPModel.from_clip(source)
        elif name == "mulclip":
            models[name] = MulCLIPModel.from_clip(source)
    device = torch.device(args.device)
    batch = {k: v.to(device) for k, v in batch.items()}
    for model in models.values():
        model.to(device).train()
    return models, batch


def step_fn(name, model, batch, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        if name == "stock":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"])
            image, text = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
            logits = model.logit_scale.exp() * image @ text.t()
            targets = torch.arange(logits.shape[0], device=logits.device)
            loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
        elif name == "longclip":
            keys = ("input_ids", "attention_mask", "pixel_values", "short_input_ids", "short_attention_mask")
            loss = model(**{k: batch[k] for k in keys}, return_loss=True).loss
        else:
            loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
    return step


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times), sorted(times)[len(times) // 2]


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(args) -> dict:
    torch.set_num_threads(args.threads)
    name = args.mode
    models, batch = build_models(args, [name])
    model = models[name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    step = step_fn(name, model, batch, optimizer)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    step()  # warm-up (also allocates the AdamW state)
    best, median = timed(step, args.repeats, args.device)
    if args.device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"mode": name, "best_s": best, "median_s": median, "peak_mb": peak}


def run_interleaved(args) -> dict:
    torch.set_num_threads(args.threads)
    names = ["stock", "longclip", "mulclip"]
    models, batch = build_models(args, names)
    steps = {}
    for name in names:
        steps[name] = step_fn(name, models[name], batch, torch.optim.AdamW(models[name].parameters(), lr=1e-6))
        steps[name]()  # warm-up
    best = {name: float("inf") for name in names}
    for _ in range(args.repeats):
        for name in names:
            best[name] = min(best[name], timed(steps[name], 1, args.device)[0])
    return {"mode": "interleaved", **{f"{n}_best_s": t for n, t in best.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B/16 + 12-layer 512-wide text tower, 224 px images")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (16 with --full, else 4)")
    parser.add_argument("--min-sentences", type=int, default=6)
    parser.add_argument("--max-sentences", type=int, default=10)
    parser.add_argument("--max-subcaptions", type=int, default=8, help="M, subcaptions kept per image")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement (3 with --full, else 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="stock,longclip,mulclip,interleaved")
    parser.add_argument("--device", default="cpu", help="cpu (the reference setting) or cuda")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.full else 4)
    args.repeats = args.repeats or (3 if args.full else 5)
    args.image_size = 224 if args.full else 32

    if args.mode:  # child process: one measurement, JSON on the last line
        result = run_interleaved(args) if args.mode == "interleaved" else run_mode(args)
        print(json.dumps(result))
        return

    _, _, batch = build_batch(args)
    mask = batch["subcaption_mask"]
    print(
        f"batch {args.batch}, {'ViT-B/16 224px' if args.full else 'tiny'}, device {args.device}, threads {args.threads}; "
        f"caption length {batch['input_ids'].shape[1]}, summary length {batch['short_input_ids'].shape[1]}, "
        f"subcaptions {int(mask.sum())} real of {mask.numel()} slots at length {batch['subcaption_input_ids'].shape[-1]}"
    )
    results = {}
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--mode", mode, "--device", args.device, "--threads", str(args.threads),
                   "--batch", str(args.batch), "--repeats", str(args.repeats), "--min-sentences", str(args.min_sentences),
                   "--max-sentences", str(args.max_sentences), "--max-subcaptions", str(args.max_subcaptions)]
        command += ["--full"] if args.full else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{mode}: failed\n{done.stderr[-2000:]}")
            continue
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[mode]))
    if "stock" in results:
        stock = results["stock"]
        for mode in ("longclip", "mulclip"):
            if mode in results:
                r = results[mode]
                print(
                    f"{mode} / stock (separate processes): step {r['best_s'] / stock['best_s']:.3f}x (best), "
                    f"{r['median_s'] / stock['median_s']:.3f}x (median), peak memory {r['peak_mb'] / max(stock['peak_mb'], 1e-9):.3f}x"
                )
    if "interleaved" in results:
        r = results["interleaved"]
        print(
            f"interleaved (one process): longclip / stock {r['longclip_best_s'] / r['stock_best_s']:.3f}x, "
            f"mulclip / stock {r['mulclip_best_s'] / r['stock_best_s']:.3f}x, "
            f"mulclip / longclip {r['mulclip_best_s'] / r['longclip_best_s']:.3f}x"
        )


if __name__ == "__main__":
    main()
