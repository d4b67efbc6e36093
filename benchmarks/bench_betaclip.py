"""Time one beta-CLIP training step and its text encoding, with and without the padding optimisation.

Modes, each run in its own subprocess (so that peak RSS is per mode), on the same synthetic batch:

* ``stock``: a stock transformers ``CLIPModel`` step on the same images and global captions (padded to the batch's
  longest caption), InfoNCE only: the floor of DESIGN.md's performance table.
* ``packed``: ``BetaCLIPModel`` as shipped: caption, sentences and phrases each encoded at their own longest valid
  length, padded query slots never encoded.
* ``packed_b3``: the same with ``text_length_buckets=3``.
* ``packed_ckpt``: ``packed`` with the text tower checkpointed (``enable_text_gradient_checkpointing()``, as the
  authors do), which trades text recomputation for memory.
* ``interleaved``: ``packed`` and ``authors`` on one model in one process, timed alternately (best of
  ``--repeats`` rounds): the with/without ratio least disturbed by other load on a shared machine.
* ``authors``: the authors' text layout: caption and sentence rows (padded slots included, as zero rows with EOT
  last) encoded together at the caption length, phrase rows (padded slots included, all zeros) at the phrase length.
  Everything else is the same model and loss.

For each mode the script times the text encoding alone (forward + backward of the query embeddings) and one full
training step (forward, backward, AdamW step, logit-scale clamp). The machine may be shared: compare the ratios
printed at the end, which come from one run, rather than absolute seconds.

Usage::

    python benchmarks/bench_betaclip.py                 # tiny shapes, a few seconds
    python benchmarks/bench_betaclip.py --full          # ViT-B/16 shapes, batch 16, K <= 36, fp32 CPU (minutes)
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
    """A ShareGPT4V-like long caption (about 10-25 words per sentence)."""
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


def build(args):
    """(special token ids, collated batch); from `--batch-file` when given (no spaCy needed there)."""
    if args.batch_file and os.path.exists(args.batch_file):
        saved = torch.load(args.batch_file, weights_only=True)
        return saved["special"], saved["batch"]
    from hf_longclip.data import BetaCLIPCollator
    from hf_longclip.data.tokenizer import build_clip_tokenizer
    from hf_longclip.models.processing_longclip import LongCLIPProcessor
    from hf_longclip.text import parse_hierarchies
    from transformers import CLIPImageProcessorPil

    rng = random.Random(0)
    captions = [synthetic_caption(rng, rng.randint(args.min_sentences, args.max_sentences)) for _ in range(args.batch)]
    words = {w.strip(".,").lower() for c in captions for w in c.split()}
    tokenizer = build_clip_tokenizer(words, model_max_length=248)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": args.image_size}, crop_size={"height": args.image_size, "width": args.image_size}
    )
    processor = LongCLIPProcessor.from_parts(image_processor, tokenizer, 248)
    records = parse_hierarchies(captions)
    torch.manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, args.image_size, args.image_size), **r} for r in records]
    batch = BetaCLIPCollator(processor, num_sentences=5, max_phrases=args.max_phrases, seed=0)(examples)
    special = {"eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    if args.batch_file:
        torch.save({"special": special, "batch": dict(batch)}, args.batch_file)
    return special, batch


def model_config(args, special, positions=77):
    from transformers import CLIPConfig

    eos, bos = special["eos"], special["bos"]
    if args.full:
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        projection = 512
    else:
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        projection = 64
    text.update(vocab_size=49408, max_position_embeddings=positions, eos_token_id=eos, bos_token_id=bos, pad_token_id=eos)
    vision.update(image_size=args.image_size, patch_size=16 if args.full else 8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def authors_encode_queries(model, batch):
    """The authors' layout: [caption; all sentence slots] at the caption length (padded slots = zeros + EOT last),
    all phrase slots at the phrase length (padded slots = zeros), every row encoded."""
    ids, sentence_ids, sentence_mask = batch["input_ids"], batch["sentence_input_ids"], batch["sentence_mask"]
    phrase_ids, phrase_mask = batch["phrase_input_ids"], batch["phrase_mask"]
    b, length = ids.shape
    eos = model._eos_token_id()
    sentences = torch.zeros(b, sentence_ids.shape[1], length, dtype=torch.long, device=ids.device)
    width = min(length, sentence_ids.shape[2])
    sentences[..., :width] = sentence_ids[..., :width]
    sentences[~sentence_mask, -1] = eos
    rows = torch.cat([ids[:, None], sentences], dim=1).reshape(-1, length)
    first = model.get_text_features(input_ids=rows).pooler_output.reshape(b, -1, model.config.projection_dim)
    phrases = model.get_text_features(input_ids=phrase_ids.reshape(-1, phrase_ids.shape[-1])).pooler_output
    phrases = phrases.reshape(b, phrase_ids.shape[1], -1)
    mask = torch.cat([batch["caption_query_mask"][:, None], sentence_mask, phrase_mask], dim=1)
    return first[:, 0], torch.cat([first, phrases], dim=1), mask


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_interleaved(args) -> dict:
    """Packed vs authors' layout on the same model in one process, alternating, best of `repeats` rounds: the
    ratio least affected by other load on a shared machine."""
    from hf_longclip import BetaCLIPModel
    from transformers import CLIPModel

    torch.set_num_threads(args.threads)
    special, batch = build(args)
    model = BetaCLIPModel.from_clip(CLIPModel(model_config(args, special))).train().to(args.device)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    query_keys = [k for k in batch if k != "pixel_values"]

    def use(layout):
        if layout == "authors":
            model.encode_queries = lambda *a, **k: authors_encode_queries(model, batch)
        elif "encode_queries" in model.__dict__:
            del model.encode_queries

    def text_only():
        model.zero_grad(set_to_none=True)
        model.encode_queries(**{k: batch[k] for k in query_keys})[1].sum().backward()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch, return_loss=True).loss.backward()
        optimizer.step()
        model.clamp_logit_scales()

    best = {}
    text_only()  # warm-up
    for _ in range(args.repeats):
        for what, fn in (("text", text_only), ("step", train_step)):
            for layout in ("packed", "authors"):
                use(layout)
                _sync(args.device)
                start = time.perf_counter()
                fn()
                _sync(args.device)
                key = f"{layout}_{what}_s"
                best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    use("packed")
    return {"mode": "interleaved", **best}


def run_mode(args) -> dict:
    from hf_longclip import BetaCLIPModel
    from transformers import CLIPModel

    if args.mode == "interleaved":
        return run_interleaved(args)
    torch.set_num_threads(args.threads)
    special, batch = build(args)
    # the stock floor reads the long captions directly (248 rows); beta-CLIP stretches a 77-row table to 248
    clip = CLIPModel(model_config(args, special, 248 if args.mode == "stock" else 77))
    result = {"mode": args.mode}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    if args.mode == "stock":
        model = clip.train().to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def text_part():
            return model.get_text_features(input_ids=batch["input_ids"]).pooler_output

        def step():
            img = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, dim=-1)
            txt = F.normalize(text_part(), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.t()
            target = torch.arange(len(img), device=img.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    else:
        model = BetaCLIPModel.from_clip(clip, text_length_buckets=3 if args.mode == "packed_b3" else 1).train()
        model = model.to(args.device)
        del clip
        if args.mode == "packed_ckpt":
            model.enable_text_gradient_checkpointing()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        if args.mode == "authors":
            model.encode_queries = lambda *a, **k: authors_encode_queries(model, batch)
        query_keys = [k for k in batch if k not in ("pixel_values",)]

        def text_part():
            return model.encode_queries(**{k: batch[k] for k in query_keys})[1]

        def step():
            return model(**batch, return_loss=True).loss

    mask = torch.cat([batch["caption_query_mask"][:, None], batch["sentence_mask"], batch["phrase_mask"]], dim=1)
    result["slots"] = int(mask.numel())
    result["valid_slots"] = int(mask.sum())
    result["caption_len"] = int(batch["input_ids"].shape[1])
    result["sentence_len"] = int(batch["sentence_input_ids"].shape[2])
    result["phrase_len"] = int(batch["phrase_input_ids"].shape[2])

    def timed(fn, repeats):
        best = float("inf")
        for _ in range(repeats):
            _sync(args.device)
            start = time.perf_counter()
            fn()
            _sync(args.device)
            best = min(best, time.perf_counter() - start)
        return best

    def text_only():
        model.zero_grad(set_to_none=True)
        text_part().sum().backward()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = step()
        loss.backward()
        optimizer.step()
        if hasattr(model, "clamp_logit_scales"):
            model.clamp_logit_scales()
        return loss

    text_only()  # warm-up (allocator, kernels)
    result["text_s"] = timed(text_only, args.repeats)
    result["step_s"] = timed(train_step, args.repeats)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if str(args.device).startswith("cuda"):  # report GPU memory instead of host RSS
        result["peak_rss_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="ViT-B/16 + 12-layer 512-wide text tower, 224 px images")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (16 with --full, else 4)")
    parser.add_argument("--max-phrases", type=int, default=30)
    parser.add_argument("--min-sentences", type=int, default=6)
    parser.add_argument("--max-sentences", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--modes", default="stock,packed,packed_b3,packed_ckpt,authors,interleaved")
    parser.add_argument("--device", default="cpu", help="cpu (the reference setting) or cuda")
    parser.add_argument("--batch-file", default=None, help="load the collated batch from this file, or save it there")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (16 if args.full else 4)
    args.repeats = args.repeats or (1 if args.full else 3)
    args.image_size = 224 if args.full else 32
    if args.batch_file and not os.path.exists(args.batch_file):
        build(args)  # parse once here so that mode processes (and machines without spaCy) reuse the batch
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    results = {}
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--max-phrases", str(args.max_phrases),
               "--min-sentences", str(args.min_sentences), "--max-sentences", str(args.max_sentences),
               "--device", args.device] + (["--batch-file", args.batch_file] if args.batch_file else [])
        if args.full:
            cmd.append("--full")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
        r = results[mode]
        if mode == "interleaved":
            print(
                f"interleaved (same process, alternating, best of {args.repeats}): packed text {r['packed_text_s']:.3f}s "
                f"vs authors {r['authors_text_s']:.3f}s ({r['packed_text_s'] / r['authors_text_s']:.2f}x); "
                f"packed step {r['packed_step_s']:.3f}s vs authors {r['authors_step_s']:.3f}s "
                f"({r['packed_step_s'] / r['authors_step_s']:.2f}x)",
                flush=True,
            )
            continue
        print(
            f"{mode:10s} text {r['text_s']:8.3f}s  step {r['step_s']:8.3f}s  peak RSS {r['peak_rss_mib']:8.0f} MiB  "
            f"(slots {r['valid_slots']}/{r['slots']} valid; lengths caption {r['caption_len']}, "
            f"sentences {r['sentence_len']}, phrases {r['phrase_len']})",
            flush=True,
        )
    print(f"shapes: {'ViT-B/16' if args.full else 'tiny'}, batch {args.batch}, threads {args.threads}, fp32 {args.device}")
    if "authors" in results:
        base = results["authors"]
        for mode in ("packed", "packed_b3", "packed_ckpt"):
            if mode in results:
                r = results[mode]
                print(f"{mode} vs authors' padding: text {r['text_s'] / base['text_s']:.2f}x, step {r['step_s'] / base['step_s']:.2f}x")
    if "stock" in results:
        base = results["stock"]
        for mode in ("packed", "packed_b3", "packed_ckpt", "authors"):
            if mode in results:
                r = results[mode]
                print(
                    f"{mode} vs stock CLIP step: {r['step_s'] / base['step_s']:.2f}x time, "
                    f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x peak RSS"
                )


if __name__ == "__main__":
    main()
