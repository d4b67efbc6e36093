"""SDXL with 248-token text encoders: Long-CLIP-L as `text_encoder`, OpenCLIP bigG stretched to 248 as `text_encoder_2`.

Run as pasted (needs Hub access and a GPU with ~12 GB):

    python examples/long_prompt_sdxl.py --output long_prompt_sdxl.png

Offline demo with a tiny random pipeline (what the tests run; the image is noise):

    python examples/long_prompt_sdxl.py --tiny --steps 2 --output tiny.png

This follows Long-CLIP's SDXL recipe: the second encoder gets the same knowledge-preserving stretch (no training),
both encoders produce 248 tokens, and by default the UNet is conditioned on each encoder's last layer after the final
LayerNorm (`--hidden-states last`). `--hidden-states penultimate` gives SDXL's usual layer (what `pipe(prompt)` does).
Prompts past 248 tokens are encoded in 248-token windows.
"""

from __future__ import annotations

import argparse

import torch

from hf_longclip.diffusion import (
    PAD_CHOICES,
    encode_long_prompt,
    long_prompt_sdxl_pipeline,
    tiny_longclip,
    tiny_sdxl_base_pipeline,
)

DEFAULT_PROMPT = (
    "A bustling night market in a narrow alley of an old harbour town, seen from eye level. Strings of warm paper "
    "lanterns in red, orange and gold hang overhead and reflect in puddles on the wet cobblestones. On the left, a "
    "noodle stall with a steaming copper pot, a cook in a white apron tossing noodles in a wok, and two customers on "
    "wooden stools. On the right, a fruit stand piled with dragon fruit, mangoes and lychees under a striped green "
    "awning, and a small girl in a yellow raincoat pointing at a paper fish kite. In the background, the alley opens "
    "onto the harbour where a blue fishing boat is moored under a full moon, and a tabby cat sleeps on a stack of "
    "crates. Cinematic lighting, rich colours, fine detail, 50mm photograph."
)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="stabilityai/stable-diffusion-xl-base-1.0", help="SDXL base pipeline")
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
    parser.add_argument("--negative-prompt", default=None, help="omitted: zeros, as SDXL does")
    parser.add_argument("--hidden-states", choices=("last", "penultimate"), default="last")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pad-with", choices=PAD_CHOICES, default="longclip", help="pad token of both tokenizers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="long_prompt_sdxl.png")
    parser.add_argument("--tiny", action="store_true", help="offline tiny random pipeline (for tests and demos)")
    args = parser.parse_args(argv)

    if args.tiny:
        base, longclip, te_kwargs, pipe_kwargs = tiny_sdxl_base_pipeline(), tiny_longclip(), {}, {}
        args.height, args.width = args.height or 32, args.width or 32
        args.device = "cpu"
    else:
        base, longclip = args.base, args.longclip
        if args.longclip_file:
            from huggingface_hub import hf_hub_download

            longclip = hf_hub_download(args.longclip, args.longclip_file)
        te_kwargs = {"subfolder": args.longclip_subfolder} if args.longclip_subfolder else {}
        on_gpu = args.device.startswith("cuda")
        pipe_kwargs = {"torch_dtype": torch.float16, "variant": "fp16"} if on_gpu else {}
    pipe = long_prompt_sdxl_pipeline(
        base, longclip, pad_with=args.pad_with, text_encoder_kwargs=te_kwargs, **pipe_kwargs
    ).to(args.device)

    length = pipe.tokenizer.model_max_length
    tokens = len(pipe.tokenizer(args.prompt, truncation=False, verbose=False).input_ids)
    print(f"prompt: {tokens} tokens; both text encoders read {length} tokens ({args.hidden_states} layer)")
    embeds = encode_long_prompt(pipe, args.prompt, args.negative_prompt, hidden_states=args.hidden_states)
    if embeds["prompt_embeds"].shape[1] > length:
        print(f"encoded in {embeds['prompt_embeds'].shape[1] // length} windows of {length} tokens")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    image = pipe(
        **embeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        generator=generator,
    ).images[0]
    image.save(args.output)
    print(f"saved {args.output}")
    return image


if __name__ == "__main__":
    main()
