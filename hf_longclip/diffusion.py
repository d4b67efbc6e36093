"""Long prompts in diffusers: 248-token CLIP text encoders for Stable Diffusion 1.x / 2.x, SDXL, SD3 / 3.5 and Flux.

Stock pipelines with long CLIP text encoders and tokenizers (T5 encoders are left alone), long-prompt encoding
(chunked past 248 tokens where the pipeline uses per-token CLIP embeddings), the diffusers folder layout and checks
for silent length mismatches. See docs/diffusion.md; its "Padding" section explains the ``pad_with`` choice."""

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


def _projection(encoder: nn.Module) -> int:
    """Width of the pooled vector a pipeline takes from `encoder` (the projection if it has one)."""
    return encoder.config.projection_dim if isinstance(encoder, CLIPTextModelWithProjection) else _width(encoder)


# ----------------------------------------------------------------------------------------------- pipeline kinds
PIPELINE_KINDS = ("sd", "sdxl", "sd3", "flux")
_CLIP_CLASS_NAMES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_KIND_NAMES = {"sd": "Stable Diffusion 1.x / 2.x", "sdxl": "SDXL", "sd3": "SD3 / SD3.5", "flux": "Flux"}
_SUPPORTED = (
    "supported: Stable Diffusion 1.x / 2.x (unet + a CLIP text_encoder), SDXL and its refiner (unet + a CLIP "
    "text_encoder_2), SD3 / SD3.5 (transformer + CLIP text_encoder and text_encoder_2 + text_encoder_3) and Flux "
    "(transformer + a CLIP text_encoder + a T5 text_encoder_2)"
)
#: The CLIP (tokenizer, text encoder) attribute suffixes each kind conditions on; T5 encoders are not listed.
_CLIP_SUFFIXES = {"sd": ("",), "sdxl": ("", "_2"), "sd3": ("", "_2"), "flux": ("",)}


def _kind_from_components(has, is_clip, class_name: str) -> str:
    """The pipeline kind from its component layout: ``has(name)`` (the pipeline declares the component, even if
    it is None), ``is_clip(name)`` (the component is a CLIP text encoder)."""
    clip = {name: is_clip(name) for name in ("text_encoder", "text_encoder_2")}
    if has("unet"):
        if has("text_encoder_2"):
            if clip["text_encoder_2"]:
                return "sdxl"
        elif clip["text_encoder"]:
            return "sd"
    elif has("transformer"):
        if has("text_encoder_3"):
            if clip["text_encoder"] and clip["text_encoder_2"]:
                return "sd3"
        elif clip["text_encoder"] and has("text_encoder_2") and not clip["text_encoder_2"]:
            return "flux"
    if not any(clip.values()):
        raise ValueError(f"{class_name} has no CLIP text encoder, so there is nothing to lengthen; {_SUPPORTED}")
    raise ValueError(f"{class_name} is not a pipeline layout this module knows; {_SUPPORTED}")


def pipeline_kind(pipe: Any) -> str:
    """Which long-prompt recipe a diffusers pipeline needs, recognised from its components (not its class name).

    - ``"sd"``: a ``unet`` and one CLIP ``text_encoder`` (Stable Diffusion 1.x / 2.x and their img2img, inpainting,
      ControlNet, ... variants);
    - ``"sdxl"``: a ``unet`` and a CLIP ``text_encoder_2`` (SDXL; also the refiner, whose ``text_encoder`` is None);
    - ``"sd3"``: a ``transformer``, CLIP ``text_encoder`` and ``text_encoder_2`` and a ``text_encoder_3`` slot (T5,
      which may be None: SD3 / SD3.5 loaded without T5);
    - ``"flux"``: a ``transformer``, a CLIP ``text_encoder`` and a non-CLIP (T5) ``text_encoder_2`` (Flux, Flux
      img2img, inpainting, fill, ...).

    Args:
        pipe: a diffusers pipeline object.

    Returns:
        `str`: one of ``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``.

    Raises:
        `ValueError`: the pipeline has no CLIP text encoder, or another layout (naming its class and what is
        supported).
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise ValueError(f"expected a diffusers pipeline, got {type(pipe).__name__}; {_SUPPORTED}")
    return _kind_from_components(
        lambda name: name in components,
        lambda name: isinstance(components.get(name), (CLIPTextModel, CLIPTextModelWithProjection)),
        type(pipe).__name__,
    )


def _kind_from_model_index(index: dict) -> str:
    """:func:`pipeline_kind` for a pipeline not loaded yet, from its ``model_index.json`` (component -> [library,
    class])."""

    def class_of(name):
        entry = index.get(name)
        return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None

    return _kind_from_components(
        lambda name: name in index, lambda name: class_of(name) in _CLIP_CLASS_NAMES, index.get("_class_name", "?")
    )


def _clip_pairs(pipe: Any, kind: str) -> list[tuple[str, Any, nn.Module]]:
    """(encoder name, tokenizer, encoder) of every CLIP encoder the pipeline has (the refiner has no first one)."""
    pairs = []
    for suffix in _CLIP_SUFFIXES[kind]:
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if encoder is not None:
            pairs.append((f"text_encoder{suffix}", getattr(pipe, f"tokenizer{suffix}", None), encoder))
    return pairs


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

    The pipeline kind is found with :func:`pipeline_kind` (a pipeline without a CLIP text encoder raises). Then, for
    every CLIP (tokenizer, text encoder) pair (T5 encoders are not checked): the tokenizer's ``model_max_length``
    equals the encoder's position rows (diffusers pads and truncates to the tokenizer's length, so a 77 tokenizer in
    front of a 248 encoder silently cuts prompts to 77); the tokenizer's ids fit the encoder's vocabulary. Per kind:

    - SD: the encoder width equals the UNet's ``cross_attention_dim``;
    - SDXL: both encoders have the same length (their hidden states are concatenated per token) and their widths
      add up to the UNet's ``cross_attention_dim``;
    - SD3: both CLIP encoders have the same length, their widths add up to at most the transformer's
      ``joint_attention_dim`` (diffusers zero-pads the CLIP embeddings to T5's width), their pooled (projected)
      widths add up to its ``pooled_projection_dim``, and the pipeline's ``tokenizer_max_length`` (read once from
      ``tokenizer`` when the pipeline is built, then used for both CLIP tokenizers) is the encoders' length;
    - Flux: the CLIP encoder width equals the transformer's ``pooled_projection_dim`` and ``tokenizer_max_length``
      is the encoder's length.
    """
    kind = pipeline_kind(pipe)
    pairs = _clip_pairs(pipe, kind)
    cls = type(pipe).__name__
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
        what = "SD3 concatenates both CLIP encoders'" if kind == "sd3" else "SDXL concatenates both encoders'"
        builder = "long_prompt_sd3_pipeline" if kind == "sd3" else "long_prompt_sdxl_pipeline"
        raise ValueError(
            f"text_encoder has {lengths['text_encoder']} positions but text_encoder_2 has "
            f"{lengths['text_encoder_2']}: {what} hidden states token by token, so both must have the same length. "
            f"Stretch the other one with stretch_text_encoder(..., target_length={max(lengths.values())}) or build "
            f"the pipeline with {builder}"
        )
    length = next(iter(lengths.values()))
    if kind in ("sd3", "flux"):
        read = getattr(pipe, "tokenizer_max_length", length)
        if read != length:
            raise ValueError(
                f"{cls}.tokenizer_max_length is {read} but its CLIP encoders have {length} positions: the pipeline "
                f"reads the prompt length once, from tokenizer.model_max_length when it is built, so a tokenizer "
                f"swapped in afterwards is ignored and prompts are still cut to {read} tokens. Build a new pipeline "
                f"from the components ({cls}(**pipe.components)) or use long_prompt_{kind}_pipeline"
            )
    widths = {name: _width(e) for name, _, e in pairs}
    parts = " + ".join(f"{n} {w}" for n, w in widths.items())
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    if kind in ("sd", "sdxl") and unet is not None:
        expected = unet.config.cross_attention_dim
        if sum(widths.values()) != expected:
            raise ValueError(
                f"the text encoder width ({parts} = {sum(widths.values())}) does not match the UNet's "
                f"cross_attention_dim ({expected}); a Long-CLIP of another size cannot condition this UNet"
            )
    elif kind == "sd3" and transformer is not None:
        joint = transformer.config.joint_attention_dim
        if sum(widths.values()) > joint:
            raise ValueError(
                f"the CLIP encoder widths ({parts} = {sum(widths.values())}) exceed the transformer's "
                f"joint_attention_dim ({joint}); SD3 zero-pads the concatenated CLIP embeddings to that width, so a "
                f"Long-CLIP of another size cannot condition this transformer"
            )
        pooled = {name: _projection(e) for name, _, e in pairs}
        if sum(pooled.values()) != transformer.config.pooled_projection_dim:
            shown = " + ".join(f"{n} {w}" for n, w in pooled.items())
            raise ValueError(
                f"the CLIP encoders' pooled widths ({shown} = {sum(pooled.values())}) do not match the "
                f"transformer's pooled_projection_dim ({transformer.config.pooled_projection_dim}); a Long-CLIP with "
                f"another projection size cannot condition this transformer"
            )
    elif kind == "flux" and transformer is not None:
        expected = transformer.config.pooled_projection_dim
        if widths["text_encoder"] != expected:
            raise ValueError(
                f"text_encoder has width {widths['text_encoder']} but the transformer's pooled_projection_dim is "
                f"{expected}; Flux conditions on CLIP-L's pooled output, so a Long-CLIP of another size cannot be used"
            )
    return length


def _check_width(name: str, long_encoder: nn.Module, expected: int, what: str, hint: str | None = None) -> None:
    width = _width(long_encoder)
    if width != expected:
        hint = hint or (
            "e.g. Long-CLIP-L is 768 wide: SD 1.x and SDXL's first encoder; SD 2.x uses 1024-wide OpenCLIP-H, which "
            "can be stretched with text_encoder=None instead"
        )
        raise ValueError(
            f"the long {name} has width {width} but {what} has width {expected}; this Long-CLIP is the wrong size "
            f"for this pipeline ({hint})"
        )


def _check_projection(label: str, long_encoder: nn.Module, base_encoder: nn.Module, name: str) -> None:
    got, expected = _projection(long_encoder), _projection(base_encoder)
    if got != expected:
        raise ValueError(
            f"the long {label} has a pooled (projection) width of {got} but the base pipeline's {name} has "
            f"{expected}; the transformer takes the pooled vectors at that width, so the sizes must match"
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


def _require_kind(pipe: Any, kind: str, builder: str) -> None:
    got = pipeline_kind(pipe)
    if got != kind:
        raise ValueError(
            f"{builder} is for {_KIND_NAMES[kind]} pipelines but {type(pipe).__name__} is recognised as "
            f"{_KIND_NAMES[got]} (pipeline_kind {got!r}); long_prompt_pipeline(base, ...) picks the builder from the "
            f"pipeline's components"
        )


_SD3_HINT = (
    "SD3's text_encoder is CLIP-L, 768 wide with a 768 projection, as Long-CLIP-L; its text_encoder_2 is OpenCLIP "
    "bigG, 1280 wide, for which no Long-CLIP exists: leave clip_g=None to stretch the base's own"
)
_FLUX_HINT = "Flux's text_encoder is CLIP-L, 768 wide, as Long-CLIP-L"


def _load_long_encoders(sources: dict, with_projection: bool, dtype, te_kwargs: dict) -> dict:
    """``{name: long encoder or None}`` for ``{name: source or None}``, in `dtype` when given."""
    out = {}
    for name, source in sources.items():
        encoder = None
        if source is not None:
            encoder = load_long_text_encoder(source, with_projection=with_projection, **te_kwargs)
            if dtype is not None:
                encoder = encoder.to(dtype=dtype)
        out[name] = encoder
    return out


def _check_widths_from_configs(
    base, long_encoders: dict, labels: dict, hint: str, from_pretrained_kwargs: dict
) -> None:
    """Width (and projection) checks of given long encoders against a base folder / Hub id's encoder configs,
    before the (large) pipeline is loaded."""
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs and k != "subfolder"}
    for name, encoder in long_encoders.items():
        if encoder is None:
            continue
        config = CLIPTextConfig.from_pretrained(base, subfolder=name, **hub_kwargs)
        _check_width(labels[name], encoder, config.hidden_size, f"the base pipeline's {name}", hint)
        if isinstance(encoder, CLIPTextModelWithProjection) and encoder.config.projection_dim != config.projection_dim:
            raise ValueError(
                f"the long {labels[name]} has a pooled (projection) width of {encoder.config.projection_dim} but the "
                f"base pipeline's {name} has {config.projection_dim}; the transformer takes the pooled vectors at "
                f"that width, so the sizes must match"
            )


def _lengthen_clip_encoders(
    pipe: Any,
    owned: bool,
    long_encoders: dict,
    labels: dict,
    hint: str,
    position_keep: int,
    position_ratio: int,
) -> dict:
    """The long CLIP encoders for `pipe`: the given ones (checked against the base's), the others stretched.

    All end with the same length: that of the given encoders (which must agree), else the stretch's 248. The base's
    encoders are stretched in place only when `owned` (a pipeline loaded here), else copies are.
    """
    base_length = pipe.tokenizer.model_max_length
    given = {name: e for name, e in long_encoders.items() if e is not None}
    lengths = {name: text_encoder_length(e) for name, e in given.items()}
    if len(set(lengths.values())) > 1:
        (name_a, len_a), (name_b, len_b) = lengths.items()
        raise ValueError(
            f"the {labels[name_a]} given has {len_a} positions but the {labels[name_b]} given has {len_b}: the "
            f"pipeline concatenates both encoders' hidden states token by token, so both must have the same length"
        )
    target = next(iter(lengths.values()), None)
    result = {}
    for name, encoder in long_encoders.items():
        base_encoder = getattr(pipe, name)
        if encoder is None:
            encoder = base_encoder if owned else copy.deepcopy(base_encoder)
            rows = text_encoder_length(encoder)
            if target is not None and rows > target:
                raise ValueError(
                    f"the base pipeline's {name} has {rows} positions, more than the {target} of the long encoder "
                    f"given; give a long encoder for {labels[name]} too"
                )
            encoder = stretch_text_encoder(encoder, position_keep, position_ratio, target_length=target)
        elif base_encoder is not None and base_encoder is not encoder:
            _check_width(labels[name], encoder, _width(base_encoder), f"the base pipeline's {name}", hint)
            _check_projection(labels[name], encoder, base_encoder, name)
            encoder = encoder.to(device=base_encoder.device, dtype=base_encoder.dtype)
        _check_long(labels[name], encoder, base_length)
        target = text_encoder_length(encoder) if target is None else target
        result[name] = encoder
    return result


def long_prompt_sd3_pipeline(
    base: str | os.PathLike | Any,
    clip_l: str | os.PathLike | nn.Module | None = None,
    clip_g: str | os.PathLike | nn.Module | None = None,
    *,
    tokenizer: CLIPTokenizer | None = None,
    tokenizer_2: CLIPTokenizer | None = None,
    pad_with: str = "longclip",
    position_keep: int = 20,
    position_ratio: int = 4,
    pipeline_class: type | None = None,
    text_encoder_kwargs: dict | None = None,
    **from_pretrained_kwargs,
) -> Any:
    """A stock SD3 / SD3.5 pipeline whose two CLIP encoders read 248 tokens; T5 is left as it is.

    ``text_encoder`` (CLIP-L with projection) becomes `clip_l` and ``text_encoder_2`` (OpenCLIP bigG with
    projection) becomes `clip_g`; an encoder not given is the base's own stretched with
    :func:`stretch_text_encoder` (no training), to the length of the given one. Both CLIP tokenizers get that
    length, and the pipeline is rebuilt so that its ``tokenizer_max_length`` (which SD3 reads once, at
    construction, and uses for both CLIP tokenizers) follows. ``text_encoder_3`` / ``tokenizer_3`` (T5) are
    untouched: ``max_sequence_length`` in the call keeps its meaning. ``prompt``, ``prompt_2`` (bigG), ``prompt_3``
    (T5) and the negative prompts keep theirs. SD3 concatenates the CLIP hidden states of both encoders per token,
    zero-pads them to T5's width and puts the T5 tokens after them: with 248-token encoders the joint text sequence
    is ``248 + max_sequence_length`` tokens long (``77 + max_sequence_length`` for the stock pipeline).

    Args:
        base: an SD3 / SD3.5 pipeline as a Hub id (``"stabilityai/stable-diffusion-3.5-medium"``), a folder, or a
            pipeline object (its components are shared, not copied; the object itself is not changed).
        clip_l: the long CLIP-L (see :func:`load_long_text_encoder`; loaded with its projection); ``None``
            stretches the base's own.
        clip_g: a long bigG; ``None`` (default) stretches the base's own to `clip_l`'s length.
        tokenizer, tokenizer_2: tokenizers to lengthen (default: the base's).
        pad_with (`str`): applied to both CLIP tokenizers; see :func:`long_prompt_tokenizer`.
        position_keep, position_ratio: stretch geometry for encoders stretched here (20, 4: 77 -> 248).
        pipeline_class: class for a Hub id / folder (default ``StableDiffusion3Pipeline``); a pipeline object keeps
            its class (img2img, inpainting).
        text_encoder_kwargs (`dict`, *optional*): ``from_pretrained`` options for the encoder sources.
        from_pretrained_kwargs: options for the base pipeline's ``from_pretrained`` (``torch_dtype``, ...);
            ``torch_dtype`` is applied to the long encoders too.

    Returns:
        The pipeline; :func:`check_long_prompt_pipeline` passes on it.

    Example:

    ```python
    >>> from hf_longclip.diffusion import long_prompt_sd3_pipeline
    >>> pipe = long_prompt_sd3_pipeline("stabilityai/stable-diffusion-3.5-medium", "zer0int/LongCLIP-L-Diffusers")
    >>> image = pipe("a very long prompt ...", num_inference_steps=28).images[0]
    ```
    """
    labels = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    long_encoders = _load_long_encoders(
        {"text_encoder": clip_l, "text_encoder_2": clip_g}, True, _dtype_from(from_pretrained_kwargs),
        text_encoder_kwargs or {},
    )
    owned = isinstance(base, (str, os.PathLike))
    if owned:
        if pipeline_class is None:
            require("diffusers", "diffusion")
            from diffusers import StableDiffusion3Pipeline as pipeline_class
        _check_widths_from_configs(base, long_encoders, labels, _SD3_HINT, from_pretrained_kwargs)
        overrides = {name: e for name, e in long_encoders.items() if e is not None}
        pipe = pipeline_class.from_pretrained(base, **overrides, **from_pretrained_kwargs)
    else:
        pipe = base
    _require_kind(pipe, "sd3", "long_prompt_sd3_pipeline")
    encoders = _lengthen_clip_encoders(pipe, owned, long_encoders, labels, _SD3_HINT, position_keep, position_ratio)
    tok_1 = tokenizer if tokenizer is not None else pipe.tokenizer
    tok_2 = tokenizer_2 if tokenizer_2 is not None else pipe.tokenizer_2
    pipe = _rebuild_pipeline(
        pipe,
        **encoders,
        tokenizer=_build_tokenizer(tok_1, tokenizer, encoders["text_encoder"], pad_with),
        tokenizer_2=_build_tokenizer(tok_2, tokenizer_2, encoders["text_encoder_2"], pad_with),
    )
    check_long_prompt_pipeline(pipe)
    return pipe


def long_prompt_flux_pipeline(
    base: str | os.PathLike | Any,
    clip_l: str | os.PathLike | nn.Module | None = None,
    *,
    tokenizer: CLIPTokenizer | None = None,
    pad_with: str = "longclip",
    position_keep: int = 20,
    position_ratio: int = 4,
    pipeline_class: type | None = None,
    text_encoder_kwargs: dict | None = None,
    **from_pretrained_kwargs,
) -> Any:
    """A stock Flux pipeline whose CLIP-L (``text_encoder``) reads 248 tokens; T5 (``text_encoder_2``) is untouched.

    Flux uses only CLIP-L's pooled output (the end token's final hidden state), so the long encoder changes one
    vector, which now depends on the first 246 prompt tokens instead of 75; tokens past that are cut from the CLIP
    input (:func:`encode_long_prompt` does not window a pooled vector), while T5 still reads the whole prompt up to
    ``max_sequence_length``. The pooled output does not depend on the pad token, so `pad_with` changes nothing
    here but the saved tokenizer.

    Args:
        base: a Flux pipeline as a Hub id (``"black-forest-labs/FLUX.1-dev"``), a folder, or a pipeline object
            (``FluxPipeline``, ``FluxImg2ImgPipeline``, ``FluxFillPipeline``, ... : same components; shared, not
            changed).
        clip_l: the long CLIP-L (see :func:`load_long_text_encoder`); ``None`` stretches the base's own.
        tokenizer: the tokenizer to lengthen (default: the base's).
        pad_with (`str`): see :func:`long_prompt_tokenizer`.
        position_keep, position_ratio: stretch geometry when `clip_l` is None (20, 4: 77 -> 248).
        pipeline_class: class for a Hub id / folder (default ``FluxPipeline``).
        text_encoder_kwargs (`dict`, *optional*): ``from_pretrained`` options for the encoder source.
        from_pretrained_kwargs: options for the base pipeline's ``from_pretrained``.

    Returns:
        The pipeline; :func:`check_long_prompt_pipeline` passes on it.

    Example:

    ```python
    >>> from hf_longclip.diffusion import long_prompt_flux_pipeline
    >>> pipe = long_prompt_flux_pipeline("black-forest-labs/FLUX.1-dev", "zer0int/LongCLIP-L-Diffusers")
    >>> image = pipe("a very long prompt ...", num_inference_steps=28).images[0]
    ```
    """
    labels = {"text_encoder": "clip_l"}
    long_encoders = _load_long_encoders(
        {"text_encoder": clip_l}, False, _dtype_from(from_pretrained_kwargs), text_encoder_kwargs or {}
    )
    owned = isinstance(base, (str, os.PathLike))
    if owned:
        if pipeline_class is None:
            require("diffusers", "diffusion")
            from diffusers import FluxPipeline as pipeline_class
        _check_widths_from_configs(base, long_encoders, labels, _FLUX_HINT, from_pretrained_kwargs)
        overrides = {name: e for name, e in long_encoders.items() if e is not None}
        pipe = pipeline_class.from_pretrained(base, **overrides, **from_pretrained_kwargs)
    else:
        pipe = base
    _require_kind(pipe, "flux", "long_prompt_flux_pipeline")
    encoders = _lengthen_clip_encoders(pipe, owned, long_encoders, labels, _FLUX_HINT, position_keep, position_ratio)
    tok = tokenizer if tokenizer is not None else pipe.tokenizer
    pipe = _rebuild_pipeline(
        pipe, **encoders, tokenizer=_build_tokenizer(tok, tokenizer, encoders["text_encoder"], pad_with)
    )
    check_long_prompt_pipeline(pipe)
    return pipe


#: Builder keyword arguments that only some pipeline kinds take (long_prompt_pipeline rejects them elsewhere).
_KIND_ONLY_KWARGS = {
    "text_encoder_2": ("sdxl",),
    "clip_l": ("sd3", "flux"),
    "clip_g": ("sd3",),
    "tokenizer_2": ("sdxl", "sd3"),
    "position_keep": ("sdxl", "sd3", "flux"),
    "position_ratio": ("sdxl", "sd3", "flux"),
}


def long_prompt_pipeline(
    base: str | os.PathLike | Any, text_encoder: str | os.PathLike | nn.Module | None = None, **kwargs
) -> Any:
    """Build the long-prompt version of any supported pipeline, picking the builder with :func:`pipeline_kind`.

    SD 1.x / 2.x: :func:`long_prompt_sd_pipeline`; SDXL (and refiner): :func:`long_prompt_sdxl_pipeline`; SD3 /
    SD3.5: :func:`long_prompt_sd3_pipeline` (`text_encoder` is its ``clip_l``); Flux:
    :func:`long_prompt_flux_pipeline` (`text_encoder` is its ``clip_l``). A Hub id or folder is recognised from its
    ``model_index.json`` before anything is loaded, and loaded with the pipeline class named there.

    Args:
        base: a pipeline object, Hub id or folder.
        text_encoder: the long CLIP-L (the encoder for SD 1.x); ``None`` stretches the base's own.
        kwargs: passed to the builder: e.g. ``text_encoder_2`` (SDXL), ``clip_g`` (SD3), ``pad_with``,
            ``torch_dtype``. One that belongs to another kind of pipeline raises `ValueError`.
    """
    if isinstance(base, (str, os.PathLike)):
        require("diffusers", "diffusion")
        import diffusers

        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs and k != "subfolder"}
        index = diffusers.DiffusionPipeline.load_config(base, **hub_kwargs)
        kind = _kind_from_model_index(index)
        cls_name = index.get("_class_name", "?")
        if kwargs.get("pipeline_class") is None and getattr(diffusers, cls_name, None) is not None:
            kwargs["pipeline_class"] = getattr(diffusers, cls_name)
    else:
        kind = pipeline_kind(base)
        cls_name = type(base).__name__
    for name, kinds in _KIND_ONLY_KWARGS.items():
        if name in kwargs and kind not in kinds:
            raise ValueError(
                f"{name}= does not apply to {cls_name}, a {_KIND_NAMES[kind]} pipeline (it is for "
                f"{' / '.join(_KIND_NAMES[k] for k in kinds)})"
            )
    if kind == "sd":
        return long_prompt_sd_pipeline(base, text_encoder, **kwargs)
    if kind == "sdxl":
        return long_prompt_sdxl_pipeline(base, text_encoder, **kwargs)
    if text_encoder is not None and kwargs.get("clip_l") is not None:
        raise ValueError("give the long CLIP-L once: as text_encoder or as clip_l, not both")
    clip_l = text_encoder if text_encoder is not None else kwargs.pop("clip_l", None)
    kwargs.pop("clip_l", None)
    builder = long_prompt_sd3_pipeline if kind == "sd3" else long_prompt_flux_pipeline
    return builder(base, clip_l, **kwargs)



# ----------------------------------------------------------------------------------------------- prompt encoding
def _prompt_list(prompt: Any) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")


def _as_list(
    prompt: str | Sequence[str] | None, batch: int, name: str = "negative_prompt", default: str = ""
) -> list[str]:
    if prompt is None:
        return [default] * batch
    if isinstance(prompt, str):
        return [prompt] * batch
    prompt = list(prompt)
    if len(prompt) != batch:
        raise ValueError(
            f"{name} has {len(prompt)} entries but prompt has {batch}; give one per prompt, or a single string for all"
        )
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
    prompt_3: str | Sequence[str] | None = None,
    negative_prompt_3: str | Sequence[str] | None = None,
    hidden_states: str | None = None,
    clip_skip: int | None = None,
    max_sequence_length: int | None = None,
    do_classifier_free_guidance: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode prompts of any length for a long-prompt SD, SDXL, SD3 or Flux pipeline; pass the result as
    ``pipe(**result)``.

    Prompts are cut into windows of the encoder length (248 tokens: start token, 246 prompt tokens, end token),
    each window is encoded separately and the windows' hidden states are concatenated along the token axis (what
    lpw-style pipelines do with 77-token windows). The UNet's cross-attention (SD / SDXL) and SD3's joint attention
    accept any number of tokens. Every prompt and negative prompt of the batch is padded with empty windows to the
    same window count, so the positive and negative embeddings have the same shape. A prompt of at most 248 tokens
    gives one window whose embeddings equal the pipeline's own ``encode_prompt`` output.

    For SDXL the pooled embeddings come from ``text_encoder_2``'s projected end token of the *first* window (the
    pooled vector of the plain path); an omitted negative prompt gives zeros when the pipeline's
    ``force_zeros_for_empty_prompt`` is set, as in diffusers.

    For SD3 both CLIP encoders are windowed alike and their hidden states concatenated per token, zero-padded to
    T5's width; the T5 embeddings of ``prompt_3`` (default: `prompt`), from the pipeline's own T5 path, follow
    along the token axis, as in diffusers: ``prompt_embeds`` is `(batch, windows * 248 + max_sequence_length,
    joint_attention_dim)`. The pooled embedding is both encoders' projected end tokens of the *first* window,
    concatenated. An omitted negative prompt is the empty string, as in diffusers.

    For Flux, which uses only CLIP-L's pooled output, nothing is windowed: ``pooled_prompt_embeds`` is CLIP-L's
    pooled output of the first 248 tokens (the rest of the prompt is cut from the CLIP input) and ``prompt_embeds``
    the T5 embeddings of ``prompt_2`` (default: `prompt`) up to ``max_sequence_length``. Negative embeddings (for
    ``true_cfg_scale``) are returned only when a negative prompt is given.

    Args:
        pipe: a pipeline that :func:`pipeline_kind` recognises, checked with :func:`check_long_prompt_pipeline`.
        prompt (`str` or `list[str]`): the prompt(s), any length.
        negative_prompt (`str` or `list[str]`, *optional*): negative prompt(s); empty when omitted (SD, SDXL, SD3).
        prompt_2, negative_prompt_2 (*optional*): the second encoder's prompts (SDXL and SD3: bigG; Flux: T5),
            default: the first ones.
        prompt_3, negative_prompt_3 (*optional*): SD3's T5 prompts, default: the first ones.
        hidden_states (`str`, *optional*): which layer conditions the denoiser. ``None`` does what the pipeline
            does (SD: last layer after the final LayerNorm; SDXL and SD3: penultimate layer, no LayerNorm).
            ``"last"``: last layer after the final LayerNorm for every encoder (Long-CLIP's SDXL choice, `spec
            §1.6`). ``"penultimate"``: SDXL's and SD3's usual layer (not for SD). Not for Flux.
        clip_skip (`int`, *optional*): as in diffusers (layers skipped from the end), applied to positive and
            negative prompts alike. Not combinable with ``hidden_states="last"``; not for Flux.
        max_sequence_length (`int`, *optional*): T5's length (SD3 and Flux only; default as the pipeline: 256 for
            SD3, 512 for Flux).
        do_classifier_free_guidance (`bool`): also encode the negative prompt.

    Returns:
        `dict` with ``prompt_embeds`` and, with guidance, ``negative_prompt_embeds`` of the same shape; for SDXL,
        SD3 and Flux also ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds``. SD / SDXL:
        ``prompt_embeds`` is `(batch, windows * length, width)`.
    """
    check_long_prompt_pipeline(pipe)
    kind = pipeline_kind(pipe)
    if hidden_states not in HIDDEN_STATE_CHOICES:
        raise ValueError(f"hidden_states must be one of {HIDDEN_STATE_CHOICES}, got {hidden_states!r}")
    if kind == "flux" and (hidden_states is not None or clip_skip):
        raise ValueError(
            "Flux uses only CLIP-L's pooled output (the end token after the final LayerNorm): hidden_states and "
            "clip_skip do not apply to it"
        )
    if hidden_states == "penultimate" and kind == "sd":
        raise ValueError("hidden_states='penultimate' is SDXL's and SD3's choice; for SD use clip_skip=1")
    if hidden_states == "last" and clip_skip:
        raise ValueError("clip_skip selects an earlier layer; it cannot be combined with hidden_states='last'")
    if kind != "sd3" and (prompt_3 is not None or negative_prompt_3 is not None):
        raise ValueError(f"prompt_3 / negative_prompt_3 are SD3's T5 prompts; this is a {_KIND_NAMES[kind]} pipeline")
    if kind in ("sd3", "flux"):
        max_sequence_length = max_sequence_length or (256 if kind == "sd3" else 512)
        if max_sequence_length > 512:
            raise ValueError(
                f"max_sequence_length cannot be greater than 512 (diffusers' limit), got {max_sequence_length}"
            )
    elif max_sequence_length is not None:
        raise ValueError(f"max_sequence_length is T5's length (SD3, Flux); this {_KIND_NAMES[kind]} pipeline has no T5")

    prompts = _prompt_list(prompt)
    batch = len(prompts)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    if kind == "flux":
        return _encode_flux(
            pipe, prompts, negative_prompt, prompt_2, negative_prompt_2, max_sequence_length,
            do_classifier_free_guidance, device,
        )

    layer = hidden_states or ("sd" if kind == "sd" else "penultimate")
    if layer == "last" and kind == "sd":
        layer = "sd"
    negatives = _as_list(negative_prompt, batch)
    pairs = [(pipe.tokenizer, pipe.text_encoder, prompts, negatives)]
    if kind in ("sdxl", "sd3"):
        second = _as_list(prompt_2, batch, "prompt_2") if prompt_2 is not None else prompts
        neg_2 = _as_list(negative_prompt_2, batch, "negative_prompt_2") if negative_prompt_2 is not None else negatives
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2, second, neg_2))
        if pipe.text_encoder is None:  # SDXL refiner: only the second encoder
            pairs = pairs[1:]
    if kind == "sd3":
        third = _as_list(prompt_3, batch, "prompt_3") if prompt_3 is not None else prompts
        neg_3 = _as_list(negative_prompt_3, batch, "negative_prompt_3") if negative_prompt_3 is not None else negatives
    zero_negative = kind == "sdxl" and negative_prompt is None and bool(pipe.config.get("force_zeros_for_empty_prompt"))
    encode_negative = do_classifier_free_guidance and not zero_negative

    bodies = []
    for tokenizer, _, pos, neg in pairs:
        bodies.append((_token_bodies(pipe, tokenizer, pos), _token_bodies(pipe, tokenizer, neg) if encode_negative else []))
    count = max(_window_count(t, b) for (t, *_), (pos, neg) in zip(pairs, bodies) for b in pos + neg)

    out_dtype = (pipe.text_encoder_2 if kind == "sdxl" else pipe.text_encoder).dtype
    result: dict[str, torch.Tensor] = {}
    for key, index in (("prompt_embeds", 0), ("negative_prompt_embeds", 1)):
        if key == "negative_prompt_embeds" and not encode_negative:
            continue
        per_encoder, pooled = [], []
        for (tokenizer, encoder, *_), body_pair in zip(pairs, bodies):
            windows = [_windows(tokenizer, body, count) for body in body_pair[index]]
            # (batch, count, length) -> one encoder call over batch * count windows
            ids = torch.tensor(windows, dtype=torch.long).flatten(0, 1)
            hidden, pooled_all = _encode_windows(encoder, ids, layer, clip_skip, device)
            per_encoder.append(hidden.reshape(batch, count * hidden.shape[1], hidden.shape[-1]))
            if pooled_all is not None:
                pooled.append(pooled_all.reshape(batch, count, -1)[:, 0])
        embeds = torch.cat(per_encoder, dim=-1).to(device=device, dtype=out_dtype)
        pooled_key = key.replace("prompt_embeds", "pooled_prompt_embeds")
        if kind == "sd3":
            t5 = pipe._get_t5_prompt_embeds(
                prompt=third if index == 0 else neg_3, num_images_per_prompt=1,
                max_sequence_length=max_sequence_length, device=device,
            )
            embeds = torch.nn.functional.pad(embeds, (0, t5.shape[-1] - embeds.shape[-1]))
            embeds = torch.cat([embeds, t5], dim=-2)
        result[key] = embeds
        if kind in ("sdxl", "sd3"):  # SDXL: bigG's pooled vector only; SD3: CLIP-L's and bigG's, concatenated
            pooled = pooled[-1:] if kind == "sdxl" else pooled
            result[pooled_key] = torch.cat(pooled, dim=-1).to(device=device, dtype=out_dtype)
    if do_classifier_free_guidance and zero_negative:
        result["negative_prompt_embeds"] = torch.zeros_like(result["prompt_embeds"])
        result["negative_pooled_prompt_embeds"] = torch.zeros_like(result["pooled_prompt_embeds"])
    return result


def _encode_flux(
    pipe: Any,
    prompts: list[str],
    negative_prompt,
    prompt_2,
    negative_prompt_2,
    max_sequence_length: int,
    do_classifier_free_guidance: bool,
    device,
) -> dict[str, torch.Tensor]:
    """Flux: CLIP-L's pooled output of each prompt's first window, and the pipeline's own T5 embeddings."""
    batch = len(prompts)
    t5_prompts = _as_list(prompt_2, batch, "prompt_2") if prompt_2 is not None else prompts
    jobs = [("", prompts, t5_prompts)]
    if do_classifier_free_guidance and (negative_prompt is not None or negative_prompt_2 is not None):
        negatives = _as_list(negative_prompt, batch)
        neg_2 = _as_list(negative_prompt_2, batch, "negative_prompt_2") if negative_prompt_2 is not None else negatives
        jobs.append(("negative_", negatives, neg_2))
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    result = {}
    for prefix, clip_prompts, t5_texts in jobs:
        ids = torch.tensor([_windows(tokenizer, body, 1)[0] for body in _token_bodies(pipe, tokenizer, clip_prompts)])
        pooled = encoder(ids.to(encoder.device)).pooler_output
        result[f"{prefix}pooled_prompt_embeds"] = pooled.to(device=device, dtype=encoder.dtype)
        result[f"{prefix}prompt_embeds"] = pipe._get_t5_prompt_embeds(
            prompt=t5_texts, num_images_per_prompt=1, max_sequence_length=max_sequence_length, device=device
        )
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
    Both folders load under transformers 4.x as well as 5 (:mod:`hf_longclip.export`: the weights are stored under
    the ``text_model.`` names 4.x expects, the tokenizer also as ``vocab.json`` + ``merges.txt`` for the slow
    `CLIPTokenizer`).

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
    from .export import save_model, save_tokenizer

    save_directory = Path(save_directory)
    save_model(encoder, save_directory / f"text_encoder{suffix}", **save_kwargs)
    save_tokenizer(long_prompt_tokenizer(tokenizer, rows, pad_with), save_directory / f"tokenizer{suffix}")
    return save_directory


def export_long_text_components(pipe: Any, save_directory: str | os.PathLike, **save_kwargs) -> Path:
    """Save a long pipeline's CLIP text encoders and their tokenizers (not the UNet / VAE) in the diffusers layout.

    The tokenizers are saved as they are (their pad choice included). T5 encoders (SD3's ``text_encoder_3``,
    Flux's ``text_encoder_2``) are left out: the builders do not change them, so the base pipeline supplies them.
    Reload with :func:`load_long_text_components` and pass the result to the base pipeline's ``from_pretrained``.
    As with :func:`export_text_encoder`, the folders also load under transformers 4.x.
    """
    from .export import save_model, save_tokenizer

    check_long_prompt_pipeline(pipe)
    save_directory = Path(save_directory)
    for suffix in ("", "_2"):
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if isinstance(encoder, (CLIPTextModel, CLIPTextModelWithProjection)):
            save_model(encoder, save_directory / f"text_encoder{suffix}", **save_kwargs)
            save_tokenizer(getattr(pipe, f"tokenizer{suffix}"), save_directory / f"tokenizer{suffix}")
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
    "PIPELINE_KINDS",
    "check_long_prompt_pipeline",
    "encode_long_prompt",
    "export_long_text_components",
    "export_text_encoder",
    "load_long_text_components",
    "load_long_text_encoder",
    "long_prompt_flux_pipeline",
    "long_prompt_pipeline",
    "long_prompt_sd3_pipeline",
    "long_prompt_sd_pipeline",
    "long_prompt_sdxl_pipeline",
    "long_prompt_tokenizer",
    "pipeline_kind",
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


def _tiny_t5_tokenizer(words: Sequence[str], model_max_length: int = 512):
    """A T5 (Unigram) tokenizer built in memory: one piece per word of `words`, single letters as a fallback."""
    from transformers import T5Tokenizer  # the tokenizers-backed class diffusers loads as T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted({w.lower() for w in words})]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 and Flux use
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _tiny_flow_vae_and_scheduler(dynamic_shifting: bool):
    """A 4-channel VAE with SD3 / Flux's shift_factor field and a flow-matching Euler scheduler."""
    require("diffusers", "diffusion")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    if dynamic_shifting:  # Flux: the shift follows the image size
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return vae, scheduler


def _tiny_clip_tokenizers():
    from .data.tokenizer import build_clip_tokenizer
    from .testing_utils import DEFAULT_WORDS

    tokenizer = build_clip_tokenizer(DEFAULT_WORDS, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer_2 = build_clip_tokenizer(DEFAULT_WORDS, model_max_length=CLIP_CONTEXT_LENGTH)
    tokenizer_2.add_special_tokens({"pad_token": tokenizer_2.convert_ids_to_tokens(0)})
    return tokenizer, tokenizer_2


def tiny_sd3_base_pipeline(
    seed: int = 0,
    hidden_size: int = 32,
    hidden_size_2: int = 48,
    projection_dim: int = 16,
    projection_dim_2: int = 24,
    t5_width: int = 96,
) -> Any:
    """A random tiny stock (77-token) `StableDiffusion3Pipeline`, built from configs.

    CLIP-L stand-in (``text_encoder``): `hidden_size` wide with a `projection_dim` projection (as `tiny_longclip`);
    bigG stand-in (``text_encoder_2``): `hidden_size_2` wide (another width, as in SD3), its tokenizer padding with
    ``!``; a one-layer T5 `t5_width` wide (the transformer's ``joint_attention_dim``, more than the CLIP widths'
    sum, so the CLIP embeddings are zero-padded as in SD3) with an in-memory Unigram tokenizer. Generate at 32x32.
    """
    require("diffusers", "diffusion")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from .testing_utils import DEFAULT_WORDS

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _tiny_clip_tokenizers()
    tokenizer_3 = _tiny_t5_tokenizer(DEFAULT_WORDS)
    text_encoder = CLIPTextModelWithProjection(_tiny_text_config(tokenizer, hidden_size, projection_dim)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, hidden_size_2, projection_dim_2)).eval()
    text_encoder_3 = _tiny_t5(tokenizer_3, t5_width)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=projection_dim + projection_dim_2,
        pos_embed_max_size=16,
    )
    vae, scheduler = _tiny_flow_vae_and_scheduler(dynamic_shifting=False)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_flux_base_pipeline(seed: int = 0, hidden_size: int = 32, t5_width: int = 32) -> Any:
    """A random tiny stock (77-token) `FluxPipeline` (guidance-distilled layout, as FLUX.1-dev), built from configs.

    CLIP-L stand-in (``text_encoder``, a `CLIPTextModel` `hidden_size` wide, as `tiny_longclip`) whose pooled output
    is the transformer's ``pooled_projection_dim``; a one-layer T5 ``text_encoder_2`` with an in-memory Unigram
    tokenizer. Generate at 32x32.
    """
    require("diffusers", "diffusion")
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from .testing_utils import DEFAULT_WORDS

    torch.manual_seed(seed)
    tokenizer, _ = _tiny_clip_tokenizers()
    tokenizer_2 = _tiny_t5_tokenizer(DEFAULT_WORDS)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, hidden_size)).eval()
    text_encoder_2 = _tiny_t5(tokenizer_2, t5_width)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=hidden_size,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae, scheduler = _tiny_flow_vae_and_scheduler(dynamic_shifting=True)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_longclip(seed: int = 1, hidden_size: int = 32) -> LongCLIPModel:
    """A random tiny `LongCLIPModel` (248 positions) with the tiny pipelines' vocabulary."""
    from .testing_utils import tiny_clip

    return LongCLIPModel.from_clip(tiny_clip(seed=seed, hidden_size=hidden_size))


__all__ += [
    "tiny_flux_base_pipeline",
    "tiny_longclip",
    "tiny_sd3_base_pipeline",
    "tiny_sd_base_pipeline",
    "tiny_sdxl_base_pipeline",
]
