"""Stock CLIP exports that load under transformers 4.x and 5.x, and the single-file text-encoder layout.

transformers 5 changed two things that make its own ``save_pretrained`` output unreadable to the 4.x releases most
diffusers installs and image-generation UIs still run:

- A `CLIPTextModel` built in memory (what ``to_text_model()`` returns) is saved with its weights at the root
  (``embeddings.token_embedding.weight``, ...). 4.x's `CLIPTextModel` holds them under ``text_model.`` and, finding
  none of its names, initialises every weight randomly with only a warning. transformers 5 reads both forms (its
  ``CLIPTextModel`` loading drops a leading ``text_model.``), so the exports here write the ``text_model.`` form.
  `CLIPTextModelWithProjection` and `CLIPModel` are saved with the same names by both versions.
- A tokenizer is saved as ``tokenizer.json`` only; 4.x's slow `CLIPTokenizer` (the class SD pipelines'
  ``model_index.json`` names) needs ``vocab.json`` and ``merges.txt``, which are written beside it here.

Every writer checks what it wrote: the weight names in the safetensors files must be exactly the 4.x names of the
model's parameters. See docs/diffusion.md (Export) for what each format holds and how it was tested.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTextModelWithProjection

#: The name prefix of the text tower in transformers 4.x checkpoints (and in ComfyUI's CLIP state dicts).
TEXT_PREFIX = "text_model."
#: Keys of ``tokenizer_config.json`` that describe how a tokenizer was loaded here, not the tokenizer.
_LOADING_KEYS = ("auto_map", "is_local", "local_files_only", "_commit_hash", "name_or_path")
#: The header line 4.x's slow byte-level BPE tokenizers skip when they read ``merges.txt``.
MERGES_HEADER = "#version: 0.2"
#: The most merges 4.x's slow `CLIPTokenizer` reads from ``merges.txt`` (it stops after OpenAI's 48894).
SLOW_CLIP_MAX_MERGES = 49152 - 256 - 2
_ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


# ----------------------------------------------------------------------------------------------- weight names
def portable_state_names(model: torch.nn.Module) -> dict[str, str]:
    """``{name in model.state_dict(): name in a checkpoint both transformers 4.x and 5.x load}``.

    A `CLIPTextModel` gets the ``text_model.`` prefix (transformers 5 keeps its text tower at the root, 4.x under
    ``text_model``); every other model keeps its names, which the two versions share.
    """
    names = list(model.state_dict())
    if isinstance(model, CLIPTextModel):
        return {name: name if name.startswith(TEXT_PREFIX) else TEXT_PREFIX + name for name in names}
    return {name: name for name in names}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _rename_in_file(path: Path, rename: Mapping[str, str]) -> None:
    """Rewrite a safetensors file with its tensors renamed (header metadata kept, ``format: pt`` ensured)."""
    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {rename.get(key, key): handle.get_tensor(key) for key in handle.keys()}
    metadata.setdefault("format", "pt")
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, path)


def make_weights_portable(model: torch.nn.Module, folder: str | os.PathLike) -> list[str]:
    """Give the weights ``save_pretrained`` wrote for `model` into `folder` the names 4.x and 5.x both load.

    Renames inside every ``*.safetensors`` file (and the shard index, when there is one), then checks that the
    names written are exactly ``portable_state_names(model)``: a missing or extra name raises `RuntimeError`
    instead of leaving a checkpoint that some version would half-initialise.

    Returns:
        The sorted weight names now in the folder.
    """
    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise RuntimeError(f"no .safetensors weights in {folder} (found: {found}); exports are safetensors only")
    wanted = portable_state_names(model)
    # A name that is already portable maps to itself; a 5.x root name maps to its prefixed form.
    rename = {name: target for name, target in wanted.items() if name != target}
    written: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
        if any(key in rename for key in keys):
            _rename_in_file(path, rename)
        written.update(rename.get(key, key) for key in keys)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {rename.get(k, k): v for k, v in data.get("weight_map", {}).items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    expected = set(wanted.values())
    if written != expected:
        missing, extra = sorted(expected - written), sorted(written - expected)
        raise RuntimeError(
            f"the weights written to {folder} do not match {type(model).__name__}'s parameters: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
    return sorted(written)


def save_model(model, folder: str | os.PathLike, **save_kwargs) -> Path:
    """``model.save_pretrained(folder)`` with weight names that transformers 4.x and 5.x both load.

    For a `CLIPTextModel` the safetensors keys get the ``text_model.`` prefix; `CLIPTextModelWithProjection` and
    `CLIPModel` are already saved alike by both versions (their names are checked all the same). Other models (a
    T5 encoder in an SD3 / Flux pipeline) are saved as they are.
    """
    folder = Path(folder)
    model.save_pretrained(folder, **save_kwargs)
    if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection, CLIPModel)):
        make_weights_portable(model, folder)
    return folder


# ----------------------------------------------------------------------------------------------- tokenizers
def _backend_json(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def _is_clip_bpe(model_json: Mapping) -> bool:
    """CLIP's byte-level BPE: merges to ``</w>``-ended words (what 4.x's slow `CLIPTokenizer` implements)."""
    return model_json.get("type") == "BPE" and model_json.get("end_of_word_suffix") == "</w>"


def _merge_lines(merges) -> list[str]:
    lines = []
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in part or "\n" in part for part in pair):
            raise ValueError(f"cannot write the BPE merge {merge!r} to merges.txt")
        lines.append(f"{pair[0]} {pair[1]}")
    return lines


def write_slow_clip_tokenizer_files(tokenizer, folder: str | os.PathLike) -> bool:
    """Write ``vocab.json`` and ``merges.txt`` (the files slow / 4.x `CLIPTokenizer` reads) for a CLIP tokenizer.

    They come from the tokenizer's own BPE model (the ``tokenizer.json`` it saves), so both tokenise alike.
    Returns False, writing nothing, for a tokenizer that is not CLIP's byte-level BPE (e.g. a T5 tokenizer).
    """
    data = _backend_json(tokenizer)
    if data is None or not _is_clip_bpe(data.get("model", {})):
        return False
    model = data["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    lines = _merge_lines(model.get("merges", []))
    if len(lines) > SLOW_CLIP_MAX_MERGES:
        raise ValueError(
            f"the tokenizer has {len(lines)} merges; transformers 4.x's slow CLIPTokenizer reads at most "
            f"{SLOW_CLIP_MAX_MERGES} (OpenAI CLIP's), so it would tokenise differently"
        )
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *lines]) + "\n", encoding="utf-8")
    return True


def _token_text(token) -> str | None:
    return None if token is None else str(token)


def _finish_tokenizer_folder(tokenizer, folder: Path, processor_class: str | None) -> None:
    """Make a folder ``tokenizer.save_pretrained`` (transformers 5) wrote loadable by 4.x's slow and fast classes."""
    is_clip = write_slow_clip_tokenizer_files(tokenizer, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for key in _LOADING_KEYS:
        config.pop(key, None)
    if processor_class:
        config["processor_class"] = processor_class
    else:
        config.pop("processor_class", None)  # e.g. LongCLIPProcessor, which an exported folder does not ship
    config["model_max_length"] = int(tokenizer.model_max_length)
    data = _backend_json(tokenizer)
    if data is not None and "added_tokens_decoder" not in config:
        # 4.x's slow tokenizers learn the added / special tokens (e.g. the '!' pad of pad_with="longclip") from here.
        config["added_tokens_decoder"] = {
            str(entry["id"]): {k: entry[k] for k in _ADDED_TOKEN_FIELDS if k in entry}
            for entry in data.get("added_tokens", [])
        }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    if is_clip:
        special = {
            name: _token_text(getattr(tokenizer, name, None))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        special = {k: v for k, v in special.items() if v is not None}
        text = json.dumps(special, indent=2, sort_keys=True) + "\n"
        (folder / "special_tokens_map.json").write_text(text, encoding="utf-8")


def save_tokenizer(tokenizer, folder: str | os.PathLike, *, processor_class: str | None = None) -> Path:
    """Save a tokenizer so that 4.x's slow and fast tokenizer classes and transformers 5 all load it.

    Beside ``tokenizer.json`` / ``tokenizer_config.json`` (what transformers 5 writes) a CLIP tokenizer gets
    ``vocab.json``, ``merges.txt`` and ``special_tokens_map.json``; ``tokenizer_config.json`` keeps
    ``model_max_length``, lists the added tokens for the slow class, and loses what only describes how the source
    was loaded (``auto_map`` to hf_longclip's processor code, ``is_local``, ...).
    """
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    _finish_tokenizer_folder(tokenizer, folder, processor_class)
    return folder


def save_clip_processor(image_processor, tokenizer, folder: str | os.PathLike) -> Path:
    """Save a stock `CLIPProcessor` (image processor + tokenizer) readable by transformers 4.x and 5.

    transformers 5 writes the image processor inside ``processor_config.json``; it is also written alone to
    ``preprocessor_config.json``, where 4.x image processors look for it. References to hf_longclip's processor
    code are dropped: the folder holds no code.
    """
    folder = Path(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    processor_path = folder / "processor_config.json"
    image_config = image_processor.to_dict()
    if processor_path.is_file():
        data = json.loads(processor_path.read_text(encoding="utf-8"))
        data.pop("auto_map", None)
        if isinstance(data.get("image_processor"), dict):
            data["image_processor"].pop("auto_map", None)
            image_config = data["image_processor"]
        data["processor_class"] = "CLIPProcessor"
        processor_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    image_config = {k: v for k, v in image_config.items() if k != "auto_map"}
    image_config["processor_class"] = "CLIPProcessor"
    preprocessor = folder / "preprocessor_config.json"
    if not preprocessor.is_file():
        preprocessor.write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _finish_tokenizer_folder(tokenizer, folder, "CLIPProcessor")
    return folder


# ----------------------------------------------------------------------------------------------- single file
#: The `CLIPTextConfig` fields stored in a single file's metadata (what shapes and computes the text tower).
_SINGLE_FILE_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
    "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id",
)


def single_file_state_dict(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection, with_projection: bool = True
) -> dict[str, torch.Tensor]:
    """The text encoder's weights under transformers' ``text_model.*`` names (+ ``text_projection.weight``)."""
    if with_projection and not isinstance(text_encoder, CLIPTextModelWithProjection):
        raise TypeError("with_projection=True needs a CLIPTextModelWithProjection: to_text_model(with_projection=True)")
    names = portable_state_names(text_encoder)
    state = {}
    for name, tensor in text_encoder.state_dict().items():
        target = names[name]
        if target.startswith(TEXT_PREFIX) or (with_projection and target == "text_projection.weight"):
            state[target] = tensor.detach().to("cpu").contiguous().clone()
    return state


def save_single_file(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
    path: str | os.PathLike,
    *,
    with_projection: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a text encoder as one ``.safetensors`` file with transformers ``text_model.*`` names.

    This is the layout long CLIP-L text encoders are shared in for node-based UIs (ComfyUI's CLIP loaders read
    ``text_model.*`` names and take the prompt length from the rows of
    ``text_model.embeddings.position_embedding.weight``). The header metadata holds ``format: pt``,
    ``max_position_embeddings`` and the text config as JSON (``text_config``), from which
    `CLIPTextConfig(**json.loads(...))` rebuilds the model.

    Args:
        text_encoder: a stock text encoder (``LongCLIPModel.to_text_model(...)``).
        path: the output file; must end in ``.safetensors``.
        with_projection (`bool`): also store ``text_projection.weight`` (needs a `CLIPTextModelWithProjection`).
        dtype (`torch.dtype`, *optional*): cast the tensors (e.g. ``torch.float16``, how CLIP-L files are usually
            shared); default: the model's dtype.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"the single-file export is a .safetensors file; got {str(path)!r}")
    state = single_file_state_dict(text_encoder, with_projection)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    config = text_encoder.config
    metadata = {
        "format": "pt",
        "max_position_embeddings": str(config.max_position_embeddings),
        "architecture": "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel",
        "text_config": json.dumps(
            {k: v for k, v in config.to_dict().items() if k in _SINGLE_FILE_CONFIG_FIELDS}, sort_keys=True
        ),
    }
    rows = state[TEXT_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    if rows != config.max_position_embeddings:
        raise RuntimeError(f"the position table has {rows} rows but the config says {config.max_position_embeddings}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, partial, metadata=metadata)
    os.replace(partial, path)
    return path


__all__ = [
    "TEXT_PREFIX",
    "make_weights_portable",
    "portable_state_names",
    "save_clip_processor",
    "save_model",
    "save_single_file",
    "save_tokenizer",
    "single_file_state_dict",
    "write_slow_clip_tokenizer_files",
]
