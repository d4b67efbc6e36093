"""``hf-longclip generate``: images from long prompts with any supported diffusers pipeline (SD 1.x/2.x, SDXL, SD3,
Flux) whose CLIP text encoders read 248 tokens.

One call builds the right long-prompt pipeline (:func:`hf_longclip.diffusion.long_prompt_pipeline`), encodes each
prompt with :func:`hf_longclip.diffusion.encode_long_prompt` (windows past 248 tokens where the pipeline consumes
per-token embeddings) and writes ``00000.png``, ``00001.png``, ... plus ``generate.json`` (every setting, the
prompts' token counts and windows, timings, versions). See docs/diffusion.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The builder argument of the second long CLIP encoder, per pipeline kind (see `long_prompt_pipeline`).
SECOND_ENCODER_ARGUMENT = {"sdxl": "text_encoder_2", "sd3": "clip_g"}

#: Pipelines `--tiny` can build offline (random weights: the images are noise; for tests and demos).
TINY_KINDS = ("sd", "sdxl", "sd3", "flux")


@dataclass
class PromptSpec:
    """One image to make: the prompt, an optional negative prompt and its seed."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None


@dataclass
class GenerateSettings:
    """Sampling settings shared by every prompt; `None` keeps the pipeline's own default."""

    steps: int = 30
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a multiple of 8 (at least 8), got {value}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")


def read_prompt_file(path: str | os.PathLike) -> list[PromptSpec]:
    """Prompts of a text file (one per line; blank lines and lines starting with ``#`` skipped) or of a ``.jsonl``
    file (objects with ``prompt`` and optional ``negative_prompt`` / ``seed``).

    Raises:
        `ValueError`: the file is missing, unreadable, holds no prompt, or a JSONL line is not such an object (the
        message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read prompt file {str(path)!r}: {error}") from None
    specs: list[PromptSpec] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or (path.suffix.lower() != ".jsonl" and text.startswith("#")):
            continue
        if path.suffix.lower() != ".jsonl":
            specs.append(PromptSpec(text))
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: invalid JSON ({error.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}, line {number}: expected an object with a non-empty string 'prompt'")
        negative, seed = row.get("negative_prompt"), row.get("seed")
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{path}, line {number}: 'negative_prompt' must be a string")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{path}, line {number}: 'seed' must be an integer")
        specs.append(PromptSpec(prompt, negative, seed))
    if not specs:
        raise ValueError(f"prompt file {str(path)!r} holds no prompt")
    return specs


def check_output_folder(out: str | os.PathLike) -> Path:
    """`out` as a folder images can be written to (created), or a `ValueError`: it is a file, or not writable."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output folder {str(out)!r}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {str(out)!r} is not writable")
    return folder


def tiny_long_pipeline(kind: str, seed: int = 0) -> Any:
    """A tiny random long-prompt pipeline of `kind` built offline (for tests and demos: the images are noise)."""
    from . import diffusion

    if kind not in TINY_KINDS:
        raise ValueError(f"tiny pipeline kind must be one of {TINY_KINDS}, got {kind!r}")
    base = getattr(diffusion, f"tiny_{kind}_base_pipeline")(seed=seed)
    return diffusion.long_prompt_pipeline(base)


def load_long_pipeline(
    pipeline: str | os.PathLike,
    text_encoder: str | os.PathLike | None = None,
    text_encoder_2: str | os.PathLike | None = None,
    *,
    dtype: str | None = None,
    **from_pretrained_kwargs,
) -> Any:
    """Load a diffusers pipeline (Hub id or folder) and make its CLIP encoders long.

    `text_encoder` is the long CLIP-L (a saved hf_longclip model, a 248-position CLIP / CLIPTextModel, or an exported
    diffusers ``text_encoder`` folder); `text_encoder_2` the second long CLIP encoder (SDXL's / SD3's bigG). Omitted
    encoders are stretched from the pipeline's own (no training, as `long_prompt_pipeline` does).
    """
    import torch
    from diffusers import DiffusionPipeline

    from .diffusion import long_prompt_pipeline, pipeline_kind

    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        # newer diffusers take `dtype` and deprecate `torch_dtype`; older ones know only `torch_dtype`
        from diffusers.utils import deprecation_utils

        key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
        kwargs[key] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    base = DiffusionPipeline.from_pretrained(pipeline, **kwargs)
    kind = pipeline_kind(base)
    encoders = {}
    if text_encoder_2 is not None:
        if kind not in SECOND_ENCODER_ARGUMENT:
            raise ValueError(f"--text-encoder-2 is for SDXL and SD3; {type(base).__name__} has one CLIP encoder")
        encoders[SECOND_ENCODER_ARGUMENT[kind]] = text_encoder_2
    return long_prompt_pipeline(base, text_encoder, **encoders)


def generate_images(
    pipe: Any,
    prompts: Sequence[PromptSpec | str],
    out: str | os.PathLike,
    settings: GenerateSettings | None = None,
    *,
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make one image per prompt with a long-prompt pipeline and write them, with ``generate.json``, into `out`.

    Each prompt is encoded by `encode_long_prompt` (so prompts past the encoders' 248 tokens are windowed where the
    pipeline reads per-token embeddings) and sampled with its own seed (the prompt's, else ``settings.seed + i``)
    from a CPU generator, so a run is reproducible prompt by prompt. ``generate.json`` is rewritten after every
    image (atomically), so an interrupted run keeps the record of what it made.

    Returns:
        The record written to ``generate.json``.
    """
    import torch
    from tqdm.auto import tqdm

    from .diffusion import check_long_prompt_pipeline, encode_long_prompt, pipeline_kind

    settings = settings or GenerateSettings()
    specs = [PromptSpec(p) if isinstance(p, str) else p for p in prompts]
    if not specs:
        raise ValueError("no prompt given")
    kind = pipeline_kind(pipe)
    length = check_long_prompt_pipeline(pipe)
    folder = check_output_folder(out)
    guidance = settings.guidance_scale
    # Flux (guidance-distilled) takes no negative prompt; the others use classifier-free guidance unless it is off.
    use_negative = kind != "flux" and (guidance is None or guidance > 1.0)
    call = {"num_inference_steps": settings.steps, **settings.extra}
    for name in ("guidance_scale", "height", "width"):
        if getattr(settings, name) is not None:
            call[name] = getattr(settings, name)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar over the prompts instead of one per image
    tokenizer = pipe.tokenizer
    result: dict[str, Any] = {
        **(record or {}),
        "pipeline_class": type(pipe).__name__,
        "pipeline_kind": kind,
        "text_encoder_positions": length,
        "settings": asdict(settings),
        "versions": _versions(),
        "images": [],
    }
    for index, spec in enumerate(tqdm(specs, desc="images", unit="image", disable=not progress)):
        seed = spec.seed if spec.seed is not None else settings.seed + index
        tokens = len(tokenizer(spec.prompt, truncation=False, verbose=False).input_ids)
        started = time.perf_counter()
        embeds = encode_long_prompt(
            pipe, spec.prompt, spec.negative_prompt, do_classifier_free_guidance=use_negative
        )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = pipe(**embeds, generator=generator, **call).images[0]
        name = f"{index:05d}.png"
        image.save(folder / name)
        result["images"].append({
            "file": name,
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": seed,
            "prompt_tokens": tokens,
            # per-token pipelines read every 248-token window; Flux's CLIP gives one pooled vector of the first
            # window (T5 reads the whole prompt up to max_sequence_length)
            "clip_windows": 1 if kind == "flux" else _window_count(tokens, length),
            "clip_tokens_dropped": max(0, tokens - length) if kind == "flux" else 0,
            "seconds": round(time.perf_counter() - started, 3),
        })
        _write_json(folder / "generate.json", result)
    return result


def _window_count(tokens: int, length: int) -> int:
    """Windows of `length` tokens (start + `length - 2` prompt tokens + end) a prompt of `tokens` tokens (start and
    end included) is encoded in."""
    return max(1, math.ceil((tokens - 2) / (length - 2)))


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from . import __version__

    return {
        "hf_longclip": __version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


__all__ = [
    "TINY_KINDS",
    "GenerateSettings",
    "PromptSpec",
    "check_output_folder",
    "generate_images",
    "load_long_pipeline",
    "read_prompt_file",
    "tiny_long_pipeline",
]


# ----------------------------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """The ``hf-longclip generate`` options."""
    source = parser.add_argument_group("pipeline")
    source.add_argument("--pipeline", help="diffusers pipeline: Hub id or folder (SD 1.x/2.x, SDXL, SD3/3.5, Flux)")
    source.add_argument(
        "--text-encoder",
        help="the long CLIP-L: a saved hf_longclip model, a 248-position CLIP / CLIPTextModel, or an exported "
        "text_encoder folder (default: the pipeline's own, stretched to 248 without training)",
    )
    source.add_argument(
        "--text-encoder-2", help="SDXL / SD3: the long second CLIP encoder (default: the pipeline's own, stretched)"
    )
    source.add_argument("--tiny", choices=TINY_KINDS, help="an offline tiny random pipeline of this kind (images are noise)")
    source.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="weights' dtype (default: fp16 on GPU)")
    source.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompt-file",
        help="one prompt per line (# comments and blank lines skipped), or .jsonl of {prompt, negative_prompt, seed}",
    )
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; after the file's)")
    prompts.add_argument("--negative-prompt", default=None, help="negative prompt of every prompt that has none")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    sampling.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    sampling.add_argument("--height", type=int, default=None)
    sampling.add_argument("--width", type=int, default=None)
    parser.add_argument("--out", required=True, help="output folder: 00000.png, ... and generate.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(args) -> dict[str, Any]:
    """Run ``hf-longclip generate`` from parsed arguments; raises `ValueError` / `OSError` for bad input."""
    import torch

    from .evaluation.retrieval import check_device

    if (args.pipeline is None) == (args.tiny is None):
        raise ValueError("give exactly one of --pipeline (a diffusers pipeline) and --tiny (an offline tiny one)")
    specs = read_prompt_file(args.prompt_file) if args.prompt_file else []
    specs += [PromptSpec(p) for p in args.prompt]
    if not specs:
        raise ValueError("no prompt: give --prompt-file and/or --prompt")
    if args.negative_prompt is not None:
        specs = [PromptSpec(s.prompt, s.negative_prompt or args.negative_prompt, s.seed) for s in specs]
    settings = GenerateSettings(
        steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed
    )
    check_output_folder(args.out)
    if args.tiny:
        if args.text_encoder or args.text_encoder_2:
            raise ValueError("--tiny builds its own tiny encoders; --text-encoder applies to --pipeline")
        pipe, device = tiny_long_pipeline(args.tiny, seed=args.seed), "cpu"
        if settings.height is None:
            settings.height = settings.width = settings.width or 32
    else:
        device = str(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
        pipe = load_long_pipeline(args.pipeline, args.text_encoder, args.text_encoder_2, dtype=dtype)
    pipe = pipe.to(device)
    record = {
        "pipeline": args.pipeline or f"tiny-{args.tiny}",
        "text_encoder": args.text_encoder,
        "text_encoder_2": args.text_encoder_2,
        "device": device,
    }
    result = generate_images(pipe, specs, args.out, settings, progress=not args.no_progress, record=record)
    print(f"wrote {len(result['images'])} images and generate.json to {args.out}")
    return result
