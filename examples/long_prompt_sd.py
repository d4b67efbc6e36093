"""Stable Diffusion 1.5 with a 248-token text encoder (Long-CLIP-L): prompts longer than 77 tokens are read whole.

Run as pasted (needs Hub access and ~4 GB of GPU memory, or patience on CPU):

    python examples/long_prompt_sd.py --output long_prompt_sd.png

Offline demo with a tiny random pipeline (what the tests run; the image is noise):

    python examples/long_prompt_sd.py --tiny --steps 2 --output tiny.png

The pipeline is a stock diffusers `StableDiffusionPipeline`: only its `text_encoder` (248 positions) and its
tokenizer (`model_max_length=248`) differ. Prompts up to 248 tokens go through `pipe(prompt)` as usual; longer ones
are encoded in 248-token windows by `encode_long_prompt` and passed as `prompt_embeds`.
"""

from __future__ import annotations

import argparse

import torch

from hf_longclip.diffusion import (
    PAD_CHOICES,
    encode_long_prompt,
    long_prompt_sd_pipeline,
    tiny_longclip,
    tiny_sd_base_pipeline,
)

DEFAULT_PROMPT = (
    "A cozy reading nook in an old stone cottage on a rainy autumn afternoon. A deep green velvet armchair sits "
    "beside a tall arched window with small leaded panes, raindrops running down the glass. On the armchair lies a "
    "folded knitted blanket in mustard yellow and a sleeping ginger cat curled into a tight ball. To the left, a "
    "wooden side table holds a steaming mug of tea, a stack of three leather-bound books and a brass reading lamp "
    "with a warm glow. Behind the chair, floor-to-ceiling shelves are crowded with books, small potted plants and a "
    "ceramic owl. Outside the window, blurred orange and red trees line a narrow cobblestone lane, and a person in a "
    "blue raincoat walks past with a red umbrella. Soft, warm light, shallow depth of field, detailed textures, "
    "photograph taken with a 35mm lens."
)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="SD 1.x pipeline")
    parser.add_argument(
        "--longclip",
        default="zer0int/LongCLIP-L-Diffusers",
        help="Long-CLIP-L: Hub id or folder (CLIPModel / CLIPTextModel with 248 positions or a saved hf_longclip "
        "model) or the authors' longclip-L.pt file",
    )
    parser.add_argument("--longclip-subfolder", default=None, help="e.g. text_encoder for a diffusers-layout repo")
    parser.add_argument(
        "--longclip-file",
        default=None,
        help="a file of the --longclip Hub repo to download and convert, e.g. --longclip BeichenZhang/LongCLIP-L "
        "--longclip-file longclip-L.pt (the authors' original checkpoint)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--negative-prompt", default="blurry, low quality, deformed")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pad-with", choices=PAD_CHOICES, default="longclip", help="pad token of the 248 tokenizer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="long_prompt_sd.png")
    parser.add_argument("--tiny", action="store_true", help="offline tiny random pipeline (for tests and demos)")
    args = parser.parse_args(argv)

    if args.tiny:
        base, longclip, te_kwargs, pipe_kwargs = tiny_sd_base_pipeline(), tiny_longclip(), {}, {}
        args.height, args.width = args.height or 32, args.width or 32
        args.device = "cpu"
    else:
        base, longclip = args.base, args.longclip
        if args.longclip_file:
            from huggingface_hub import hf_hub_download

            longclip = hf_hub_download(args.longclip, args.longclip_file)
        te_kwargs = {"subfolder": args.longclip_subfolder} if args.longclip_subfolder else {}
        dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
        pipe_kwargs = {"torch_dtype": dtype}
    pipe = long_prompt_sd_pipeline(
        base, longclip, pad_with=args.pad_with, text_encoder_kwargs=te_kwargs, **pipe_kwargs
    ).to(args.device)

    length = pipe.tokenizer.model_max_length
    tokens = len(pipe.tokenizer(args.prompt, truncation=False, verbose=False).input_ids)
    print(f"prompt: {tokens} tokens; text encoder reads {length} tokens")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    common = dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=generator,
    )
    if tokens <= length:
        image = pipe(args.prompt, negative_prompt=args.negative_prompt, **common).images[0]
    else:  # past 248 tokens: 248-token windows, concatenated
        embeds = encode_long_prompt(pipe, args.prompt, args.negative_prompt)
        print(f"encoded in {embeds['prompt_embeds'].shape[1] // length} windows of {length} tokens")
        image = pipe(**embeds, **common).images[0]
    image.save(args.output)
    print(f"saved {args.output}")
    return image


if __name__ == "__main__":
    main()
