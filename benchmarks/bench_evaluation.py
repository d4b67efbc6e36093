"""Evaluation throughput on CPU: images/s and texts/s of the batched retrieval pipeline, and the cost of R@k.

Runs a randomly initialised model (ViT-B/16 shapes by default: 224 px, patch 16, vision width 768, text width 512,
12 + 12 layers, 248 text positions) through `hf_longclip.evaluation` on a temporary Urban1k-style folder of JPEGs
(decoding and preprocessing included), and compares text encoding with a stock transformers `CLIPTextModel` call on
the same padded batches. The machine may be shared: compare the ratios printed within one run, not absolute times.

    python benchmarks/bench_evaluation.py                    # ViT-B/16 shapes, 32 images, 64 texts
    python benchmarks/bench_evaluation.py --tiny             # tiny shapes (seconds)
    python benchmarks/bench_evaluation.py --images 256 --texts 1280 --batch-size 64 --threads 8
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from hf_longclip import LongCLIPModel, LongCLIPProcessor
from hf_longclip.data.tokenizer import build_clip_tokenizer
from hf_longclip.evaluation import EvalSettings, encode_images, encode_texts, read_urban1k, recall_at_k
from hf_longclip.evaluation.retrieval import autocast_context
from hf_longclip.testing_utils import DEFAULT_WORDS, tiny_clip_config

WORDS = list(DEFAULT_WORDS)


def build(tiny: bool):
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=248)
    size = 32 if tiny else 224
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LongCLIPProcessor.from_parts(image_processor, tokenizer, 248)
    if tiny:
        config = tiny_clip_config(vocab_size=len(tokenizer))
    else:
        eos = len(tokenizer) - 1
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, bos_token_id=eos - 1, eos_token_id=eos,
                             pad_token_id=eos),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16),
            projection_dim=512,
        )
    torch.manual_seed(0)
    clip = CLIPModel(config).eval()
    return LongCLIPModel.from_clip(clip).eval(), processor


def make_folder(root: Path, images: int, rng) -> None:
    (root / "Urban1k" / "image").mkdir(parents=True)
    (root / "Urban1k" / "caption").mkdir(parents=True)
    for i in range(images):
        array = rng.integers(0, 255, size=(300, 400, 3), dtype=np.uint8)  # decoded and resized like real photos
        Image.fromarray(array).save(root / "Urban1k" / "image" / f"{i}.jpg", quality=90)
        (root / "Urban1k" / "caption" / f"{i}.txt").write_text(caption(rng, 150))


def caption(rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes instead of ViT-B/16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--metric-images", type=int, default=5000, help="images of the synthetic R@k problem")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast dtype")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model, processor = build(args.tiny)
    model = model.to(args.device)
    settings = EvalSettings(batch_size=args.batch_size, progress=False, device=args.device, dtype=args.dtype,
                            num_workers=args.workers)
    print(f"shapes: {'tiny' if args.tiny else 'ViT-B/16'}; device {args.device}; dtype {args.dtype}; "
          f"threads {args.threads}; batch {args.batch_size}")

    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.images, rng)
        data = read_urban1k(tmp)
        encode_images(model, processor.image_processor, data.image_paths[: args.batch_size], "global", settings)  # warm-up
        start = time.perf_counter()
        features, kept, _ = encode_images(model, processor.image_processor, data.image_paths, "global", settings)
        sync(args.device)
        image_seconds = time.perf_counter() - start
        if args.dtype != "fp32":  # autocast agreement with fp32 on the same images
            reference, _, _ = encode_images(model, processor.image_processor, data.image_paths,
                                            "global", EvalSettings(batch_size=args.batch_size, progress=False, device=args.device))
            cosine = (features["image_embeds"].float() * reference["image_embeds"].float()).sum(-1)
            print(f"{args.dtype} vs fp32 image embeddings: min cosine {cosine.min().item():.6f}")
        start = time.perf_counter()
        for path in data.image_paths:  # decoding + preprocessing alone
            with Image.open(path) as image:
                processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
        decode_seconds = time.perf_counter() - start
    print(f"images: {len(kept) / image_seconds:8.2f} images/s  (decode+preprocess alone {args.images / decode_seconds:8.1f} images/s)")

    for words, label in ((150, "long (~150 words)"), (12, "short (~12 words)")):
        texts = [caption(rng, int(rng.integers(words // 2, words + 1))) for _ in range(args.texts)]
        encode_texts(model, processor.tokenizer, texts[: args.batch_size], "global", settings)  # warm-up
        start = time.perf_counter()
        encode_texts(model, processor.tokenizer, texts, "global", settings)
        sync(args.device)
        ours = time.perf_counter() - start
        # reference: stock CLIPTextModel forward on batches padded to 248 in input order (what a naive loop does)
        text_model = model.to_text_model().to(args.device)
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(texts), args.batch_size):
                batch = processor(text=texts[i : i + args.batch_size], padding="max_length", return_tensors="pt").to(args.device)
                with autocast_context(torch.device(args.device), args.dtype):
                    text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        sync(args.device)
        naive = time.perf_counter() - start
        print(f"texts {label}: {args.texts / ours:8.2f} texts/s; padded-to-248 stock loop {args.texts / naive:8.2f} texts/s "
              f"(ratio ours/naive time {ours / naive:.2f})")

    n_img = args.metric_images
    scores = torch.randn(n_img, 5 * n_img)
    owner = torch.arange(n_img).repeat_interleave(5)
    start = time.perf_counter()
    recall_at_k(scores, owner)
    print(f"R@1/5/10 both ways on {n_img} x {5 * n_img}: {time.perf_counter() - start:.2f} s")
    print(f"peak RSS: {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
