"""Time one Fix-CLIP training step against a stock CLIP step and a Long-CLIP step, in the same run.

Modes, each run in its own subprocess (so peak memory is per mode), on the same synthetic batch (random images, long
ShareGPT4V-like captions, short captions = first sentence):

* ``stock``: a stock transformers ``CLIPModel`` step: images and long captions (padded to the batch's longest caption),
  InfoNCE. The floor of DESIGN.md's performance table.
* ``longclip``: ``LongCLIPModel``: long + short caption, PCA short term (one image pass).
* ``fixclip``: ``FixCLIPModel`` with its defaults: full-image pass with regional prompts in every layer (M = grid
  side), masked (75 %) short-branch pass, per-layer EOT / CLS gathered for the hierarchical group losses (two image
  passes per step).
* ``fixclip_drop``: ``masked_patches="drop"``: the short branch runs on CLS + the 25 % visible patches + the prompts
  instead of a full pass with mask tokens (FLIP-style).
* ``fixclip_noprompts``: the same without regional prompts (dual branch + group losses only).
* ``fixclip_isolated``: ``isolate_patches_from_prompts=True`` (one more token per prompted layer).
* ``fixclip_eager``: ``fixclip`` with the eager attention kernel instead of SDPA.

Every step is forward + backward + AdamW step. Reported: median step seconds over ``--steps`` timed steps after one
warm-up step, and the growth of peak RSS during the steps (``ru_maxrss`` after the steps minus after set-up, which
includes model construction). The machine may be shared: compare the ratios printed at the end, which come from one
run, rather than absolute seconds.

Usage::

    python benchmarks/bench_fixclip.py                  # tiny shapes, a few seconds
    python benchmarks/bench_fixclip.py --full           # ViT-B/16 shapes, batch 16, fp32 CPU (minutes)
    python benchmarks/bench_fixclip.py --full --modes stock fixclip --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

MODES = ("stock", "longclip", "fixclip", "fixclip_drop", "fixclip_noprompts", "fixclip_isolated", "fixclip_eager")
SUBJECTS = "dog cat man woman car tree house table chair lamp sofa rug window bicycle boat bird horse".split()
COLOURS = "red green blue yellow white black brown striped wooden small large old".split()
VERBS = "sitting standing leaning lying resting parked hanging".split()
PREPS = "against on near under beside behind".split()


def synthetic_caption(rng: random.Random, sentences: int) -> str:
    """A ShareGPT4V-like long caption (about 10-20 words per sentence)."""
    out = ["The image shows a " + rng.choice(COLOURS) + " " + rng.choice(SUBJECTS) + " in a bright room"]
    for _ in range(sentences - 1):
        a, b, c = rng.sample(SUBJECTS, 3)
        sentence = f"A {rng.choice(COLOURS)} {a} is {rng.choice(VERBS)} {rng.choice(PREPS)} the {rng.choice(COLOURS)} {b}"
        if rng.random() < 0.5:
            sentence += f", and a {rng.choice(COLOURS)} {c} can be seen next to it"
        out.append(sentence)
    return ". ".join(out) + "."


def clip_config(args, text_positions: int = 77):
    from transformers import CLIPConfig

    if args.full:  # openai/clip-vit-base-patch16 shapes
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        projection = 512
    else:
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      image_size=64, patch_size=8)
        projection = 32
    return CLIPConfig(
        text_config=dict(vocab_size=args.vocab, max_position_embeddings=text_positions, bos_token_id=args.vocab - 2,
                         eos_token_id=args.vocab - 1, pad_token_id=args.vocab - 1, **text),
        vision_config=vision,
        projection_dim=projection,
    )


def build_batch(args, image_size: int):
    from transformers import CLIPImageProcessorPil

    from hf_longclip.data import FixCLIPCollator
    from hf_longclip.data.tokenizer import build_clip_tokenizer
    from hf_longclip.models.processing_longclip import LongCLIPProcessor

    rng = random.Random(0)
    captions = [synthetic_caption(rng, rng.randint(5, 8)) for _ in range(args.batch)]
    words = {w.strip(".,").lower() for c in captions for w in c.split()}
    tokenizer = build_clip_tokenizer(words, model_max_length=248)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LongCLIPProcessor.from_parts(image_processor, tokenizer, 248)
    torch.manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, image_size, image_size), "caption": c} for c in captions]
    batch = FixCLIPCollator(processor)(examples)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"vocab {args.vocab} smaller than the tokenizer ({len(tokenizer)})")
    return batch, tokenizer


def run_mode(args) -> dict:
    from transformers import CLIPModel

    from hf_longclip import FixCLIPModel, LongCLIPModel

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = clip_config(args)
    batch, tokenizer = build_batch(args, config.vision_config.image_size)
    groups = dict(num_groups=args.groups, group_align_start=args.align_start)
    mode = args.mode
    if mode == "stock":  # a stock CLIPModel whose text table has 248 rows, so that it reads the same long captions
        config = clip_config(args, text_positions=248)
    # the towers pool at the batch tokenizer's end-of-text id (the config's default would be no id of the captions)
    config.text_config.eos_token_id = config.text_config.pad_token_id = tokenizer.eos_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    stock = CLIPModel(config)
    if mode == "stock":
        model = stock
    elif mode == "longclip":
        model = LongCLIPModel.from_clip(stock)
    else:
        fields = dict(groups)
        if mode == "fixclip_noprompts":
            fields["regional_prompts"] = False
        if mode == "fixclip_isolated":
            fields["isolate_patches_from_prompts"] = True
        if mode == "fixclip_drop":
            fields["masked_patches"] = "drop"
        model = FixCLIPModel.from_clip(stock, **fields)
        if mode == "fixclip_eager":
            model.set_attn_implementation("eager")
    del stock
    device = torch.device(args.device)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step(i: int) -> float:
        sync()
        start = time.perf_counter()
        if mode == "stock":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"], return_loss=True)
        elif mode == "longclip":
            out = model(**batch, return_loss=True)
        else:
            out = model(**batch, return_loss=True, mask_generator=i)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    step(-1)  # warm-up (allocator, kernels, AdamW state)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step(i) for i in range(args.steps)]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":  # report the GPU's peak allocation in the RSS fields' place
        rss_peak = torch.cuda.max_memory_allocated() / 1024
        rss_setup = 0
    return {
        "mode": mode,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_rss_mib": rss_peak / 1024,
        "step_rss_growth_mib": (rss_peak - rss_setup) / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "long_len": int(batch["input_ids"].shape[1]),
        "short_len": int(batch["short_input_ids"].shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B/16 shapes, batch 16")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--groups", type=int, default=None, help="G (default 4 full, 2 tiny)")
    parser.add_argument("--align-start", type=int, default=2, help="K")
    parser.add_argument("--vocab", type=int, default=49408)
    parser.add_argument("--device", default="cpu", help="cpu (the DESIGN.md setting) or cuda (peak = GPU allocation)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.full else 8)
    args.steps = args.steps or (3 if args.full else 5)
    args.groups = args.groups or (4 if args.full else 2)
    if args.mode:  # child process
        print(json.dumps(run_mode(args)))
        return
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--device", args.device, "--groups", str(args.groups), "--align-start",
                   str(args.align_start), "--vocab", str(args.vocab)] + (["--full"] if args.full else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"mode {mode} failed")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:18s} step {r['median_s']:8.3f} s (median of {args.steps})  peak mem {r['peak_rss_mib']:8.0f} MiB  "
              f"growth during steps {r['step_rss_growth_mib']:7.0f} MiB  params {r['params_m']:.1f} M", flush=True)
    first = next(iter(results.values()))
    print(f"batch {args.batch}, long captions padded to {first['long_len']} tokens, short to {first['short_len']}")
    if "stock" in results:
        base = results["stock"]
        for mode, r in results.items():
            print(f"{mode:18s} time x{r['median_s'] / base['median_s']:.2f} of stock   "
                  f"peak mem x{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}")
    if "longclip" in results:
        for mode in ("fixclip", "fixclip_drop"):
            if mode in results:
                print(f"{mode} / longclip step time: x{results[mode]['median_s'] / results['longclip']['median_s']:.2f}")


if __name__ == "__main__":
    main()
