"""Peak memory of `encode_text` / `encode_image` on many inputs: internal batching against one pass.

Each measurement runs in its own subprocess, so the reported peak RSS (``ru_maxrss``) belongs to that call alone:
the process builds the model and the inputs, records its RSS, runs one ``encode_text`` (or ``encode_image``) call
under ``torch.inference_mode`` and prints the peak RSS and its growth over the RSS before the call.

``--batch-size 0`` means one pass over every row (what the helpers did before they batched internally); the default
is the helpers' own ``ENCODE_BATCH_SIZE`` (256). The outputs of the two are compared for equality in a last
subprocess (largest absolute difference printed).

Usage::

    python benchmarks/bench_encode_memory.py                       # 5000 captions of 248 tokens, tiny model (~1 min)
    python benchmarks/bench_encode_memory.py --texts 20000
    python benchmarks/bench_encode_memory.py --images 2000 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from hf_longclip.testing_utils import tiny_variant
args = json.loads(sys.argv[1])
torch.manual_seed(0)
model = tiny_variant("longclip", clip_kwargs=args["clip_kwargs"]).eval()
config = model.config.text_config
count, length = args["texts"], 248
ids = torch.randint(1, config.vocab_size - 1, (count, length))
ids[:, 0] = config.vocab_size - 2
ids[:, -1] = config.vocab_size - 1   # the end-of-text id (the largest, as in CLIP)
model.config.text_config.eos_token_id = config.vocab_size - 1
pixels = torch.randn(args["images"], 3, args["image_size"], args["image_size"]) if args["images"] else None
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
before = rss()
batch = None if args["batch_size"] is None else (args["batch_size"] or max(count, args["images"], 1))
with torch.inference_mode():
    if args["what"] == "text":
        out = model.encode_text(ids, batch_size=batch)
    else:
        out = model.encode_image(pixels, batch_size=batch)
print(json.dumps({"peak_mib": rss(), "before_mib": before, "checksum": float(out.double().abs().sum())}))
"""


def run(what: str, batch_size, options) -> dict:
    payload = {
        "what": what,
        "batch_size": batch_size,
        "texts": options.texts,
        "images": options.images if what == "image" else 0,
        "image_size": options.image_size,
        "clip_kwargs": {"image_size": options.image_size} if what == "image" else {},
    }
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--images", type=int, default=0, help="also measure encode_image on this many images")
    parser.add_argument("--image-size", type=int, default=32)
    options = parser.parse_args()
    kinds = ["text"] + (["image"] if options.images else [])
    for what in kinds:
        rows = options.texts if what == "text" else options.images
        results = {}
        for label, batch_size in (("one pass", 0), ("batched (default 256)", None)):
            results[label] = run(what, batch_size, options)
            r = results[label]
            print(
                f"encode_{what} on {rows} rows, {label:>22}: peak RSS {r['peak_mib']:8.0f} MiB "
                f"(+{r['peak_mib'] - r['before_mib']:.0f} MiB over the RSS before the call)"
            )
        one, batched = results["one pass"], results["batched (default 256)"]
        print(f"  same result: checksums {one['checksum']:.6f} / {batched['checksum']:.6f}")


if __name__ == "__main__":
    main()
