"""Long prompts in diffusers: 248-token text encoders for Stable Diffusion (1.x / 2.x) and SDXL.

Stock pipelines with a long text encoder and tokenizer, long-prompt encoding (chunked past 248 tokens), the diffusers
folder layout and checks for silent length mismatches. See docs/diffusion.md; its "Padding" section explains the
``pad_with`` choice."""

from __future__ import annotations

import copy
import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedConfig,
)

from .extras import require
from .models.configuration_longclip import CLIP_CONTEXT_LENGTH, validate_stretch
from .models.modeling_longclip import LongCLIPModel, stretch_position_embeddings

PAD_CHOICES = ("longclip", "eos", "base")
HIDDEN_STATE_CHOICES = (None, "last", "penultimate")
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder")

TextEncoder = CLIPTextModel | CLIPTextModelWithProjection


# ----------------------------------------------------------------------------------------------- small helpers
def _text_tower(encoder: nn.Module) -> CLIPTextModel:
    """The module holding ``embeddings`` / ``final_layer_norm`` (the root of a CLIPTextModel, ``.text_model`` else)."""
    return encoder.text_model if isinstance(encoder, CLIPTextModelWithProjection) else encoder


def text_encoder_length(encoder: nn.Module) -> int:
    """Rows of the encoder's text position table (the longest token sequence it accepts)."""
    return _text_tower(encoder).embeddings.position_embedding.num_embeddings


def _width(encoder: nn.Module) -> int:
    return encoder.config.hidden_size


# ----------------------------------------------------------------------------------------------- encoders
def stretch_text_encoder(
    text_encoder: TextEncoder, keep: int = 20, ratio: int = 4, target_length: int | None = None
) -> TextEncoder:
    """Stretch a stock CLIP text encoder's position table in place (knowledge-preserving stretch, no training).

    This is what Long-CLIP's SDXL pipeline does to OpenCLIP bigG: the same :func:`stretch_position_embeddings` as
    the Long-CLIP model (rows ``< keep`` copied, later rows interpolated ``ratio`` times, the last ones
    extrapolated), so 77 positions become 248 and the first 20 positions give exactly the original outputs.
    The ``position_ids`` buffer and ``config.max_position_embeddings`` are updated to match.

    Args:
        text_encoder (`CLIPTextModel` or `CLIPTextModelWithProjection`): the encoder, modified in place.
        keep (`int`): leading rows copied unchanged.
        ratio (`int`): rows produced from each remaining source row.
        target_length (`int`, *optional*): required result length; raises before any change if the stretch cannot
            produce it. An encoder that already has `target_length` rows is returned unchanged.

    Returns:
        The same encoder object.
    """
    tower = _text_tower(text_encoder)
    old = tower.embeddings.position_embedding
    rows = old.num_embeddings
    if target_length is not None and rows == target_length:
        return text_encoder
    validate_stretch(rows, keep, ratio, target_length)
    table = stretch_position_embeddings(old.weight, keep, ratio, target_length)
    new = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
    with torch.no_grad():
        new.weight.copy_(table)
    tower.embeddings.position_embedding = new
    tower.embeddings.position_ids = torch.arange(table.shape[0], device=table.device).expand((1, -1))
    for config in {id(text_encoder.config): text_encoder.config, id(tower.config): tower.config}.values():
        config.max_position_embeddings = table.shape[0]
    return text_encoder


def _text_model_from_clip(clip: CLIPModel, with_projection: bool) -> TextEncoder:
    """A stock text encoder holding the text tower (and projection) of a `CLIPModel`."""
    text_config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    if with_projection:
        model = CLIPTextModelWithProjection(text_config).to(dtype=clip.dtype)
        model.text_model.load_state_dict(clip.text_model.state_dict(), strict=True)
        model.text_projection.load_state_dict(clip.text_projection.state_dict(), strict=True)
    else:
        model = CLIPTextModel(text_config).to(dtype=clip.dtype)
        model.load_state_dict(clip.text_model.state_dict(), strict=True)
    return model.to(clip.device).eval()


def load_long_text_encoder(
    source: str | os.PathLike | nn.Module, with_projection: bool = False, **from_pretrained_kwargs
) -> TextEncoder:
    """Turn a Long-CLIP (or any CLIP with a long position table) into a stock diffusers text encoder.

    Args:
        source: one of
            - a `LongCLIPModel` (or a variant subclassing it), exported with ``to_text_model``;
            - a stock `CLIPModel`, `CLIPTextModel` or `CLIPTextModelWithProjection` (e.g. a community conversion
              with 248 positions);
            - a Hub id or folder holding any of those (a saved hf_longclip model, a ``clip`` checkpoint such as
              ``zer0int/LongCLIP-L-Diffusers``, or a ``clip_text_model``; pass ``subfolder="text_encoder"`` for a
              diffusers folder);
            - a path to one of the authors' original ``.pt`` checkpoints (``longclip-L.pt``), converted on the fly.
        with_projection (`bool`): return a `CLIPTextModelWithProjection` (SDXL's second encoder) instead of a
            `CLIPTextModel` (SD's encoder, SDXL's first).
        from_pretrained_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ``subfolder``,
            ``torch_dtype``, ... passed to ``from_pretrained``.

    Returns:
        The text encoder in eval mode. Its length is whatever the source has; the pipeline builders check it.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isfile(path) and path.endswith((".pt", ".pth", ".bin")):
            from .conversion import convert_original_checkpoint  # only needed for the authors' files

            source = convert_original_checkpoint(path)
        else:
            hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
            config_dict, _ = PreTrainedConfig.get_config_dict(path, **hub_kwargs)
            model_type = config_dict.get("model_type")
            architectures = config_dict.get("architectures") or []
            if model_type == "clip":
                source = CLIPModel.from_pretrained(path, **from_pretrained_kwargs)
            elif model_type == "clip_text_model":
                cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in architectures else CLIPTextModel
                source = cls.from_pretrained(path, **from_pretrained_kwargs)
            else:  # hf_longclip variants are registered with AutoModel by `import hf_longclip`
                source = AutoModel.from_pretrained(path, **from_pretrained_kwargs)
    if isinstance(source, LongCLIPModel):
        return source.to_text_model(with_projection=with_projection)
    if isinstance(source, CLIPModel):
        return _text_model_from_clip(source, with_projection)
    if isinstance(source, CLIPTextModelWithProjection):
        return (source if with_projection else source.text_model).eval()
    if isinstance(source, CLIPTextModel):
        if with_projection:
            raise TypeError(
                "a CLIPTextModelWithProjection is needed here (SDXL's second encoder has a text projection), but a "
                "CLIPTextModel has none; pass a CLIPModel, a Long-CLIP or a CLIPTextModelWithProjection"
            )
        return source.eval()
    raise TypeError(
        f"expected a Long-CLIP / CLIP model, a text encoder, a Hub id or a folder, got {type(source).__name__}"
    )


# ----------------------------------------------------------------------------------------------- tokenizers
def long_prompt_tokenizer(tokenizer: CLIPTokenizer, max_length: int, pad_with: str = "longclip") -> CLIPTokenizer:
    """A copy of `tokenizer` with ``model_max_length = max_length`` and the chosen pad token.

    Args:
        tokenizer (`CLIPTokenizer`): the base pipeline's tokenizer (all CLIP / OpenCLIP tokenizers share one BPE).
        max_length (`int`): the text encoder's length (248).
        pad_with (`str`): ``"longclip"`` pads with id 0 (the authors' SD/SDXL convention), ``"eos"`` with the
            end-of-text token (HF's SD-1.x tokenizer), ``"base"`` keeps the tokenizer's own pad token. See the
            module docstring for why this matters for token-level conditioning.
    """
    if pad_with not in PAD_CHOICES:
        raise ValueError(f"pad_with must be one of {PAD_CHOICES}, got {pad_with!r}")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_max_length = max_length
    if pad_with == "longclip" and tokenizer.pad_token_id != 0:
        # Added as a special token (not just the attribute) so that the in-memory tokenizer and the one reloaded
        # from `save_pretrained` tokenise identically.
        tokenizer.add_special_tokens({"pad_token": tokenizer.convert_ids_to_tokens(0)})
    elif pad_with == "eos":
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_tokenizer(source: str | os.PathLike | CLIPTokenizer, subfolder: str, **kwargs) -> CLIPTokenizer:
    if isinstance(source, (str, os.PathLike)):
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k != "subfolder"}
        return CLIPTokenizer.from_pretrained(source, subfolder=subfolder, **hub_kwargs)
    return source


# ----------------------------------------------------------------------------------------------- checks
def check_long_prompt_pipeline(pipe: Any) -> int:
    """Raise `ValueError` where a pipeline would silently cut prompts or mix lengths; return the prompt length.

    Checks, for every (tokenizer, text encoder) pair present: the tokenizer's ``model_max_length`` equals the
    encoder's position rows (diffusers pads and truncates to the tokenizer's length, so a 77 tokenizer in front of
    a 248 encoder silently cuts prompts to 77); the tokenizer's ids fit the encoder's vocabulary. For SDXL, both
    encoders have the same length (their hidden states are concatenated per token) and their widths add up to the
    UNet's ``cross_attention_dim``; for SD, the encoder width equals ``cross_attention_dim``.
    """
    pairs = [
        (name, getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None))
        for name, suffix in (("text_encoder", ""), ("text_encoder_2", "_2"))
    ]
    pairs = [(n, t, e) for n, t, e in pairs if e is not None]
    if not pairs:
        raise ValueError("the pipeline has no text encoder")
    lengths = {}
    for name, tokenizer, encoder in pairs:
        rows = text_encoder_length(encoder)
        if tokenizer is None:
            raise ValueError(f"the pipeline has a {name} but no tokenizer for it")
        if tokenizer.model_max_length != rows:
            tok_name = name.replace("text_encoder", "tokenizer")
            raise ValueError(
                f"{tok_name}.model_max_length is {tokenizer.model_max_length} but {name} has {rows} positions; "
                f"diffusers pads and truncates prompts to the tokenizer's length, so prompts would be cut to "
                f"{min(tokenizer.model_max_length, rows)} tokens or overflow the encoder. Use a tokenizer with "
                f"model_max_length={rows} (long_prompt_tokenizer / the long_prompt_*_pipeline builders set it)"
            )
        if len(tokenizer) > encoder.config.vocab_size:
            raise ValueError(
                f"the tokenizer of {name} has {len(tokenizer)} tokens but the encoder's vocabulary has "
                f"{encoder.config.vocab_size}: they do not belong together"
            )
        lengths[name] = rows
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"text_encoder has {lengths['text_encoder']} positions but text_encoder_2 has "
            f"{lengths['text_encoder_2']}: SDXL concatenates both encoders' hidden states token by token, so both "
            f"must have the same length. Stretch the other one with stretch_text_encoder(..., target_length="
            f"{max(lengths.values())}) or build the pipeline with long_prompt_sdxl_pipeline"
        )
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        widths = [_width(e) for _, _, e in pairs]
        expected = unet.config.cross_attention_dim
        if sum(widths) != expected:
            parts = " + ".join(f"{n} {_width(e)}" for n, _, e in pairs)
            raise ValueError(
                f"the text encoder width ({parts} = {sum(widths)}) does not match the UNet's cross_attention_dim "
                f"({expected}); a Long-CLIP of another size cannot condition this UNet"
            )
    return next(iter(lengths.values()))


def _check_width(name: str, long_encoder: nn.Module, expected: int, what: str) -> None:
    width = _width(long_encoder)
    if width != expected:
        raise ValueError(
            f"the long {name} has width {width} but {what} has width {expected}; this Long-CLIP is the wrong size "
            f"for this pipeline (e.g. Long-CLIP-L is 768 wide: SD 1.x and SDXL's first encoder; SD 2.x uses "
            f"1024-wide OpenCLIP-H, which can be stretched with text_encoder=None instead)"
        )


def _check_long(name: str, encoder: nn.Module, base_length: int) -> None:
    rows = text_encoder_length(encoder)
    if rows <= base_length:
        raise ValueError(
            f"the {name} given has {rows} positions, not more than the base tokenizer's {base_length}: it is not a "
            f"long encoder. Give a Long-CLIP (or stretch this one with stretch_text_encoder)"
        )


# ----------------------------------------------------------------------------------------------- pipelines
def _rebuild_pipeline(pipe: Any, **overrides) -> Any:
    """A new pipeline of the same class sharing `pipe`'s components, with some replaced.

    (diffusers' ``from_pipe`` casts every module to one dtype, which would silently upcast an fp16 pipeline; this
    keeps each module as it is.)
    """
    cls = type(pipe)
    params = inspect.signature(cls.__init__).parameters
    components = pipe.components
    kwargs = {}
    for name in params:
        if name == "self":
            continue
        if name in overrides:
            kwargs[name] = overrides[name]
        elif name in components:
            kwargs[name] = components[name]
        elif name in pipe.config:
            kwargs[name] = pipe.config[name]
    new = cls(**kwargs)
    name_or_path = pipe.config.get("_name_or_path")
    if name_or_path is not None:
        new.register_to_config(_name_or_path=name_or_path)
    return new


def _dtype_from(kwargs: dict) -> torch.dtype | None:
    return kwargs.get("torch_dtype") or kwargs.get("dtype")


def long_prompt_sd_pipeline(
    base: str | os.PathLike | Any,
    text_encoder: str | os.PathLike | nn.Module | None = None,
    *,
    tokenizer: CLIPTokenizer | str | os.PathLike | None = None,
    pad_with: str = "longclip",
    pipeline_class: type | None = None,
    text_encoder_kwargs: dict | None = None,
    **from_pretrained_kwargs,
) -> Any:
    """A stock Stable Diffusion (1.x / 2.x) pipeline whose text encoder reads 248 tokens.

    Args:
        base: the base pipeline: a Hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``), a folder, or a
            loaded pipeline object (its components are shared, not copied; the object itself is not changed).
        text_encoder: the long encoder: a Long-CLIP (Hub id / folder / `LongCLIPModel` / original ``.pt``) or a
            stock `CLIPTextModel` with 248 positions; see :func:`load_long_text_encoder`. Its width must match the
            UNet (768 for SD 1.x). ``None`` stretches the base's own encoder without training (useful for SD 2.x,
            whose 1024-wide encoder has no Long-CLIP).
        tokenizer: the tokenizer to lengthen (default: the base's). Its ``model_max_length`` is set to the encoder
            length.
        pad_with (`str`): ``"longclip"`` (id 0, default), ``"eos"`` or ``"base"``; see :func:`long_prompt_tokenizer`.
        pipeline_class: the class to load a Hub id / folder with (default ``StableDiffusionPipeline``); a pipeline
            object keeps its own class (img2img, inpainting, ...).
        text_encoder_kwargs (`dict`, *optional*): ``from_pretrained`` options for the text encoder source.
        from_pretrained_kwargs: options for the base pipeline's ``from_pretrained`` (``torch_dtype``, ``variant``,
            ...); ``torch_dtype`` is applied to the long encoder too.

    Returns:
        The pipeline. ``pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings``.

    Example:

    ```python
    >>> from hf_longclip.diffusion import long_prompt_sd_pipeline
    >>> pipe = long_prompt_sd_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", "zer0int/LongCLIP-L-Diffusers")
    >>> image = pipe("a very long prompt ...", num_inference_steps=30).images[0]
    ```
    """
    dtype = _dtype_from(from_pretrained_kwargs)
    long_encoder = None
    if text_encoder is not None:
        long_encoder = load_long_text_encoder(text_encoder, with_projection=False, **(text_encoder_kwargs or {}))
        if dtype is not None:
            long_encoder = long_encoder.to(dtype=dtype)

    if isinstance(base, (str, os.PathLike)):
        if pipeline_class is None:
            require("diffusers", "diffusion")
            from diffusers import StableDiffusionPipeline as pipeline_class
        base_tokenizer = (
            _load_tokenizer(base, "tokenizer", **from_pretrained_kwargs)
            if tokenizer is None
            else _load_tokenizer(tokenizer, "")
        )
        if long_encoder is not None:
            hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
            base_config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", **hub_kwargs)
            _check_width("text_encoder", long_encoder, base_config.hidden_size, "the base pipeline's text_encoder")
            _check_long("text_encoder", long_encoder, base_tokenizer.model_max_length)
            tokenizer_obj = _build_tokenizer(base_tokenizer, tokenizer, long_encoder, pad_with)
            pipe = pipeline_class.from_pretrained(
                base, text_encoder=long_encoder, tokenizer=tokenizer_obj, **from_pretrained_kwargs
            )
        else:
            pipe = pipeline_class.from_pretrained(base, **from_pretrained_kwargs)
            base_length = base_tokenizer.model_max_length
            stretch_text_encoder(pipe.text_encoder)
            _check_long("text_encoder", pipe.text_encoder, base_length)
            pipe = _rebuild_pipeline(
                pipe, tokenizer=_build_tokenizer(base_tokenizer, tokenizer, pipe.text_encoder, pad_with)
            )
    else:
        pipe = base
        base_tokenizer = _load_tokenizer(tokenizer, "") if tokenizer is not None else pipe.tokenizer
        if long_encoder is None:
            # Stretch a copy: the caller's pipeline keeps its own 77-token encoder.
            long_encoder = stretch_text_encoder(copy.deepcopy(pipe.text_encoder))
        _check_width("text_encoder", long_encoder, _width(pipe.text_encoder), "the base pipeline's text_encoder")
        _check_long("text_encoder", long_encoder, pipe.tokenizer.model_max_length)
        long_encoder = long_encoder.to(device=pipe.text_encoder.device, dtype=pipe.text_encoder.dtype)
        pipe = _rebuild_pipeline(
            pipe, text_encoder=long_encoder, tokenizer=_build_tokenizer(base_tokenizer, tokenizer, long_encoder, pad_with)
        )
    check_long_prompt_pipeline(pipe)
    return pipe


def _build_tokenizer(base_tokenizer, explicit, encoder, pad_with) -> CLIPTokenizer:
    """The long tokenizer for `encoder`; an explicitly given tokenizer must already agree with it or be 77-long."""
    rows = text_encoder_length(encoder)
    if explicit is not None and not isinstance(explicit, (str, os.PathLike)):
        given = base_tokenizer.model_max_length
        if given not in (rows, CLIP_CONTEXT_LENGTH):
            raise ValueError(
                f"the tokenizer given has model_max_length {given} but the text encoder has {rows} positions; "
                f"they must agree (a 77-token CLIP tokenizer is lengthened automatically)"
            )
    return long_prompt_tokenizer(base_tokenizer, rows, pad_with)


def long_prompt_sdxl_pipeline(
    base: str | os.PathLike | Any,
    text_encoder: str | os.PathLike | nn.Module | None = None,
    *,
    text_encoder_2: str | os.PathLike | nn.Module | None = None,
    tokenizer: CLIPTokenizer | None = None,
    tokenizer_2: CLIPTokenizer | None = None,
    pad_with: str = "longclip",
    position_keep: int = 20,
    position_ratio: int = 4,
    pipeline_class: type | None = None,
    text_encoder_kwargs: dict | None = None,
    **from_pretrained_kwargs,
) -> Any:
    """A stock SDXL pipeline whose two text encoders both read 248 tokens (Long-CLIP's SDXL recipe).

    ``text_encoder`` becomes the long CLIP-L; ``text_encoder_2`` (OpenCLIP bigG, a `CLIPTextModelWithProjection`)
    is stretched to the same length with :func:`stretch_text_encoder` and no training, as the authors do. Both
    tokenizers get the new length. Calling ``pipe(prompt)`` then conditions on both encoders' penultimate layers
    (diffusers' SDXL choice); Long-CLIP's SDXL code uses the last layer after the final LayerNorm instead:
    ``pipe(**encode_long_prompt(pipe, prompt, hidden_states="last"))``.

    Args:
        base: SDXL base (or refiner) as a Hub id (``"stabilityai/stable-diffusion-xl-base-1.0"``), a folder or a
            pipeline object (shared, not changed).
        text_encoder: the long CLIP-L (see :func:`load_long_text_encoder`); ``None`` stretches the base's own.
        text_encoder_2: a long second encoder; ``None`` (default) stretches the base's bigG to the first one's
            length. One given with another length raises.
        tokenizer, tokenizer_2: tokenizers to lengthen (default: the base's).
        pad_with (`str`): applied to both tokenizers; see :func:`long_prompt_tokenizer`.
        position_keep, position_ratio: stretch geometry for encoders stretched here (20, 4: 77 -> 248).
        pipeline_class: class for a Hub id / folder (default ``StableDiffusionXLPipeline``).
        text_encoder_kwargs (`dict`, *optional*): ``from_pretrained`` options for the text encoder sources.
        from_pretrained_kwargs: options for the base pipeline's ``from_pretrained``.
    """
    dtype = _dtype_from(from_pretrained_kwargs)
    te_kwargs = text_encoder_kwargs or {}

    def load(source, with_projection):
        if source is None:
            return None
        encoder = load_long_text_encoder(source, with_projection=with_projection, **te_kwargs)
        return encoder.to(dtype=dtype) if dtype is not None else encoder

    long_1, long_2 = load(text_encoder, False), load(text_encoder_2, True)
    if isinstance(base, (str, os.PathLike)):
        if pipeline_class is None:
            require("diffusers", "diffusion")
            from diffusers import StableDiffusionXLPipeline as pipeline_class
        # Check widths from the base's configs before loading the (large) pipeline.
        hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
        for name, encoder in (("text_encoder", long_1), ("text_encoder_2", long_2)):
            if encoder is not None:
                base_config = CLIPTextConfig.from_pretrained(base, subfolder=name, **hub_kwargs)
                _check_width(name, encoder, base_config.hidden_size, f"the base pipeline's {name}")
        overrides = {k: v for k, v in (("text_encoder", long_1), ("text_encoder_2", long_2)) if v is not None}
        pipe = pipeline_class.from_pretrained(base, **overrides, **from_pretrained_kwargs)
        base_encoder_1 = None  # the base's encoder 1 was not loaded when replaced; its width is checked via the UNet
    else:
        pipe = base
        base_encoder_1 = pipe.text_encoder
    tok_1 = tokenizer if tokenizer is not None else pipe.tokenizer
    tok_2 = tokenizer_2 if tokenizer_2 is not None else pipe.tokenizer_2
    base_length = (tok_2 or tok_1).model_max_length

    # Encoder 1 (absent in the refiner).
    enc_1 = pipe.text_encoder if long_1 is None else long_1
    if enc_1 is not None:
        if long_1 is None:
            enc_1 = stretch_text_encoder(
                copy.deepcopy(enc_1) if pipe is base else enc_1, position_keep, position_ratio
            )
        elif base_encoder_1 is not None:
            _check_width("text_encoder", enc_1, _width(base_encoder_1), "the base pipeline's text_encoder")
        _check_long("text_encoder", enc_1, base_length)
        length = text_encoder_length(enc_1)
    # Encoder 2: stretched to encoder 1's length unless a long one was given.
    enc_2 = pipe.text_encoder_2 if long_2 is None else long_2
    if long_2 is None:
        target = length if enc_1 is not None else None
        enc_2 = stretch_text_encoder(
            copy.deepcopy(enc_2) if pipe is base else enc_2, position_keep, position_ratio, target_length=target
        )
    else:
        if pipe is base:
            _check_width("text_encoder_2", enc_2, _width(pipe.text_encoder_2), "the base pipeline's text_encoder_2")
            enc_2 = enc_2.to(device=pipe.text_encoder_2.device, dtype=pipe.text_encoder_2.dtype)
    if enc_1 is not None and text_encoder_length(enc_2) != length:
        raise ValueError(
            f"text_encoder has {length} positions but the text_encoder_2 given has {text_encoder_length(enc_2)}: "
            f"SDXL concatenates both encoders' hidden states token by token, so both must be stretched to the same "
            f"length (leave text_encoder_2=None to stretch the base's bigG to {length})"
        )
    _check_long("text_encoder_2", enc_2, base_length)

    overrides = {"text_encoder_2": enc_2, "tokenizer_2": long_prompt_tokenizer(tok_2, text_encoder_length(enc_2), pad_with)}
    if enc_1 is not None:
        if base_encoder_1 is not None:
            enc_1 = enc_1.to(device=base_encoder_1.device, dtype=base_encoder_1.dtype)
        overrides.update(text_encoder=enc_1, tokenizer=long_prompt_tokenizer(tok_1, length, pad_with))
    pipe = _rebuild_pipeline(pipe, **overrides)
    if enc_1 is not None and pipe.unet is not None:
        expected = pipe.unet.config.cross_attention_dim - _width(enc_2)
        if _width(enc_1) != expected:
            _check_width("text_encoder", enc_1, expected, "the UNet's slot for text_encoder (cross_attention_dim - bigG)")
    check_long_prompt_pipeline(pipe)
    return pipe


# ----------------------------------------------------------------------------------------------- prompt encoding
def _as_list(prompt: str | Sequence[str] | None, batch: int, default: str = "") -> list[str]:
    if prompt is None:
        return [default] * batch
    if isinstance(prompt, str):
        return [prompt] * batch
    prompt = list(prompt)
    if len(prompt) != batch:
        raise ValueError(f"got {len(prompt)} negative / second prompts for {batch} prompts")
    return prompt


def _token_bodies(pipe: Any, tokenizer: CLIPTokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt without start / end tokens and without truncation."""
    if hasattr(pipe, "maybe_convert_prompt"):  # textual inversion multi-vector tokens, as diffusers does
        prompts = pipe.maybe_convert_prompt(prompts, tokenizer)
    # verbose=False: the "longer than the maximum length" warning is moot, the windows are cut below.
    return tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _windows(tokenizer: CLIPTokenizer, body: list[int], count: int) -> list[list[int]]:
    """`count` windows of `model_max_length` ids: SOT, up to length-2 prompt tokens, EOT, pads.

    Windows past the end of the prompt encode the empty string (SOT, EOT, pads), like an empty negative prompt.
    A prompt that fits one window gives exactly the ids of ``tokenizer(prompt, padding="max_length",
    truncation=True)``, so the chunked path equals the plain one for prompts of at most `model_max_length` tokens.
    """
    length = tokenizer.model_max_length
    step = length - 2
    out = []
    for i in range(count):
        piece = body[i * step : (i + 1) * step]
        ids = [tokenizer.bos_token_id, *piece, tokenizer.eos_token_id]
        out.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return out


def _window_count(tokenizer: CLIPTokenizer, body: list[int]) -> int:
    return max(1, math.ceil(len(body) / (tokenizer.model_max_length - 2)))


def _encode_windows(
    encoder: nn.Module, ids: torch.Tensor, layer: str, clip_skip: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states `(batch, length, width)` of one window per row, and the projected pooled output if any.

    layer: ``"sd"`` (last layer after the final LayerNorm, or ``clip_skip`` layers earlier then the LayerNorm, as
    diffusers' SD pipeline), ``"last"`` (last layer after the final LayerNorm: Long-CLIP's SDXL choice) or
    ``"penultimate"`` (``hidden_states[-2 - clip_skip]`` without LayerNorm: diffusers' SDXL choice).
    """
    out = encoder(ids.to(device), output_hidden_states=True)
    pooled = getattr(out, "text_embeds", None)
    if layer == "penultimate":
        hidden = out.hidden_states[-((clip_skip or 0) + 2)]
    elif layer == "sd" and clip_skip:
        hidden = _text_tower(encoder).final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    else:
        hidden = out.last_hidden_state
    return hidden, pooled


@torch.no_grad()
def encode_long_prompt(
    pipe: Any,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None = None,
    *,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    hidden_states: str | None = None,
    clip_skip: int | None = None,
    do_classifier_free_guidance: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode prompts of any length for a long-prompt SD or SDXL pipeline; pass the result as ``pipe(**result)``.

    Prompts are cut into windows of the encoder length (248 tokens: start token, 246 prompt tokens, end token),
    each window is encoded separately and the windows' hidden states are concatenated along the token axis (what
    lpw-style pipelines do with 77-token windows). The UNet's cross-attention accepts any number of tokens. Every
    prompt and negative prompt of the batch is padded with empty windows to the same window count, so the
    positive and negative embeddings have the same shape. A prompt of at most 248 tokens gives one window whose
    embeddings equal the pipeline's own ``encode_prompt`` output.

    For SDXL the pooled embeddings come from ``text_encoder_2``'s projected end token of the *first* window (the
    pooled vector of the plain path); an omitted negative prompt gives zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is set, as in diffusers.

    Args:
        pipe: a pipeline with ``tokenizer`` / ``text_encoder`` (and for SDXL ``tokenizer_2`` / ``text_encoder_2``),
            checked with :func:`check_long_prompt_pipeline`.
        prompt (`str` or `list[str]`): the prompt(s), any length.
        negative_prompt (`str` or `list[str]`, *optional*): negative prompt(s); empty when omitted.
        prompt_2, negative_prompt_2 (*optional*): SDXL's second-encoder prompts (default: the first ones).
        hidden_states (`str`, *optional*): which layer conditions the UNet. ``None`` does what the pipeline does
            (SD: last layer after the final LayerNorm; SDXL: penultimate layer, no LayerNorm). ``"last"``: last
            layer after the final LayerNorm for every encoder (Long-CLIP's SDXL choice, `spec §1.6`).
            ``"penultimate"``: SDXL's usual layer (SDXL only).
        clip_skip (`int`, *optional*): as in diffusers (layers skipped from the end), applied to positive and
            negative prompts alike. Not combinable with ``hidden_states="last"``.
        do_classifier_free_guidance (`bool`): also encode the negative prompt.

    Returns:
        `dict` with ``prompt_embeds`` `(batch, windows * length, width)` and, with guidance,
        ``negative_prompt_embeds`` of the same shape; for SDXL also ``pooled_prompt_embeds`` `(batch, proj_dim)`
        and ``negative_pooled_prompt_embeds``.
    """
    check_long_prompt_pipeline(pipe)
    is_xl = getattr(pipe, "text_encoder_2", None) is not None
    if hidden_states not in HIDDEN_STATE_CHOICES:
        raise ValueError(f"hidden_states must be one of {HIDDEN_STATE_CHOICES}, got {hidden_states!r}")
    if hidden_states == "penultimate" and not is_xl:
        raise ValueError("hidden_states='penultimate' is SDXL's choice; for SD use clip_skip=1")
    if hidden_states == "last" and clip_skip:
        raise ValueError("clip_skip selects an earlier layer; it cannot be combined with hidden_states='last'")
    layer = hidden_states or ("penultimate" if is_xl else "sd")
    if layer == "last" and not is_xl:
        layer = "sd"

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts)
    pairs = [(pipe.tokenizer, pipe.text_encoder, prompts, _as_list(negative_prompt, batch))]
    if is_xl:
        second = _as_list(prompt_2, batch) if prompt_2 is not None else prompts
        neg_2 = negative_prompt_2 if negative_prompt_2 is not None else negative_prompt
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, second, _as_list(neg_2, batch)))
        if pipe.text_encoder is None:  # refiner: only the second encoder
            pairs = pairs[1:]
    zero_negative = is_xl and negative_prompt is None and bool(pipe.config.get("force_zeros_for_empty_prompt"))
    encode_negative = do_classifier_free_guidance and not zero_negative

    bodies = []
    for tokenizer, _, pos, neg in pairs:
        bodies.append((_token_bodies(pipe, tokenizer, pos), _token_bodies(pipe, tokenizer, neg) if encode_negative else []))
    count = max(_window_count(t, b) for (t, *_), (pos, neg) in zip(pairs, bodies) for b in pos + neg)

    device = getattr(pipe, "_execution_device", None) or pipe.device
    out_dtype = (pipe.text_encoder_2 if is_xl else pipe.text_encoder).dtype
    result: dict[str, torch.Tensor] = {}
    for key, index in (("prompt_embeds", 0), ("negative_prompt_embeds", 1)):
        if key == "negative_prompt_embeds" and not encode_negative:
            continue
        per_encoder, pooled = [], None
        for (tokenizer, encoder, *_), body_pair in zip(pairs, bodies):
            windows = [_windows(tokenizer, body, count) for body in body_pair[index]]
            # (batch, count, length) -> one encoder call over batch * count windows
            ids = torch.tensor(windows, dtype=torch.long).flatten(0, 1)
            hidden, pooled_all = _encode_windows(encoder, ids, layer, clip_skip, device)
            per_encoder.append(hidden.reshape(batch, count * hidden.shape[1], hidden.shape[-1]))
            if pooled_all is not None:
                pooled = pooled_all.reshape(batch, count, -1)[:, 0]
        result[key] = torch.cat(per_encoder, dim=-1).to(device=device, dtype=out_dtype)
        if is_xl:
            result[key.replace("prompt_embeds", "pooled_prompt_embeds")] = pooled.to(device=device, dtype=out_dtype)
    if do_classifier_free_guidance and zero_negative:
        result["negative_prompt_embeds"] = torch.zeros_like(result["prompt_embeds"])
        result["negative_pooled_prompt_embeds"] = torch.zeros_like(result["pooled_prompt_embeds"])
    return result


# ----------------------------------------------------------------------------------------------- export / reload
def export_text_encoder(
    text_encoder: str | os.PathLike | nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: CLIPTokenizer | str | os.PathLike,
    *,
    with_projection: bool = False,
    pad_with: str = "longclip",
    suffix: str = "",
    tokenizer_subfolder: str | None = None,
    **save_kwargs,
) -> Path:
    """Write a long text encoder in the diffusers layout: ``text_encoder{suffix}/`` and ``tokenizer{suffix}/``.

    The folders load with ``CLIPTextModel.from_pretrained(dir, subfolder="text_encoder")`` and
    ``CLIPTokenizer.from_pretrained(dir, subfolder="tokenizer")`` and go into
    ``StableDiffusionPipeline.from_pretrained(base, text_encoder=..., tokenizer=...)`` (see
    :func:`load_long_text_components`). The saved tokenizer has ``model_max_length`` equal to the encoder length.

    Args:
        text_encoder: any source accepted by :func:`load_long_text_encoder`.
        save_directory: the output folder (created).
        tokenizer: a CLIP tokenizer, or a Hub id / folder to read one from (for a diffusers base, pass
            ``tokenizer_subfolder="tokenizer"``).
        with_projection (`bool`): save a `CLIPTextModelWithProjection` (SDXL's second encoder).
        pad_with (`str`): see :func:`long_prompt_tokenizer`.
        suffix (`str`): ``"_2"`` writes ``text_encoder_2/`` and ``tokenizer_2/``.
        save_kwargs: passed to the encoder's ``save_pretrained``.

    Returns:
        The output folder.
    """
    encoder = load_long_text_encoder(text_encoder, with_projection=with_projection)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer, subfolder=tokenizer_subfolder or "")
    rows = text_encoder_length(encoder)
    if tokenizer.model_max_length not in (rows, CLIP_CONTEXT_LENGTH):
        raise ValueError(
            f"the tokenizer has model_max_length {tokenizer.model_max_length} but the text encoder has {rows} positions"
        )
    save_directory = Path(save_directory)
    encoder.save_pretrained(save_directory / f"text_encoder{suffix}", **save_kwargs)
    long_prompt_tokenizer(tokenizer, rows, pad_with).save_pretrained(save_directory / f"tokenizer{suffix}")
    return save_directory


def export_long_text_components(pipe: Any, save_directory: str | os.PathLike, **save_kwargs) -> Path:
    """Save a long pipeline's text encoders and tokenizers (not the UNet / VAE) in the diffusers layout.

    The tokenizers are saved as they are (their pad choice included). Reload with
    :func:`load_long_text_components` and pass the result to the base pipeline's ``from_pretrained``.
    """
    check_long_prompt_pipeline(pipe)
    save_directory = Path(save_directory)
    for suffix in ("", "_2"):
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is not None:
            encoder.save_pretrained(save_directory / f"text_encoder{suffix}", **save_kwargs)
            getattr(pipe, f"tokenizer{suffix}").save_pretrained(save_directory / f"tokenizer{suffix}")
    return save_directory


def load_long_text_components(save_directory: str | os.PathLike, **from_pretrained_kwargs) -> dict[str, Any]:
    """Load what :func:`export_text_encoder` / :func:`export_long_text_components` wrote, as pipeline kwargs.

    ``StableDiffusionXLPipeline.from_pretrained(base, **load_long_text_components(folder))`` gives the long
    pipeline back. ``torch_dtype`` and hub options are passed to the encoders' ``from_pretrained``.
    """
    components: dict[str, Any] = {}
    for suffix in ("", "_2"):
        encoder_folder = Path(save_directory) / f"text_encoder{suffix}"
        if not encoder_folder.is_dir():
            continue
        config = CLIPTextConfig.from_pretrained(encoder_folder)
        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in (config.architectures or []) else CLIPTextModel
        components[f"text_encoder{suffix}"] = cls.from_pretrained(encoder_folder, **from_pretrained_kwargs)
        components[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(Path(save_directory) / f"tokenizer{suffix}")
    if not components:
        raise FileNotFoundError(f"no text_encoder/ or text_encoder_2/ folder in {os.fspath(save_directory)!r}")
    return components


__all__ = [
    "PAD_CHOICES",
    "check_long_prompt_pipeline",
    "encode_long_prompt",
    "export_long_text_components",
    "export_text_encoder",
    "load_long_text_components",
    "load_long_text_encoder",
    "long_prompt_sd_pipeline",
    "long_prompt_sdxl_pipeline",
    "long_prompt_tokenizer",
    "stretch_text_encoder",
    "text_encoder_length",
]


# ----------------------------------------------------------------------------------------------- tiny offline pipelines
# Random tiny pipelines built from configs (no Hub access), for the tests, the examples' --tiny mode and the benchmark.
def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    eos = tokenizer.eos_token_id
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _tiny_vae_and_scheduler():
    require("diffusers", "diffusion")
    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return vae, scheduler


def tiny_sd_base_pipeline(seed: int = 0, hidden_size: int = 32) -> Any:
    """A random tiny stock (77-token) `StableDiffusionPipeline` whose tokenizer matches `tiny_longclip`'s vocabulary.

    The tokenizer pads with the end-of-text token, like HF's SD-1.x tokenizer. Generate at 32x32.
    """
    require("diffusers", "diffusion")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from .data.tokenizer import build_clip_tokenizer
    from .testing_utils import DEFAULT_WORDS

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(DEFAULT_WORDS, model_max_length=CLIP_CONTEXT_LENGTH)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size)).eval()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden_size,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae, scheduler = _tiny_vae_and_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_base_pipeline(seed: int = 0, hidden_size: int = 32, hidden_size_2: int = 32, projection_dim_2: int = 16) -> Any:
    """A random tiny stock (77-token) `StableDiffusionXLPipeline`; ``tokenizer_2`` pads with ``!`` as SDXL's does."""
    require("diffusers", "diffusion")
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from .data.tokenizer import build_clip_tokenizer
    from .testing_utils import DEFAULT_WORDS

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(DEFAULT_WORDS, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer_2 = build_clip_tokenizer(DEFAULT_WORDS, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer_2.add_special_tokens({"pad_token": tokenizer_2.convert_ids_to_tokens(0)})
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, hidden_size_2, projection_dim_2)).eval()
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim_2,
        cross_attention_dim=hidden_size + hidden_size_2,
        norm_num_groups=8,
    )
    vae, scheduler = _tiny_vae_and_scheduler()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def tiny_longclip(seed: int = 1, hidden_size: int = 32) -> LongCLIPModel:
    """A random tiny `LongCLIPModel` (248 positions) with the tiny pipelines' vocabulary."""
    from .testing_utils import tiny_clip

    return LongCLIPModel.from_clip(tiny_clip(seed=seed, hidden_size=hidden_size))


__all__ += ["tiny_longclip", "tiny_sd_base_pipeline", "tiny_sdxl_base_pipeline"]
