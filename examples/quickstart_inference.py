"""Use the model the quickstart trained: load it with AutoModel, embed held-out scenes and long captions, retrieve.

    python examples/quickstart_inference.py [--model outputs/quickstart]

The same code works for any hf_longclip model on the Hub (e.g. ``--model your-name/longclip-vit-b16``), with your own
images and captions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

import hf_longclip  # noqa: F401  (registers the hf_longclip models with the Auto classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/quickstart")
    parser.add_argument("--pairs", default=None, help="JSONL of held-out {image, caption} (default: the quickstart's)")
    parser.add_argument("--count", type=int, default=50, help="scenes to retrieve among")
    args = parser.parse_args()

    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    pairs_file = Path(args.pairs or Path(args.model) / "synthetic_data" / "eval.jsonl")
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()[: args.count]]
    images = [Image.open(pairs_file.parent / p["image"]).convert("RGB") for p in pairs]
    captions = [p["caption"] for p in pairs]

    with torch.inference_mode():
        inputs = processor(text=captions, images=images, return_tensors="pt")  # captions up to 248 tokens
        image_embeds = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
    scores = torch.nn.functional.normalize(text_embeds, dim=-1) @ torch.nn.functional.normalize(image_embeds, dim=-1).t()
    best = scores.argmax(dim=1)
    hits = (best == torch.arange(len(pairs))).float().mean().item()
    print(f"{type(model).__name__} from {args.model}: {inputs['input_ids'].shape[1]}-token captions, "
          f"text->image R@1 {100 * hits:.1f}% among {len(pairs)} held-out scenes (chance {100 / len(pairs):.1f}%)")
    print(f"caption 0: {captions[0][:140]}...")
    print(f"best image for caption 0: #{best[0].item()} (the right one is #0), score {scores[0, best[0]].item():.3f}")


if __name__ == "__main__":
    main()
