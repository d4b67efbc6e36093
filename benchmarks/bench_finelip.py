"""Time and measure a FineLIP training step and the CLIM scoring of N x N image-text pairs.

Modes, each run in its own subprocess so that peak RSS (``ru_maxrss``) is per mode:

* ``stock``: a stock transformers ``CLIPModel`` (248 text positions) training step on the same images and long
  captions padded to the batch's longest caption, CLIP's InfoNCE: the floor of DESIGN.md's performance table.
* ``finelip``: ``FineLIPModel`` as shipped: captions at the batch's longest length, token sets, CLIM of the batch,
  hinge loss.
* ``finelip_pad248``: the same model with every caption padded to 248 tokens, as the authors' code does.
* ``interleaved`` (not in the default list): one FineLIP model, alternating a stock ``CLIPModel.forward`` step and
  a FineLIP step on the same batch in one process, so both see the same load; the cleanest overhead ratio on a
  shared machine.
* ``clim``: ``retrieval_scores(..., "clim")`` and ``"fused"`` on N images x N texts of random normalised token sets
  (40 tokens each), for several chunk sizes; the peak RSS growth during scoring is reported.

A training step is forward + backward + AdamW step, fp32 on CPU. The machine may be shared: compare the ratios
printed at the end (one run, same batch) rather than absolute seconds.

Usage::

    python benchmarks/bench_finelip.py            # tiny shapes, seconds
    python benchmarks/bench_finelip.py --full     # ViT-B/16 shapes, batch 16, CLIM 1000 x 1000 (minutes)
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

FULL_VOCAB, TINY_VOCAB = 49408, 1000


def special_ids(args) -> tuple[int, int, int]:
    """(vocab size, start id, end id); the end-of-text id is the largest, as in CLIP."""
    vocab = FULL_VOCAB if args.full else TINY_VOCAB
    return vocab, vocab - 2, vocab - 1


def tower_configs(args) -> dict:
    VOCAB, SOT, EOT = special_ids(args)
    if args.full:
        text = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=248, bos_token_id=SOT, eos_token_id=EOT,
                    pad_token_id=EOT)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)
        return dict(text_config=text, vision_config=vision, projection_dim=512)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=248, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                  patch_size=8)
    return dict(text_config=text, vision_config=vision, projection_dim=32)


def synthetic_batch(args, pad_to: int | None = None) -> dict:
    """Random images and token ids; caption lengths (SOT + words + EOT) drawn from [min_len, max_len]."""
    _, SOT, EOT = special_ids(args)
    rng = random.Random(0)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.batch)]
    width = pad_to or max(lengths)
    ids = torch.full((args.batch, width), EOT, dtype=torch.long)
    mask = torch.zeros(args.batch, width, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for row, n in enumerate(lengths):
        ids[row, 0] = SOT
        ids[row, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=gen)
        mask[row, :n] = 1
    size = tower_configs(args)["vision_config"]["image_size"]
    pixels = torch.randn(args.batch, 3, size, size, generator=gen)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "lengths": lengths}


def run_step_mode(args) -> dict:
    from transformers import CLIPConfig, CLIPModel

    from hf_longclip import FineLIPConfig, FineLIPModel

    torch.manual_seed(0)
    towers = tower_configs(args)
    if args.mode == "stock":
        model = CLIPModel(CLIPConfig(**towers))
    else:
        model = FineLIPModel(FineLIPConfig(**towers))
    model.train()
    batch = synthetic_batch(args, pad_to=248 if args.mode == "finelip_pad248" else None)
    lengths = batch.pop("lengths")
    if args.mode != "stock":
        batch["image_ids"] = torch.arange(args.batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        out = model(**batch, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    step()  # warm-up (allocations, optimizer state)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    extra = sum(p.numel() for n, p in model.named_parameters() if "aggregation" in n)
    return {
        "mode": args.mode,
        "step_s": statistics.median(times),
        "min_step_s": min(times),
        "all_steps_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "text_len": batch["input_ids"].shape[1],
        "caption_lengths": lengths,
        "head_params": extra,
    }


def run_interleaved_mode(args) -> dict:
    """One FineLIPModel; alternate a stock CLIP step (``CLIPModel.forward`` on the same modules, InfoNCE) and a
    FineLIP step on the same batch, so both see the same machine load; report the per-kind minimum and median."""
    from transformers import CLIPModel

    from hf_longclip import FineLIPConfig, FineLIPModel

    torch.manual_seed(0)
    model = FineLIPModel(FineLIPConfig(**tower_configs(args))).train()
    batch = synthetic_batch(args)
    batch.pop("lengths")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(kind):
        if kind == "stock":
            out = CLIPModel.forward(model, **batch, return_loss=True)
        else:
            out = model(**batch, image_ids=torch.arange(args.batch), return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step("stock"), step("finelip")  # warm-up
    times = {"stock": [], "finelip": []}
    for _ in range(args.steps):
        for kind in ("stock", "finelip"):
            start = time.perf_counter()
            step(kind)
            times[kind].append(time.perf_counter() - start)
    return {
        "mode": "interleaved",
        "stock_steps_s": times["stock"],
        "finelip_steps_s": times["finelip"],
        "min_ratio": min(times["finelip"]) / min(times["stock"]),
        "median_ratio": statistics.median(times["finelip"]) / statistics.median(times["stock"]),
        "pairwise_ratios": [f / s for f, s in zip(times["finelip"], times["stock"])],
    }


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_clim_mode(args) -> dict:
    from hf_longclip import FineLIPConfig, FineLIPModel

    cfg = FineLIPConfig(**tower_configs(args))
    model = FineLIPModel(cfg).eval()
    n, dim = args.pairs, cfg.projection_dim
    tokens = cfg.image_aggregation_size + 1
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    images = {"image_embeds": norm(torch.randn(n, dim, generator=gen), dim=-1),
              "image_tokens": norm(torch.randn(n, tokens, dim, generator=gen), dim=-1)}
    texts = {"text_embeds": norm(torch.randn(n, dim, generator=gen), dim=-1),
             "text_tokens": norm(torch.randn(n, cfg.text_aggregation_size + 1, dim, generator=gen), dim=-1),
             "text_token_mask": torch.ones(n, cfg.text_aggregation_size + 1, dtype=torch.bool)}
    inputs_mib = sum(t.numel() * t.element_size() for d in (images, texts) for t in d.values()) / 2**20
    # RSS high-water mark before any scoring (model + inputs): the growth past it is what scoring needs.
    base = max(current_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with torch.inference_mode():
        warm = 2 * args.chunk  # warm-up on a few blocks only
        model.retrieval_scores(
            {k: v[:warm] for k, v in images.items()}, {k: v[:warm] for k, v in texts.items()}, "clim", args.chunk
        )
        times = {}
        for scoring in ("clim", "fused"):
            start = time.perf_counter()
            scores = model.retrieval_scores(images, texts, scoring, chunk_size=args.chunk)
            times[scoring] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dense_mib = n * n * tokens * tokens * 4 / 2**20
    return {
        "mode": f"clim_chunk{args.chunk}",
        "pairs": n,
        "tokens": tokens,
        "clim_s": times["clim"],
        "fused_s": times["fused"],
        "peak_rss_growth_mib": peak - base,
        "peak_rss_mib": peak,
        "inputs_mib": inputs_mib,
        "unchunked_similarity_tensor_mib": dense_mib,
        "finite": bool(torch.isfinite(scores).all()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B/16 shapes, batch 16, CLIM 1000 x 1000")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (median reported)")
    parser.add_argument("--min-len", type=int, default=100, help="shortest caption, tokens incl. SOT/EOT")
    parser.add_argument("--max-len", type=int, default=220, help="longest caption, tokens incl. SOT/EOT")
    parser.add_argument("--pairs", type=int, default=None, help="N for N x N CLIM scoring")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["stock", "finelip", "finelip_pad248", "clim"])
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.full else 5)
    args.pairs = args.pairs or (1000 if args.full else 200)
    torch.set_num_threads(args.threads)

    if args.mode:  # child process
        if args.mode == "clim":
            result = run_clim_mode(args)
        elif args.mode == "interleaved":
            result = run_interleaved_mode(args)
        else:
            result = run_step_mode(args)
        print(json.dumps(result))
        return

    base = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--steps", str(args.steps),
            "--min-len", str(args.min_len), "--max-len", str(args.max_len), "--pairs", str(args.pairs),
            "--threads", str(args.threads)] + (["--full"] if args.full else [])
    results = {}
    for mode in args.modes:
        runs = [["--mode", mode, "--chunk", str(c)] for c in args.chunks] if mode == "clim" else [["--mode", mode]]
        for extra in runs:
            out = subprocess.run(base + extra, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"mode {extra} failed")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[result["mode"]] = result
            print(json.dumps(result))

    print(f"\nshapes: {'ViT-B/16' if args.full else 'tiny'}, batch {args.batch}, fp32 CPU, {args.threads} threads")
    stock = results.get("stock")
    for name in ("finelip", "finelip_pad248"):
        if stock and name in results:
            r = results[name]
            print(f"{name:15s} step {r['step_s']:.3f}s = {r['step_s'] / stock['step_s']:.2f}x stock "
                  f"({stock['step_s']:.3f}s, text length {stock['text_len']} vs {r['text_len']}); fastest steps "
                  f"{r['min_step_s'] / stock['min_step_s']:.2f}x; "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB = {r['peak_rss_mib'] / stock['peak_rss_mib']:.2f}x stock")
    if "interleaved" in results:
        r = results["interleaved"]
        print(f"interleaved     FineLIP / stock CLIP step on the same modules and batch: fastest {r['min_ratio']:.2f}x, "
              f"median {r['median_ratio']:.2f}x, per pair {', '.join(f'{x:.2f}' for x in r['pairwise_ratios'])}")
    for name, r in results.items():
        if name.startswith("clim"):
            print(f"{name:15s} {r['pairs']}x{r['pairs']}: CLIM {r['clim_s']:.2f}s, fused {r['fused_s']:.2f}s, "
                  f"peak RSS growth {r['peak_rss_growth_mib']:.0f} MiB (inputs {r['inputs_mib']:.0f} MiB; one "
                  f"unchunked similarity tensor would be {r['unchunked_similarity_tensor_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
