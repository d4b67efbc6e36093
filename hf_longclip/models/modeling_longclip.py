"""Long-CLIP (Zhang et al., ECCV 2024) and the base every hf_longclip variant builds on: transformers' `CLIPModel` with a
stretched, partly frozen text position table, the two-stage loss interface and the per-variant training hooks.
See docs/longclip.md (the method) and docs/adding_a_variant.md (the contract a variant fills in)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    PreTrainedConfig,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_longclip import LONGCLIP_LOGIT_SCALE, LongCLIPConfig, check_saved_config, validate_stretch
from .losses_common import gather_with_grad, local_contrastive_loss
from .losses_longclip import pca_reconstruct
from .activations import use_memory_efficient_activations
from .packing import DEFAULT_PACK_LENGTH, PACKABLE_ATTENTION, packed_text_hidden_states

TEXT_POSITION_KEY = "text_model.embeddings.position_embedding.weight"
#: Options of `from_pretrained` that only say where a checkpoint comes from.
HUB_KWARGS = frozenset(
    {"revision", "cache_dir", "token", "local_files_only", "force_download", "proxies", "subfolder", "trust_remote_code"}
)
#: Every loading option `from_clip` accepts: the Hub options plus how the weights are materialised.
LOADING_KWARGS = HUB_KWARGS | {
    "dtype",
    "attn_implementation",
    "device_map",
    "use_safetensors",
    "low_cpu_mem_usage",
    "variant",
    "max_memory",
    "offload_folder",
}
#: Rows `encode_text` / `encode_image` run through a tower at once (a whole list in one call would hold every row's
#: attention maps at the same time: 5000 captions of 248 tokens need ~5 GB even in a tiny model).
ENCODE_BATCH_SIZE = 256
#: Top-level modules and parameters of a stock CLIP (the backbone every variant shares).
BACKBONE_MODULES = frozenset({"text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"})
#: Config fields that describe a stretched table (copied from a source hf_longclip model; a stock source's come from
#: `from_clip`'s ``position_keep`` / ``position_ratio`` and the source table's length).
STRETCH_FIELDS = ("source_max_position_embeddings", "position_keep", "position_ratio")


def stretch_position_embeddings(
    table: torch.Tensor, keep: int = 20, ratio: int = 4, target_length: int | None = None
) -> torch.Tensor:
    """Knowledge-preserving stretch of a position table (Long-CLIP).

    Rows ``0..keep-1`` are copied. Every later source row ``P[j]`` becomes ``ratio`` rows
    ``(1 - k/ratio) * P[j] + (k/ratio) * P[j+1]`` for ``k = 0..ratio-1``; for the last source row, ``P[j+1]`` is the
    linear extrapolation ``2 P[-1] - P[-2]``. A 77-row table with keep 20 and ratio 4 becomes 248 rows. The arithmetic
    runs in at least fp32 and the result has the input's dtype.

    Args:
        table (`torch.Tensor` of shape `(source_length, dim)`): the source position table.
        keep (`int`): leading rows copied unchanged.
        ratio (`int`): rows produced from each remaining source row.
        target_length (`int`, *optional*): expected output length; a mismatch raises before any work.

    Returns:
        `torch.Tensor` of shape `(keep + ratio * (source_length - keep), dim)`.
    """
    if table.dim() != 2:
        raise ValueError(f"expected a (positions, dim) table, got shape {tuple(table.shape)}")
    source_length = table.shape[0]
    validate_stretch(source_length, keep, ratio, target_length)
    work = table.detach().float() if table.dtype in (torch.float16, torch.bfloat16) else table.detach()
    tail = work[keep:]
    following = torch.cat([tail[1:], (2 * work[-1] - work[-2]).unsqueeze(0)], dim=0)
    weights = torch.arange(ratio, dtype=work.dtype, device=work.device) / ratio
    mixed = tail.unsqueeze(1) * (1 - weights)[None, :, None] + following.unsqueeze(1) * weights[None, :, None]
    stretched = torch.cat([work[:keep], mixed.reshape(-1, work.shape[1])], dim=0)
    return stretched.to(table.dtype)


# ---------------------------------------------------------------------------------------------- input checks
def end_token_id(eos_token_id: Any, vocab_size: int | None) -> int | None:
    """The id the text tower pools each caption at, or `None` when that cannot be checked.

    transformers' CLIP text tower pools at the first ``eos_token_id``; a legacy config whose ``eos_token_id`` is 2
    pools at the largest id of the row, the end-of-text token of OpenAI's vocabulary (its last id). An id outside
    the vocabulary (e.g. transformers' test configs: 49407 with 99 tokens) can never be in the input: `None`.
    """
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int):
        return None
    if eos_token_id == 2:
        eos_token_id = vocab_size - 1 if vocab_size else None
    if eos_token_id is None or eos_token_id < 0 or (vocab_size is not None and eos_token_id >= vocab_size):
        return None
    return eos_token_id


def _values_wanted(tensor: torch.Tensor, values: bool | None) -> bool:
    # A check of tensor values reads them on the host: free for a CPU tensor, a device synchronisation otherwise.
    return tensor.device.type == "cpu" if values is None else bool(values)


def _named_rows(rows: torch.Tensor, row_names: Sequence[str] | None = None, noun: str = "row") -> str:
    """The first five of `rows` (indices) by name: ``row_names[i]``, else ``"<noun> <i>"``."""
    names = [row_names[i] if row_names is not None else f"{noun} {i}" for i in rows[:5].tolist()]
    return ", ".join(names) + (", ..." if rows.numel() > 5 else "")


def _check_batch(tensor: Any, what: str, kind: str, shape: str, noun: str) -> None:
    """A tensor with one dimension per name in `shape` and at least one row (a `TypeError` / `ValueError` naming
    `what` otherwise)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a {kind}, got {type(tensor).__name__}")
    if tensor.dim() != shape.count(",") + 1:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch (0 {noun}s); pass at least one {noun}")


def check_input_ids(
    input_ids: Any,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: Any = None,
    vocab_size: int | None = None,
    *,
    values: bool | None = None,
    what: str = "input_ids",
    row_names: Sequence[str] | None = None,
) -> None:
    """Raise a `ValueError` naming the problem for token ids the text tower cannot use.

    Always (free: metadata only): not `(batch, seq_len)`, an empty batch, no tokens, a float / bool dtype (and a
    `TypeError` for a non-tensor). With `values` (default: only when `input_ids` is on the CPU, where reading values
    costs no device synchronisation): ids outside ``[0, vocab_size)`` and rows without the end-of-text token
    (`end_token_id`) inside their attention mask; without it every such caption is pooled at a wrong position.
    """
    _check_batch(input_ids, what, "tensor of token ids", "(batch, seq_len)", "caption")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{what} has 0 tokens per caption; captions need at least the start and end tokens")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {input_ids.dtype}")
    if not _values_wanted(input_ids, values) or input_ids.device.type == "meta":
        return
    if vocab_size is not None:
        outside = ((input_ids < 0) | (input_ids >= vocab_size)).any(-1).nonzero().flatten()
        if outside.numel():
            raise ValueError(
                f"{what} holds ids outside the {vocab_size}-token vocabulary ({_named_rows(outside, row_names)}); "
                "tokenise with the model's own tokenizer"
            )
    end = end_token_id(eos_token_id, vocab_size)
    if end is None:
        return
    has_end = input_ids == end
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(input_ids.shape):
        has_end = has_end & attention_mask.to(device=input_ids.device, dtype=torch.bool)
    missing = (~has_end.any(-1)).nonzero().flatten()
    if missing.numel():
        raise ValueError(
            f"{missing.numel()} of {input_ids.shape[0]} captions in {what} have no end-of-text token (id {end}) "
            f"({_named_rows(missing, row_names)}): the text tower pools each caption at that token, so these would "
            "be read at a wrong position. Tokenise with the processor (truncation keeps the end token last)"
        )


def check_pixel_values(
    pixel_values: Any,
    num_channels: int | None = None,
    *,
    values: bool | None = None,
    what: str = "pixel_values",
) -> None:
    """Raise a `ValueError` naming the problem for pixel values the image tower cannot use.

    Always (metadata only): not `(batch, channels, height, width)`, an empty batch, a channel count other than
    `num_channels`, an integer dtype (raw 0-255 pixels: the tower expects the image processor's rescaled, normalised
    floats); a `TypeError` for a non-tensor. With `values` (default: only on the CPU, no device synchronisation): NaN or infinite values.
    """
    _check_batch(pixel_values, what, "tensor", "(batch, channels, height, width)", "image")
    if num_channels is not None and pixel_values.shape[1] != num_channels:
        raise ValueError(f"{what} have {pixel_values.shape[1]} channels, but the image tower takes {num_channels}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{what} have dtype {pixel_values.dtype}; the image tower takes floating-point pixels rescaled and "
            "normalised by the image processor (processor(images=...)), not raw integer pixels"
        )
    if not _values_wanted(pixel_values, values) or pixel_values.device.type == "meta":
        return
    bad = (~torch.isfinite(pixel_values)).flatten(1).any(-1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"{what} hold NaN or infinite values ({_named_rows(bad, noun='image')})")


def _is_row_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 parameter); only row sharding on one mesh dimension is handled."""
    if not (torch.distributed.is_available() and type(tensor).__name__ == "DTensor"):
        return False
    from torch.distributed.tensor import Shard

    if tuple(tensor.placements) != (Shard(0),):
        raise NotImplementedError(f"a position table sharded as {tensor.placements}; only Shard(0) is supported")
    return True


def _with_leading_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A row-sharded DTensor `weight` with its first ``len(rows)`` rows replaced by `rows` (each process edits the
    rows it holds; the chunking is FSDP2's, ``torch.chunk`` along dim 0)."""
    from torch.distributed.tensor import DTensor

    mesh = weight.device_mesh
    local = weight.to_local().detach()
    chunk = -(-weight.shape[0] // mesh.size())
    start = mesh.get_local_rank() * chunk
    end = min(start + local.shape[0], rows.shape[0])
    if end > start:
        local = local.clone()
        local[: end - start] = rows[start:end].to(device=local.device, dtype=local.dtype)
    return DTensor.from_local(local, mesh, weight.placements, run_check=False, shape=weight.shape,
                              stride=weight.stride())


class FrozenPrefixEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose first ``keep`` rows never change during training.

    The forward reads rows ``< keep`` from ``frozen_rows``, a non-persistent snapshot of ``weight[:keep]``, so they
    get no gradient and nothing the optimiser does to ``weight[:keep]`` (decoupled weight decay) reaches the output.
    ``state_dict()`` writes the snapshot back, so a checkpoint holds one table under the usual key.

    The snapshot is taken lazily, at the first forward after the module was built, (re)initialised or loaded: the
    weight is the truth until then, so a model built from a config, initialised twice, or loaded by any path never
    uses stale rows. After editing ``weight`` by hand between forwards, call `sync_frozen_rows`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, keep: int):
        super().__init__(num_embeddings, embedding_dim)
        if not 0 <= keep < num_embeddings:
            raise ValueError(f"keep ({keep}) must be in [0, {num_embeddings})")
        self.keep = keep
        # Zeros until the first forward takes the snapshot (a buffer that depends on random weights could not be
        # rebuilt by `_init_weights` on a meta-device model).
        self.register_buffer("frozen_rows", torch.zeros(keep, embedding_dim), persistent=False)
        self._needs_sync = True
        self._register_state_dict_hook(FrozenPrefixEmbedding._merge_into_state_dict)
        self.register_load_state_dict_post_hook(FrozenPrefixEmbedding._after_load)

    def mark_stale(self) -> None:
        """Forget the snapshot: the next forward takes ``weight[:keep]`` again (after loading or re-initialising)."""
        self._needs_sync = True

    @torch.no_grad()
    def sync_frozen_rows(self) -> None:
        """Take ``weight[:keep]`` as the frozen rows now."""
        if self.weight.device.type == "meta":
            return
        # Outside inference mode: a snapshot first taken during evaluation must serve later training steps.
        with torch.inference_mode(False):
            rows = self.weight[: self.keep].detach()
            if self.frozen_rows.shape == rows.shape and self.frozen_rows.device == rows.device:
                self.frozen_rows.copy_(rows)
            else:
                self.frozen_rows = rows.clone()
        self._needs_sync = False

    def effective_weight(self) -> torch.Tensor:
        """The table the forward uses: frozen rows, then the trainable rows."""
        if not self.keep:
            return self.weight
        if self._needs_sync:
            self.sync_frozen_rows()
        return torch.cat([self.frozen_rows.to(self.weight.dtype), self.weight[self.keep :]], dim=0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.effective_weight())

    @staticmethod
    def _merge_into_state_dict(module, state_dict, prefix, local_metadata):
        key = prefix + "weight"
        if module.keep and key in state_dict and not module._needs_sync:
            weight = state_dict[key]
            if _is_row_sharded(weight):  # FSDP2: write the frozen rows into this process's rows of the table
                state_dict[key] = _with_leading_rows(weight, module.frozen_rows)
            else:
                state_dict[key] = torch.cat(
                    [module.frozen_rows.to(weight.dtype), weight[module.keep :].detach()], dim=0
                )
        return state_dict

    @staticmethod
    def _after_load(module, incompatible_keys):
        module.mark_stale()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen_rows={self.keep}"


# ---------------------------------------------------------------------------------------------- outputs
@dataclass
class CLIPVariantOutput(ModelOutput):
    """
    Base of every hf_longclip output. The first seven fields are stock [`CLIPOutput`]'s, in its order, so tuple
    positions agree with `CLIPModel`; a variant appends its loss terms and features after them.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`): the training loss.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of images (rows) and captions (columns).
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`): L2-normalised EOT embeddings.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`): L2-normalised CLS embeddings.
        text_model_output (`BaseModelOutputWithPooling`): the text tower's output (hidden states / attentions when
            asked for).
        vision_model_output (`BaseModelOutputWithPooling`): the image tower's output.

    Besides the fields, `loss_terms()` gives every loss term by name (what the trainer logs), and boolean masks that
    a variant returns live in attributes that are not outputs (listed in its docstring), so `to_tuple()` holds
    tensors of floats only.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    #: Further 0-d loss terms whose number depends on the config (e.g. Fix-CLIP's per-group terms); not outputs.
    extra_loss_terms: ClassVar[dict[str, torch.Tensor] | None] = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in (self[k] for k in self.keys()))

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """Every 0-d loss term by name (``loss`` included), fields first, then `extra_loss_terms`."""
        terms = {k: v for k, v in self.items() if k.startswith("loss") and isinstance(v, torch.Tensor) and v.dim() == 0}
        terms.update(self.extra_loss_terms or {})
        return terms


@dataclass
class LongCLIPOutput(CLIPVariantOutput):
    """
    Output of [`LongCLIPModel.forward`]: the fields of [`CLIPVariantOutput`], then

    Args:
        loss_long (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE between images and long captions.
        loss_short (`torch.FloatTensor` of shape `()`, *optional*): InfoNCE between the PCA reconstruction of the image
            features and the short captions; present when short captions were given.
        short_text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            L2-normalised short-caption embeddings.
    """

    loss_long: torch.FloatTensor | None = None
    loss_short: torch.FloatTensor | None = None
    short_text_embeds: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------- hand-run towers
def resolve_output_flags(tower_config, output_attentions, output_hidden_states) -> tuple[bool, Any]:
    """The flags a tower uses: the explicit values, else the tower config's (as transformers' towers do)."""
    if output_attentions is None:
        output_attentions = bool(getattr(tower_config, "output_attentions", False))
    if output_hidden_states is None:
        output_hidden_states = getattr(tower_config, "output_hidden_states", False)
    return output_attentions, output_hidden_states


class EncoderRecorder:
    """Hidden states and attention maps of a hand-run CLIP encoder loop, returned as transformers' towers return them.

    ``hidden_states`` is the input of the first layer followed by each layer's output (``num_layers + 1`` entries;
    with an index selection the unselected entries are None); ``attentions`` is each layer's attention map, recorded by
    hooks on the layers' ``self_attn`` while the context is open (the eager kernel returns them, SDPA gives None).
    """

    def __init__(self, layers: nn.ModuleList, output_attentions: bool, output_hidden_states: Any):
        self.layers = layers
        self.hidden_states: list | None = None
        self.selection: set[int] | None = None
        if output_hidden_states is not None and output_hidden_states is not False:
            self.hidden_states = []
            if not isinstance(output_hidden_states, bool):
                wanted = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
                count = len(layers) + 1
                self.selection = {i % count for i in wanted if -count <= i < count}
        self.attentions: list | None = [] if output_attentions else None
        self._handles: list = []

    def __enter__(self) -> EncoderRecorder:
        if self.attentions is not None:
            for layer in self.layers:
                self._handles.append(layer.self_attn.register_forward_hook(self._record_attention))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_attention(self, module, args, output) -> None:
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            self.attentions.append(output[1])

    def record(self, hidden: torch.Tensor) -> None:
        """Record one hidden state (call with the first layer's input, then after every layer)."""
        if self.hidden_states is not None:
            keep = self.selection is None or len(self.hidden_states) in self.selection
            self.hidden_states.append(hidden if keep else None)

    def outputs(self) -> dict[str, tuple | None]:
        return {
            "hidden_states": tuple(self.hidden_states) if self.hidden_states is not None else None,
            "attentions": tuple(self.attentions) if self.attentions else None,
        }


def _row_chunks(count: int, batch_size: int | None) -> list[slice]:
    """Slices of at most `batch_size` rows (default `ENCODE_BATCH_SIZE`) covering `count` rows."""
    size = ENCODE_BATCH_SIZE if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(start, start + size) for start in range(0, count, size)] or [slice(0, 0)]


def _clip_config_from(config: PreTrainedConfig) -> CLIPConfig:
    """A stock ``CLIPConfig`` with the same towers (and the stretched text length) as ``config``."""
    return CLIPConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init_value,
    )


def _variants_with_heads(prefixes: Sequence[str]) -> list[type]:
    """The loaded hf_longclip model classes whose heads include every one of `prefixes` (first per model_type)."""
    found: dict[str, type] = {}
    stack = list(LongCLIPModel.__subclasses__())
    while stack:
        candidate = stack.pop(0)
        stack.extend(candidate.__subclasses__())
        heads = set(getattr(candidate, "head_modules", ()))
        model_type = getattr(getattr(candidate, "config_class", None), "model_type", None)
        if heads and set(prefixes) <= heads and model_type and model_type not in found:
            found[model_type] = candidate
    return list(found.values())


def _is_family_config(config: dict) -> bool:
    """Whether a config dict belongs to an hf_longclip model (any variant): it records a stretch."""
    return all(field in config for field in STRETCH_FIELDS)


# ---------------------------------------------------------------------------------------------- model
class LongCLIPModel(CLIPModel):
    r"""
    CLIP with a 248-token text encoder (Long-CLIP, Zhang et al., ECCV 2024), and the base of every hf_longclip variant.

    The module layout and state-dict keys are transformers' [`CLIPModel`]; the text position table has
    `config.text_config.max_position_embeddings` rows (248 by default) and its first `config.position_keep` rows
    are frozen. `forward(..., return_loss=True)` computes Long-CLIP's loss: InfoNCE between images and long
    captions plus InfoNCE between the 32-component PCA reconstruction of the batch's image features and the short
    captions, both with label smoothing 0.1 (local loss under `torch.distributed`).

    What a variant changes (docs/adding_a_variant.md): `head_modules`, `loss_features` / `loss_from_features` /
    `forward`, and the training hooks `training_loss_kwargs`, `after_optimizer_step`, `ddp_find_unused_parameters`.

    Example:

    ```python
    >>> import torch
    >>> import hf_longclip  # registers the variants with the Auto classes
    >>> model = hf_longclip.LongCLIPModel.from_clip("openai/clip-vit-base-patch16")  # stretch a stock CLIP
    >>> processor = hf_longclip.LongCLIPProcessor.from_clip("openai/clip-vit-base-patch16")
    >>> inputs = processor(text=["a long caption ..."], return_tensors="pt")
    >>> with torch.inference_mode():
    ...     text_features = model.get_text_features(**inputs).pooler_output
    ```
    """

    config_class = LongCLIPConfig
    config: LongCLIPConfig
    #: Top-level attributes (modules or parameters) a variant adds to the stock CLIP layout: its heads. Everything else
    #: is the backbone (what a stock CLIP checkpoint holds and what the exports keep).
    head_modules: ClassVar[tuple[str, ...]] = ()
    #: Whether DDP must look for parameters without a gradient each step. False: every trainable parameter takes part
    #: in the default loss (a variant whose loss may skip one sets this, or makes the parameter untrainable).
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: Scoring modes of the retrieval interface; variants with fine-grained scores add theirs.
    retrieval_scorings: ClassVar[tuple[str, ...]] = ("global",)
    #: Config fields inherited from `LongCLIPConfig` that this variant's loss never reads (e.g. ``pca_components``,
    #: which only Long-CLIP's short-caption PCA term uses). The trainer refuses them for this variant and drops them
    #: from a recipe written for another variant (docs/training.md, Recipe keys per variant).
    unused_config_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: LongCLIPConfig):
        super().__init__(config)
        embeddings = self.text_model.embeddings
        old = embeddings.position_embedding
        keep = config.position_keep if config.freeze_kept_positions else 0
        frozen = FrozenPrefixEmbedding(old.num_embeddings, old.embedding_dim, keep)
        frozen.weight = old.weight  # keep the initialised parameter; only the forward changes
        frozen.frozen_rows = frozen.frozen_rows.to(device=old.weight.device, dtype=old.weight.dtype)
        embeddings.position_embedding = frozen
        # Same outputs as transformers' QuickGELU, a third fewer MLP activations kept for backward (activations.py).
        use_memory_efficient_activations(self)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # The text tower is a PreTrainedModel of its own, initialised by its own `_init_weights`, so its frozen-row
        # snapshot is reset here, when the root (visited after its children) is initialised.
        if isinstance(module, LongCLIPModel):
            embedding = module.text_model.embeddings.position_embedding
            if isinstance(embedding, FrozenPrefixEmbedding):
                init.zeros_(embedding.frozen_rows)
                embedding.mark_stale()

    # ------------------------------------------------------------------ heads and backbone
    @classmethod
    def is_head_parameter(cls, name: str) -> bool:
        """Whether a parameter (or state-dict key) belongs to the variant's heads rather than the CLIP backbone."""
        return name.split(".", 1)[0] in cls.head_modules

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The stock-CLIP part of the state dict (frozen rows merged into the one position table)."""
        return {k: v.detach() for k, v in self.state_dict().items() if not self.is_head_parameter(k)}

    def merge_frozen_rows(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the frozen position rows into `state_dict` (whole tensors, e.g. gathered by DeepSpeed ZeRO-3, which
        reads the parameters directly and so bypasses the `state_dict()` hook that does this); returns it."""
        for name, module in self.named_modules():
            if isinstance(module, FrozenPrefixEmbedding):
                FrozenPrefixEmbedding._merge_into_state_dict(module, state_dict, f"{name}." if name else "", None)
        return state_dict

    # ------------------------------------------------------------------ training hooks (the trainer calls these)
    def training_loss_kwargs(self, step: int, steps_per_epoch: int) -> dict[str, Any]:
        """Extra `loss_from_features` / `forward` arguments for optimiser step ``step`` (e.g. a loss warm-up)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called by the trainer after every optimiser step (e.g. to clamp a temperature). Default: nothing."""

    # ------------------------------------------------------------------ sharding hooks (FSDP2, DeepSpeed ZeRO-3)
    #: Methods besides `forward` that the trainer and the evaluation call on the whole model. Under FSDP2 each is
    #: registered as a forward method, so the root's parameters are gathered around it.
    sharded_entry_points: ClassVar[tuple[str, ...]] = (
        "loss_features", "loss_from_features", "retrieval_image_features", "retrieval_text_features",
        "retrieval_scores",
    )

    def sharding_units(self) -> list[nn.Module]:
        """The submodules FSDP2 shards as units of their own, children before parents: every instance of a
        `_no_split_modules` class (encoder layers, embeddings, head blocks) that has a ``forward``. A unit's parameters
        are gathered only while its ``forward`` runs; everything else (projections, ``logit_scale``, parameter-only
        heads) belongs to the root unit, gathered for a whole model call. A variant that reads a unit's parameters
        outside that unit's ``forward`` leaves the unit out here."""
        names = set(getattr(self, "_no_split_modules", None) or ())
        units = [
            module for module in self.modules()
            if module is not self and type(module).__name__ in names and type(module).forward is not nn.Module.forward
        ]
        return units[::-1]  # modules() is parents first

    def sharding_conflicts(self) -> list[str]:
        """Why this model, as configured, cannot train with parameters sharded per module (FSDP2, DeepSpeed ZeRO-3);
        empty when it can. Sharded training gathers a unit's parameters with a collective each time the unit runs,
        so every process must run the same units the same number of times in every step, whatever its data."""
        conflicts = []
        if self.ddp_find_unused_parameters:
            conflicts.append(
                f"{type(self).__name__} can leave trainable parameters without a gradient on some processes "
                "(ddp_find_unused_parameters)"
            )
        owners: dict[int, list[str]] = {}
        for name, parameter in self.named_parameters(remove_duplicate=False):
            owners.setdefault(id(parameter), []).append(name)
        units = {id(unit): unit for unit in self.sharding_units()}
        prefixes = [name for name, module in self.named_modules() if id(module) in units]

        def unit_of(name: str) -> str:
            found = [p for p in prefixes if name.startswith(p + ".")]
            return max(found, key=len) if found else "<root>"

        for names in owners.values():
            if len({unit_of(n) for n in names}) > 1:
                conflicts.append(f"parameter {names[0]} is shared with {', '.join(names[1:])} in another unit")
        return conflicts

    def enable_checkpointing(self, towers: str = "all", checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in the backward pass: of both towers (``towers="all"``, transformers' activation
        checkpointing) or of the text tower only (``"text"``: long captions and many query texts make text
        activations the bulk of training memory). Non-reentrant checkpointing unless `checkpointing_kwargs` say."""
        if towers not in ("all", "text"):
            raise ValueError(f"towers must be 'all' or 'text', got {towers!r}")
        kwargs = {"use_reentrant": False} if checkpointing_kwargs is None else checkpointing_kwargs
        if hasattr(self, "activation_checkpointing_enable"):  # transformers' current name; the old one warns
            self.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if towers == "text":
            for module in self.vision_model.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False

    def enable_text_gradient_checkpointing(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the text tower only (``enable_checkpointing("text", ...)``)."""
        self.enable_checkpointing("text", gradient_checkpointing_kwargs)

    # ------------------------------------------------------------------ features
    def check_text_inputs(
        self, input_ids: Any, attention_mask: torch.Tensor | None = None, *, values: bool | None = None,
        what: str = "input_ids",
    ) -> None:
        """`check_input_ids` against this model's vocabulary and end-of-text id (values read only on the CPU unless
        `values` says otherwise)."""
        text_config = self.config.text_config
        check_input_ids(
            input_ids, attention_mask, text_config.eos_token_id, text_config.vocab_size, values=values, what=what
        )

    def check_image_inputs(self, pixel_values: Any, *, values: bool | None = None, what: str = "pixel_values") -> None:
        """`check_pixel_values` against this model's image tower (values read only on the CPU unless `values`)."""
        check_pixel_values(pixel_values, self.config.vision_config.num_channels, values=values, what=what)

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        normalize: bool = True,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Projected pooled (EOT) text embeddings, L2-normalised unless ``normalize=False``.

        Rows go through the text tower `batch_size` at a time (default `ENCODE_BATCH_SIZE`, 256), so encoding
        thousands of captions does not hold all their attention maps at once; the result is the same.
        """
        self.check_text_inputs(input_ids, attention_mask)
        chunks = []
        for rows in _row_chunks(input_ids.shape[0], batch_size):
            mask = attention_mask[rows] if attention_mask is not None else None
            output = self.get_text_features(input_ids=input_ids[rows], attention_mask=mask, return_dict=True)
            chunks.append(output.pooler_output)
        features = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(
        self, pixel_values: torch.Tensor, normalize: bool = True, batch_size: int | None = None
    ) -> torch.Tensor:
        """Projected CLS image embeddings, L2-normalised unless ``normalize=False``; images go through the image
        tower `batch_size` at a time (default `ENCODE_BATCH_SIZE`)."""
        self.check_image_inputs(pixel_values)
        chunks = [
            self.get_image_features(pixel_values=pixel_values[rows], return_dict=True).pooler_output
            for rows in _row_chunks(pixel_values.shape[0], batch_size)
        ]
        features = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=0)
        return F.normalize(features, dim=-1) if normalize else features

    def get_text_token_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every text token after the final LayerNorm and the text projection: `(batch, seq_len, projection_dim)`."""
        self.check_text_inputs(input_ids, attention_mask)
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        return self.text_projection(hidden)

    def get_image_token_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every image token (CLS first) after the post-LayerNorm and the visual projection.

        transformers' ``last_hidden_state`` is taken *before* ``post_layernorm`` (only the pooled CLS is normalised),
        so the LayerNorm is applied here to all tokens. Shape `(batch, 1 + num_patches, projection_dim)`.
        """
        self.check_image_inputs(pixel_values)
        hidden = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(hidden))

    def can_pack_text(self) -> bool:
        """Whether the text tower's attention takes the block-diagonal mask of packed rows (eager or SDPA)."""
        attention = getattr(self.config.text_config, "_attn_implementation", None) or "eager"
        return attention in PACKABLE_ATTENTION

    def encode_packed_text_rows(
        self,
        groups: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
        capacity: int = DEFAULT_PACK_LENGTH,
    ) -> list[torch.Tensor]:
        """Pooled projected (EOT) embeddings of groups of right-padded token rows, all encoded in one packed call.

        Rows are packed end to end into text-tower rows of about `capacity` tokens (`hf_longclip.models.packing`):
        each keeps its own position ids, sees only its own earlier tokens and is pooled where transformers' tower
        pools it (its first end-of-text token; its largest id for legacy configs whose ``eos_token_id`` is 2), so the
        embeddings equal `get_text_features` on each row up to float rounding, while only real tokens are encoded.
        Needs `can_pack_text`.

        Args:
            groups: `(input_ids (n_i, L_i), attention_mask (n_i, L_i) or None)` pairs; without a mask a row ends at its
                first end-of-text token.
            capacity (`int`): tokens per packed row (raised to the longest row when smaller).

        Returns:
            one `torch.FloatTensor` of shape `(n_i, projection_dim)` per group, not normalised.
        """
        counts = [ids.shape[0] for ids, _ in groups]
        width = max((ids.shape[1] for ids, _ in groups), default=0)
        if sum(counts) == 0 or width == 0:
            return [self.text_projection.weight.new_zeros(n, self.config.projection_dim) for n in counts]
        eos = self.config.text_config.eos_token_id
        end_of_text = self.config.text_config.vocab_size - 1 if eos in (None, 2) else eos
        all_ids, all_lengths, all_pool = [], [], []
        for ids, att in groups:
            if att is not None:
                lengths = att.to(torch.long).sum(-1).clamp(min=1)
            else:
                is_eos = ids == end_of_text
                lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, ids.shape[1])
            lengths = lengths.clamp(max=ids.shape[1])
            pool = ids.argmax(-1) if eos in (None, 2) else (ids == eos).int().argmax(-1)
            all_ids.append(F.pad(ids, (0, width - ids.shape[1])))
            all_lengths.append(lengths)
            all_pool.append(torch.minimum(pool, lengths - 1))
        hidden = packed_text_hidden_states(
            self.text_model, torch.cat(all_ids), torch.cat(all_lengths), torch.cat(all_pool), capacity
        )
        return list(self.text_projection(hidden).split(counts))

    def text_eot_index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Position of each caption's end-of-text token: the last attended token of a right-padded row, or without a
        mask the first ``eos_token_id`` (the largest id for legacy configs whose ``eos_token_id`` is 2)."""
        if attention_mask is not None:
            return attention_mask.to(torch.long).sum(-1).clamp(min=1) - 1
        eos = self.config.text_config.eos_token_id
        if eos in (None, 2):
            return input_ids.argmax(-1)
        is_eos = input_ids == eos
        return torch.where(is_eos.any(-1), is_eos.to(torch.long).argmax(-1), input_ids.shape[1] - 1)

    @staticmethod
    def tower_kwargs(output_attentions: bool | None, output_hidden_states: Any) -> dict[str, Any]:
        """The output flags that were given, as keyword arguments for a transformers tower."""
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        return {k: v for k, v in flags.items() if v is not None}

    def _return(self, output: CLIPVariantOutput, return_dict: bool | None):
        """`output`, or its tuple when ``return_dict`` (else ``config.return_dict``) is False."""
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ retrieval scoring interface
    # Evaluation talks to every variant through these three methods: features are computed per batch, concatenated
    # along dim 0 by the caller, then scored. Variants with fine-grained scores override them.
    def _check_scoring(self, scoring: str) -> None:
        if scoring not in self.retrieval_scorings:
            raise ValueError(f"{type(self).__name__} supports scoring {self.retrieval_scorings}, not {scoring!r}")

    def retrieval_image_features(self, pixel_values: torch.Tensor, scoring: str = "global") -> dict[str, torch.Tensor]:
        """Per-image features needed by `retrieval_scores` (a dict of tensors with the images on dim 0)."""
        self._check_scoring(scoring)
        return {"image_embeds": self.encode_image(pixel_values)}  # encode_image checks the inputs

    def retrieval_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, scoring: str = "global"
    ) -> dict[str, torch.Tensor]:
        """Per-text features needed by `retrieval_scores` (a dict of tensors with the texts on dim 0)."""
        self._check_scoring(scoring)
        return {"text_embeds": self.encode_text(input_ids, attention_mask)}  # encode_text checks the inputs

    def retrieval_scores(
        self, image_features: dict[str, torch.Tensor], text_features: dict[str, torch.Tensor], scoring: str = "global"
    ) -> torch.Tensor:
        """Similarity matrix `(num_images, num_texts)`; higher is more similar."""
        self._check_scoring(scoring)
        return image_features["image_embeds"] @ text_features["text_embeds"].t()

    # ------------------------------------------------------------------ training forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
    ) -> LongCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, seq_len)`): long-caption token ids (<= 248).
            pixel_values (`torch.FloatTensor` of shape `(image_batch_size, 3, H, W)`): images.
            attention_mask (`torch.Tensor`, *optional*): padding mask of `input_ids`.
            short_input_ids (`torch.LongTensor` of shape `(batch_size, short_len)`, *optional*):
                short-caption ids, encoded at their own length. Needed for the short-caption loss term.
            short_attention_mask (`torch.Tensor`, *optional*): padding mask of `short_input_ids`.
            return_loss (`bool`, *optional*): compute Long-CLIP's loss (image `i` is paired with caption `i`).
            output_attentions, output_hidden_states (*optional*): passed to both towers (their
                `text_model_output` / `vision_model_output` then hold them).
            return_dict (`bool`, *optional*): a tuple when False (default `config.return_dict`).

        Returns:
            [`LongCLIPOutput`]
        """
        features = self.loss_features(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            short_input_ids=short_input_ids,
            short_attention_mask=short_attention_mask,
            position_ids=position_ids,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            keep_outputs=True,
        )
        return self._return(self.loss_from_features(features, return_loss=bool(return_loss)), return_dict)

    # ------------------------------------------------------------------ two-stage training interface
    # `forward` = `loss_from_features(loss_features(...))`. The split lets the trainer cache the features of many
    # micro-batches and compute one loss over all of them (hf_longclip.training.accumulation): `loss_features` works
    # per sample (samples on dim 0), `loss_from_features` is where samples meet.
    def loss_features(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        short_input_ids: torch.LongTensor | None = None,
        short_attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        keep_outputs: bool = False,
    ) -> dict[str, Any]:
        """Per-sample features the loss needs: normalised ``image_embeds``, ``text_embeds`` and (when short captions
        are given) ``short_text_embeds``, each `(batch, projection_dim)`. With `keep_outputs` the towers' outputs
        are included too (``vision_model_output``, ``text_model_output``)."""
        self._require_inputs(input_ids, pixel_values, attention_mask)
        towers = self.tower_kwargs(output_attentions, output_hidden_states)
        vision_outputs = self.get_image_features(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **towers
        )
        text_outputs = self.get_text_features(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **towers
        )
        features: dict[str, Any] = {
            "image_embeds": F.normalize(vision_outputs.pooler_output, dim=-1),
            "text_embeds": F.normalize(text_outputs.pooler_output, dim=-1),
        }
        if short_input_ids is not None:
            features["short_text_embeds"] = self.encode_text(short_input_ids, short_attention_mask)
        if keep_outputs:
            features.update(vision_model_output=vision_outputs, text_model_output=text_outputs)
        return features

    def loss_from_features(self, features: dict[str, Any], return_loss: bool = True) -> LongCLIPOutput:
        """Logits and (with `return_loss`) Long-CLIP's loss from `loss_features` output (possibly concatenated
        over micro-batches)."""
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        short_embeds = features.get("short_text_embeds")
        loss = loss_long = loss_short = None
        if return_loss:
            self._require_pairs(image_embeds, text_embeds)
            cfg = self.config
            loss_long = local_contrastive_loss(image_embeds, text_embeds, self.logit_scale, cfg.label_smoothing)
            loss = cfg.long_loss_weight * loss_long
            if short_embeds is not None:
                image_primary = self._primary_components(image_embeds)
                loss_short = local_contrastive_loss(image_primary, short_embeds, self.logit_scale, cfg.label_smoothing)
                loss = loss + cfg.short_loss_weight * loss_short
        return LongCLIPOutput(
            loss=loss,
            **self.clip_outputs(features),
            loss_long=loss_long,
            loss_short=loss_short,
            short_text_embeds=short_embeds,
        )

    def clip_outputs(self, features: dict[str, Any]) -> dict[str, Any]:
        """The stock CLIP output fields (logits, embeddings, tower outputs) from loss features."""
        image_embeds, text_embeds = features["image_embeds"], features["text_embeds"]
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        return {
            "logits_per_image": logits_per_text.t(),
            "logits_per_text": logits_per_text,
            "text_embeds": text_embeds,
            "image_embeds": image_embeds,
            "text_model_output": features.get("text_model_output"),
            "vision_model_output": features.get("vision_model_output"),
        }

    def _require_inputs(self, input_ids, pixel_values, attention_mask: torch.Tensor | None = None) -> None:
        """The training forward's input checks: both inputs given, shapes and dtypes (free), and on CPU tensors the
        values too (`check_input_ids`, `check_pixel_values`); CUDA inputs are not read (no synchronisation)."""
        if input_ids is None or pixel_values is None:
            raise ValueError(f"{type(self).__name__}.forward needs both input_ids and pixel_values")
        limit = self.config.text_config.max_position_embeddings
        if getattr(input_ids, "dim", lambda: 0)() == 2 and input_ids.shape[-1] > limit:
            raise ValueError(
                f"captions have {input_ids.shape[-1]} tokens but the text encoder reads at most {limit}; "
                "tokenise with truncation"
            )
        self.check_text_inputs(input_ids, attention_mask)
        self.check_image_inputs(pixel_values)

    @staticmethod
    def _require_pairs(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        if image_embeds.shape[0] != text_embeds.shape[0]:
            raise ValueError(
                f"the loss pairs image i with caption i: got {image_embeds.shape[0]} images and "
                f"{text_embeds.shape[0]} captions"
            )

    def _primary_components(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """PCA reconstruction of the image features for the short-caption term (not re-normalised).

        ``pca_scope="local"`` (the authors'): over this process's batch. ``"global"``: over the batch of all
        processes (gathered with gradient), so the loss no longer depends on how the batch is split.
        """
        components = self.config.pca_components
        if self.config.pca_scope == "global":
            gathered, offset = gather_with_grad(image_embeds)
            if gathered.shape[0] != image_embeds.shape[0]:
                return pca_reconstruct(gathered, components)[offset : offset + image_embeds.shape[0]]
        return pca_reconstruct(image_embeds, components)

    # ------------------------------------------------------------------ construction
    @classmethod
    def variant_config_fields(cls) -> frozenset[str]:
        """Config fields a caller may set through `from_clip` (everything but the towers and the stretch)."""
        own = set(cls.config_class.__dataclass_fields__) - set(PreTrainedConfig.__dataclass_fields__)
        return frozenset(own - {"text_config", "vision_config", "projection_dim", *STRETCH_FIELDS})

    @classmethod
    def config_fields_in_use(cls) -> frozenset[str]:
        """`variant_config_fields` that this variant reads (all but `unused_config_fields`)."""
        return cls.variant_config_fields() - cls.unused_config_fields

    @classmethod
    def config_from_clip(cls, clip_config: PreTrainedConfig, **fields) -> LongCLIPConfig:
        """A config of this variant with the towers of `clip_config` (a stock `CLIPConfig`, stretched here, or an
        hf_longclip config, whose stretch is kept); `fields` set the variant's own fields and the stretch geometry
        (``position_keep``, ``position_ratio``) of a stock source."""
        unknown = set(fields) - cls.variant_config_fields() - {"position_keep", "position_ratio"}
        if unknown:
            raise TypeError(f"{cls.config_class.__name__} has no fields {sorted(unknown)}")
        text = clip_config.text_config.to_dict()
        if isinstance(clip_config, LongCLIPConfig):
            for name in ("position_keep", "position_ratio"):
                if name in fields and fields[name] != getattr(clip_config, name):
                    raise ValueError(
                        f"the source is already stretched with {name}={getattr(clip_config, name)}; "
                        f"it cannot be re-stretched with {fields[name]}"
                    )
                fields.pop(name, None)
            geometry = {name: getattr(clip_config, name) for name in (*STRETCH_FIELDS, "freeze_kept_positions")}
            geometry.update({k: fields.pop(k) for k in list(fields) if k == "freeze_kept_positions"})
        else:
            source_rows = text["max_position_embeddings"]
            keep, ratio = fields.pop("position_keep", 20), fields.pop("position_ratio", 4)
            validate_stretch(source_rows, keep, ratio)
            text["max_position_embeddings"] = keep + ratio * (source_rows - keep)
            geometry = {"source_max_position_embeddings": source_rows, "position_keep": keep, "position_ratio": ratio}
        fields.setdefault("logit_scale_init_value", clip_config.logit_scale_init_value)
        return cls.config_class(
            text_config=text,
            vision_config=clip_config.vision_config.to_dict(),
            projection_dim=clip_config.projection_dim,
            **geometry,
            **fields,
        )

    @classmethod
    def from_clip(
        cls,
        clip: str | os.PathLike | CLIPModel,
        position_keep: int | None = None,
        position_ratio: int | None = None,
        reset_logit_scale: bool | None = None,
        **kwargs,
    ) -> LongCLIPModel:
        """Build this variant from a stock CLIP by stretching its text position table, with fresh heads.

        Args:
            clip: a Hub id (e.g. ``"openai/clip-vit-base-patch16"``), a local folder, or a loaded `CLIPModel`. A saved
                model of this variant is loaded as it is; another hf_longclip model (e.g. a trained Long-CLIP) gives
                its backbone, already stretched, and this variant's heads are added fresh.
            position_keep, position_ratio: the stretch geometry of a stock source (default 20 and 4: 77 -> 248 rows).
            reset_logit_scale: set ``logit_scale`` to 4.6052 (ln 100 rounded), as Long-CLIP's and FineLIP's training
                code does before fine-tuning (their recipes ask for it). Default: keep the source's value, as the
                authors of beta-CLIP do (OpenAI's CLIPs already hold 4.6052).
            kwargs: this variant's config fields (loss weights, head sizes, ...), and loading options: ``dtype``,
                ``attn_implementation``, ``device_map`` (a single device) for any source; ``revision``, ``cache_dir``,
                ``token``, ``local_files_only``, ... for a Hub id or folder. Anything else raises `TypeError`.
        """
        loading = {k: kwargs.pop(k) for k in list(kwargs) if k in LOADING_KWARGS}
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.variant_config_fields()}
        if kwargs:
            raise TypeError(
                f"{cls.__name__}.from_clip() got unexpected keyword arguments {sorted(kwargs)}: neither loading "
                f"options ({', '.join(sorted(LOADING_KWARGS))}) nor {cls.config_class.__name__} fields"
            )
        for name, value in (("position_keep", position_keep), ("position_ratio", position_ratio)):
            if value is not None:
                fields[name] = value
        if isinstance(clip, (str, os.PathLike)):
            hub = {k: v for k, v in loading.items() if k in HUB_KWARGS - {"trust_remote_code"}}
            config_dict, _ = PreTrainedConfig.get_config_dict(clip, **hub)
            model_type = config_dict.get("model_type")
            if model_type == cls.config_class.model_type:
                for name in ("position_keep", "position_ratio"):
                    if name in fields and fields.pop(name) != config_dict.get(name):
                        raise ValueError(f"{clip!r} is already stretched with {name}={config_dict.get(name)}")
                return cls.from_pretrained(clip, **loading, **fields)
            if _is_family_config(config_dict):
                source = AutoModel.from_pretrained(clip, **loading)
            elif model_type == "clip":
                source = CLIPModel.from_pretrained(clip, config=CLIPConfig.from_dict(config_dict), **loading)
            else:
                raise ValueError(
                    f"{clip!r} is a {model_type!r} model; from_clip needs a stock CLIP (model_type 'clip') or an "
                    "hf_longclip model"
                )
            dtype = attn = device = None  # applied to the source by from_pretrained; the model follows it
        else:
            misplaced = sorted(set(loading) - {"dtype", "attn_implementation", "device_map"})
            if misplaced:
                raise TypeError(f"from_clip got {misplaced} with a model object; they apply to a Hub id or folder")
            if not isinstance(clip, CLIPModel):
                raise TypeError(f"from_clip expects a CLIPModel, a Hub id or a folder, got {type(clip).__name__}")
            source, dtype, attn = clip, loading.get("dtype"), loading.get("attn_implementation")
            if isinstance(dtype, str):
                dtype = None if dtype == "auto" else getattr(torch, dtype)
            device = torch.device(loading["device_map"]) if loading.get("device_map") is not None else None
        devices = {p.device for p in source.parameters()}
        if len(devices) > 1:
            raise ValueError(
                f"the source model is spread over {sorted(map(str, devices))}; from_clip builds the model on one "
                "device (load the source without a multi-device device_map and dispatch afterwards)"
            )
        model = cls._from_source_model(source, fields, reset_logit_scale, attn)
        model = model.to(device=device or devices.pop(), dtype=dtype or next(source.parameters()).dtype)
        return model.eval()

    @classmethod
    def _from_source_model(
        cls, source: CLIPModel, fields: dict[str, Any], reset_logit_scale: bool | None, attn: str | None
    ) -> LongCLIPModel:
        """This variant built around the weights of `source` (a stock CLIP is stretched; an hf_longclip model is not)."""
        family = isinstance(source, LongCLIPModel)
        reset = bool(reset_logit_scale)
        if reset:
            fields = {**fields, "logit_scale_init_value": LONGCLIP_LOGIT_SCALE}
        config = cls.config_from_clip(source.config, **fields)
        if family:
            state = source.backbone_state_dict()
        else:
            state = {k: v.detach() for k, v in source.state_dict().items()}
            state[TEXT_POSITION_KEY] = stretch_position_embeddings(
                state[TEXT_POSITION_KEY],
                config.position_keep,
                config.position_ratio,
                config.text_config.max_position_embeddings,
            )
        config.name_or_path = source.config.name_or_path
        model = cls(config)
        missing, unexpected = model.load_state_dict({k: v.to("cpu") for k, v in state.items()}, strict=False)
        stray = [key for key in missing if not cls.is_head_parameter(key)]
        if unexpected or stray:
            raise RuntimeError(f"the source's weights do not fit {cls.__name__}: unexpected {unexpected}, missing {stray}")
        if reset:
            with torch.no_grad():
                model.logit_scale.fill_(LONGCLIP_LOGIT_SCALE)
        implementation = attn or getattr(source.config, "_attn_implementation", None)
        if implementation:
            model.set_attn_implementation(implementation)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved model of this variant; a stock CLIP checkpoint (model_type ``clip``) is stretched through
        `from_clip` with the same loading options.

        A damaged or mislabelled checkpoint is refused with a `ValueError` naming the problem instead of loading
        quietly wrong: a ``config.json`` without ``text_config`` / ``vision_config`` or ``text_config.eos_token_id``
        (`check_saved_config`), head weights of another variant (its ``model_type`` names the wrong variant), or
        missing head weights of this one (they would be random).
        """
        where = "" if pretrained_model_name_or_path is None else f" at {os.fspath(pretrained_model_name_or_path)!r}"
        config = kwargs.get("config")
        # AutoModel passes the config it has just read from the same file (named after it); a config object of the
        # caller's own making is used as given.
        from_file = config is None or (
            isinstance(config, PreTrainedConfig)
            and pretrained_model_name_or_path is not None
            and getattr(config, "name_or_path", None) == str(pretrained_model_name_or_path)
        )
        if pretrained_model_name_or_path is not None and not args and from_file:
            hub = {k: kwargs[k] for k in HUB_KWARGS - {"trust_remote_code"} if k in kwargs}
            try:
                config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)
            except (OSError, ValueError):
                config_dict = {}
            if config is None and config_dict.get("model_type") == "clip":
                return cls.from_clip(pretrained_model_name_or_path, **kwargs)
            if _is_family_config(config_dict) or config_dict.get("model_type") == cls.config_class.model_type:
                for note in check_saved_config(config_dict, f"the config.json{where}", config):
                    warnings.warn(note, UserWarning, stacklevel=2)
        # Load with mismatches allowed so that a wrong position table gets an error naming both sizes
        # (transformers' own error only points at a log report); other mismatches still raise unless asked.
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        type(model)._check_head_keys(info.get("missing_keys", ()), info.get("unexpected_keys", ()), where)
        mismatched = list(info.get("mismatched_keys", []))
        for key, checkpoint_shape, model_shape in mismatched:
            if key.endswith(TEXT_POSITION_KEY):
                if tuple(checkpoint_shape)[0] == tuple(model_shape)[0]:
                    raise ValueError(
                        f"the checkpoint's text position table is {tuple(checkpoint_shape)} but this configuration's "
                        f"is {tuple(model_shape)}: text_config.hidden_size does not match the checkpoint's text tower"
                    )
                raise ValueError(
                    f"the checkpoint's text position table has {checkpoint_shape[0]} rows, but this configuration "
                    f"expects {model_shape[0]} (stretched from {model.config.source_max_position_embeddings} with "
                    f"keep={model.config.position_keep}, ratio={model.config.position_ratio}); a stock "
                    f"{model.config.source_max_position_embeddings}-row CLIP is stretched with LongCLIPModel.from_clip"
                )
        if mismatched and not allow_mismatch:
            details = ", ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched)
            raise ValueError(f"checkpoint shapes do not match the configuration: {details}")
        for module in model.modules():
            if isinstance(module, FrozenPrefixEmbedding):
                module.mark_stale()
        return (model, info) if want_info else model

    @classmethod
    def _check_head_keys(cls, missing_keys, unexpected_keys, where: str = "") -> None:
        """Refuse a checkpoint whose head weights are another variant's, or a full backbone without this variant's
        heads: the signature of a ``config.json`` naming the wrong variant, where transformers would leave this
        variant's heads random and drop the other's with only a load report.

        Unexpected keys of no known variant, and missing heads of a checkpoint that lacks backbone weights too (a
        damaged or partial file), keep transformers' own handling (its load report), plus a `UserWarning` for the
        missing heads, as stock `CLIPModel` does for missing weights.
        """
        own_type = cls.config_class.model_type
        foreign = sorted(
            k for k in unexpected_keys if k.split(".", 1)[0] not in BACKBONE_MODULES and not cls.is_head_parameter(k)
        )
        owners = _variants_with_heads(sorted({k.split(".", 1)[0] for k in foreign})) if foreign else []
        missing = sorted(k for k in missing_keys if cls.is_head_parameter(k))
        backbone_missing = any(k.split(".", 1)[0] in BACKBONE_MODULES for k in missing_keys)
        lines = []
        if owners:
            prefixes = sorted({k.split(".", 1)[0] for k in foreign})
            names = " / ".join(f"{c.__name__} (model_type {c.config_class.model_type!r})" for c in owners)
            lines.append(
                f"the checkpoint{where} holds {len(foreign)} weights of modules {cls.__name__} does not have "
                f"({', '.join(prefixes)}): the heads of {names}, but its config.json says model_type {own_type!r}; "
                f"set model_type to {owners[0].config_class.model_type!r} in its config.json (or load it with "
                f"{owners[0].__name__})"
            )
        if missing:
            prefixes = sorted({k.split(".", 1)[0] for k in missing})
            message = (
                f"the checkpoint{where} lacks {len(missing)} head weights of {cls.__name__} (model_type {own_type!r}: "
                f"{', '.join(prefixes)}), which would be left randomly initialised"
            )
            if backbone_missing and not lines:
                warnings.warn(message + " (its backbone weights are incomplete too)", UserWarning, stacklevel=3)
            else:
                lines.append(
                    message + ". If it is a checkpoint of another variant (a Long-CLIP checkpoint has no heads), fix "
                    f"model_type in its config.json; to put fresh heads on a trained backbone on purpose, load it as "
                    f"what it is and call {cls.__name__}.from_clip(model)"
                )
        if lines:
            raise ValueError("; ".join(lines))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`; a model registered for remote code also maps the zero-shot
        image-classification Auto class in ``auto_map``, so ``pipeline("zero-shot-image-classification", model=folder,
        trust_remote_code=True)`` works where hf_longclip is not installed."""
        if getattr(self, "_auto_class", None) is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModelForZeroShotImageClassification", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------ export
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The CLIP-keyed state dict with the frozen rows merged into the single position table."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def to_clip_model(self) -> CLIPModel:
        """A stock transformers `CLIPModel` (248 text positions) with this model's weights and outputs."""
        clip = CLIPModel(_clip_config_from(self.config)).to(dtype=self.dtype)
        clip.load_state_dict(self.backbone_state_dict(), strict=True)
        return clip.eval()

    def to_text_model(self, with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
        """A stock `CLIPTextModel` (or `CLIPTextModelWithProjection`) with 248 positions, e.g. for diffusers."""
        text_config = CLIPTextConfig(**{**self.config.text_config.to_dict(), "projection_dim": self.config.projection_dim})
        state = {k: v for k, v in self.backbone_state_dict().items() if k.startswith("text_model.")}
        if with_projection:
            model = CLIPTextModelWithProjection(text_config)
            state["text_projection.weight"] = self.text_projection.weight.detach()
        else:  # CLIPTextModel holds the text tower at its root, without the `text_model.` prefix
            model = CLIPTextModel(text_config)
            state = {k[len("text_model.") :]: v for k, v in state.items()}
        model = model.to(dtype=self.dtype)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def to_vision_model(self) -> CLIPVisionModel:
        """A stock `CLIPVisionModel` with this model's image tower."""
        model = CLIPVisionModel(self.config.vision_config).to(dtype=self.dtype)
        state = {
            k[len("vision_model.") :]: v for k, v in self.backbone_state_dict().items() if k.startswith("vision_model.")
        }
        model.load_state_dict(state, strict=True)
        return model.eval()


__all__ = [
    "BACKBONE_MODULES",
    "ENCODE_BATCH_SIZE",
    "CLIPVariantOutput",
    "EncoderRecorder",
    "FrozenPrefixEmbedding",
    "LongCLIPModel",
    "LongCLIPOutput",
    "check_input_ids",
    "check_pixel_values",
    "end_token_id",
    "stretch_position_embeddings",
    "TEXT_POSITION_KEY",
]
