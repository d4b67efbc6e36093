"""Sharded data parallelism: FSDP2 (``fully_shard``) units taken from the model, sharded checkpoints that load
without unpickling anything, and the consolidated final weights.

Which engine a run uses comes from accelerate's configuration (`sharding_engine`); on CPUs, where accelerate ignores
FSDP, the trainer applies the same wrapping itself. See docs/training.md (Scaling out).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Folder of a checkpoint holding the sharded model and optimizer state (safetensors, one file per process).
SHARDED_STATE_DIR = "sharded_state"
_FORMAT_FILE = "format.json"
_FORMAT = "hf_longclip-fsdp2-dcp-safetensors-v1"
_MODEL, _OPTIMIZER = "model.", "optimizer."

#: Engines `sharding_engine` names.
DDP, FSDP2_ACCELERATE, FSDP2_TRAINER, DEEPSPEED = "ddp", "fsdp2", "fsdp2-trainer", "deepspeed"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def sharding_engine(accelerator) -> str:
    """How the model's state is distributed in this run, from accelerate's configuration:

    * ``"fsdp2"``: accelerate runs FSDP (``distributed_type: FSDP``, GPUs); it must be ``fsdp_version: 2``.
    * ``"fsdp2-trainer"``: FSDP was configured (``ACCELERATE_USE_FSDP``, what ``accelerate launch`` sets from an FSDP
      config) but accelerate joined the processes as CPU processes, where it ignores FSDP: the trainer shards with
      ``fully_shard`` itself, the same units as on GPUs.
    * ``"deepspeed"``: accelerate runs DeepSpeed (ZeRO stage from its config).
    * ``"ddp"``: anything else (one process, or replicated data parallelism).

    Raises `ValueError` for FSDP version 1, which this trainer does not support.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return DEEPSPEED
    if kind == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(_fsdp1_message(version))
        return FSDP2_ACCELERATE
    if _env_flag("ACCELERATE_USE_FSDP"):
        version = int(os.environ.get("FSDP_VERSION", "1") or 1)
        if version != 2:
            raise ValueError(_fsdp1_message(version))
        if accelerator.num_processes > 1:
            return FSDP2_TRAINER
        logger.info("FSDP configured for one process: nothing to shard, training unsharded")
    return DDP


def deepspeed_configured() -> bool:
    """Whether accelerate's configuration asks for DeepSpeed (``ACCELERATE_USE_DEEPSPEED``)."""
    return _env_flag("ACCELERATE_USE_DEEPSPEED")


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of the run (0 without DeepSpeed)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def check_deepspeed(accelerator, save_final_model: bool) -> None:
    """Refuse, before any work, a DeepSpeed configuration whose end would fail: ZeRO-3 can only hand the final
    weights to ``save_pretrained`` when it gathers them (``zero3_save_16bit_model: true`` in the accelerate config,
    ``stage3_gather_16bit_weights_on_model_save`` in a DeepSpeed JSON)."""
    if zero_stage(accelerator) != 3 or not save_final_model:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if not config.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions the weights, and this configuration does not gather them for the final "
            "save_pretrained: set zero3_save_16bit_model: true under deepspeed_config in the accelerate config (or "
            "stage3_gather_16bit_weights_on_model_save: true in a DeepSpeed JSON), or --save_final_model false"
        )


def fill_deepspeed_config(accelerator, per_device_batch_size: int, max_grad_norm: float) -> None:
    """Fill what a DeepSpeed configuration leaves ``auto`` from the trainer's settings: the per-device batch (the
    trainer batches with its own sampler, so accelerate cannot read it from a prepared data loader) and the gradient
    clipping (DeepSpeed clips inside its engine, in place of the trainer's ``max_grad_norm``)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = per_device_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(config["gradient_clipping"]) != float(max_grad_norm):
        logger.warning("DeepSpeed clips gradients at %s (its configuration), not at max_grad_norm %s",
                       config["gradient_clipping"], max_grad_norm)


def _fsdp1_message(version) -> str:
    return (
        f"FSDP version {version} is configured; hf_longclip trains with FSDP2 only: set fsdp_version: 2 in the "
        "accelerate config (or --fsdp_version 2 / FSDP_VERSION=2)"
    )


def check_shardable(model) -> None:
    """A `ValueError` listing the model's `sharding_conflicts` (with the engines that do work), before any work."""
    conflicts = model.sharding_conflicts()
    if conflicts:
        raise ValueError(
            f"{type(model).__name__} cannot train with per-module sharded parameters (FSDP2, DeepSpeed ZeRO-3): "
            + "; ".join(conflicts)
            + ". Train it with DDP (accelerate's MULTI_GPU / multi-CPU) or DeepSpeed ZeRO-2 instead "
            "(docs/training.md, Scaling out)"
        )


# ----------------------------------------------------------------------------------------------- wrapping
class ShardedModel:
    """What the trainer needs from an FSDP2-sharded model beyond FSDP itself.

    FSDP2 cannot shard 0-dim parameters (every CLIP's ``logit_scale``, Fix-CLIP's extra temperatures), so
    `shard_model` leaves them out of FSDP (``ignored_params``): each process keeps a full copy, and their gradients
    are averaged here (`sync_replicated_gradients`), as DDP would, before the optimiser step.
    """

    def __init__(self, model, replicated: list[torch.nn.Parameter]):
        self.model = model
        self.replicated = replicated

    def sync_replicated_gradients(self) -> None:
        """Average the gradients of the replicated (unsharded) parameters over the processes."""
        from .accumulation import average_gradients

        average_gradients(self.replicated, torch.distributed.get_world_size())

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale every gradient so that the global 2-norm (sharded and replicated parameters together) is at most
        `max_norm`; returns the norm before clipping. (torch's `clip_grad_norm_` cannot mix DTensor and plain
        gradients.)"""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        sharded = [g.to_local() for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        device = (sharded or plain)[0].device if grads else torch.device("cpu")
        local = torch.zeros((), dtype=torch.float64, device=device)
        for g in sharded:
            local += g.detach().double().pow(2).sum()
        torch.distributed.all_reduce(local)  # shards are disjoint: their squares add up
        for g in plain:  # replicated: the same on every process, counted once
            local += g.detach().double().pow(2).sum()
        total = local.sqrt()
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in sharded + plain:
            g.mul_(coefficient.to(g.dtype))
        return total.float()


def shard_model(model, device: torch.device, mesh=None, reshard_after_forward: bool = True, mp_policy=None,
                offload_policy=None) -> ShardedModel:
    """Apply FSDP2 to `model` in place: each of ``model.sharding_units()`` becomes a unit, then the root; the
    model's ``sharded_entry_points`` become forward methods. Needs an initialised process group.

    Every process builds the model the same way (same seed) before this call, so the shards it keeps are the same
    weights a single process would hold.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    check_shardable(model)
    if mesh is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    model.to(device)
    replicated = [p for p in model.parameters() if p.dim() == 0]
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
               "offload_policy": offload_policy or OffloadPolicy(), "ignored_params": set(replicated)}
    units = model.sharding_units()  # before fully_shard renames their classes (FSDP<name>)
    for unit in units:
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)  # the root keeps its parameters gathered from forward to backward (torch's default)
    # A parameter without a gradient in one step (a branch some steps skip) still takes part in the reduction, so
    # every process reduces the same tensors.
    model.set_reduce_scatter_unused_params(True)
    for name in model.sharded_entry_points:
        register_fsdp_forward_method(model, name)
    # Gather once now, outside any inference mode: FSDP2 creates the gathered parameters it keeps reusing at the
    # first gather, and if that were an evaluation under torch.inference_mode (evaluation before training) they
    # would be inference tensors, which no later training step could write into.
    for module in (model, *units):
        module.unshard()
    for module in (*units, model):
        module.reshard()
    return ShardedModel(model, [p for p in replicated if p.requires_grad])


def fsdp2_options_from_accelerate(accelerator) -> dict[str, Any]:
    """`shard_model` options from accelerate's FSDP plugin (GPU runs), or the defaults (the trainer's CPU path)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return {"reshard_after_forward": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"}
    options: dict[str, Any] = {"reshard_after_forward": bool(plugin.reshard_after_forward)}
    if getattr(plugin, "mixed_precision_policy", None) is not None:
        options["mp_policy"] = plugin.mixed_precision_policy
    from torch.distributed.fsdp import OffloadPolicy

    if isinstance(getattr(plugin, "cpu_offload", None), OffloadPolicy):
        options["offload_policy"] = plugin.cpu_offload
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and getattr(accelerator, "parallelism_config", None) is not None:
        options["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return options


def is_sharded(model) -> bool:
    """Whether `model` carries FSDP2 units."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------------------------- state
def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU in the main process, ``{}`` elsewhere; every process must call this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items()} if torch.distributed.get_rank() == 0 else {}


def _raw_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _tensor_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Every tensor of the model and optimizer state (sharded ones as DTensors) under one flat namespace, the
    optimizer's flat state dict and its options."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    tensors = {_MODEL + k: v for k, v in get_model_state_dict(model).items()}
    optim_state = get_optimizer_state_dict(model, _raw_optimizer(optimizer), options=options)
    tensors.update({_OPTIMIZER + k: v for k, v in optim_state.items() if isinstance(v, torch.Tensor)})
    return tensors, optim_state, options


def save_sharded_state(model, optimizer, folder: str | os.PathLike) -> None:
    """Write the sharded model and optimizer state of every process into ``folder/sharded_state`` (every process
    must call this): torch.distributed.checkpoint with its safetensors storage, one file per process, each tensor's
    place in the whole recorded in the file's JSON header. The optimizer's non-tensor settings are not stored: a
    resumed run rebuilds them from its (identical, fingerprinted) settings and the learning rate from the step."""
    import torch.distributed.checkpoint as dcp

    target = Path(folder) / SHARDED_STATE_DIR
    tensors, _, _ = _tensor_state(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(target), save_distributed=True))
    if torch.distributed.get_rank() == 0:
        info = {"format": _FORMAT, "num_processes": torch.distributed.get_world_size(), "tensors": len(tensors)}
        (target / _FORMAT_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


def has_sharded_state(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SHARDED_STATE_DIR / _FORMAT_FILE).is_file()


def load_sharded_state(model, optimizer, folder: str | os.PathLike) -> None:
    """Load what `save_sharded_state` wrote into the sharded `model` and `optimizer` (every process must call this).

    Only safetensors files and JSON are read (``HuggingFaceStorageReader`` builds the checkpoint's layout from the
    safetensors headers; nothing is unpickled). A checkpoint saved by another number of processes loads too (DCP
    reshards), though the trainer's run fingerprint refuses that change before this is called.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    source = Path(folder) / SHARDED_STATE_DIR
    info_file = source / _FORMAT_FILE
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{source} is not a sharded training state: {error}") from None
    if info.get("format") != _FORMAT:
        raise ValueError(f"{info_file}: unknown format {info.get('format')!r} (expected {_FORMAT!r})")
    tensors, optim_state, options = _tensor_state(model, optimizer)
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(source)))
    set_model_state_dict(model, {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)})
    optim_state.update({k[len(_OPTIMIZER):]: v for k, v in tensors.items() if k.startswith(_OPTIMIZER)})
    set_optimizer_state_dict(model, _raw_optimizer(optimizer), optim_state, options=options)


__all__ = [
    "DDP",
    "DEEPSPEED",
    "FSDP2_ACCELERATE",
    "FSDP2_TRAINER",
    "SHARDED_STATE_DIR",
    "ShardedModel",
    "check_deepspeed",
    "check_shardable",
    "deepspeed_configured",
    "fill_deepspeed_config",
    "fsdp2_options_from_accelerate",
    "full_state_dict",
    "has_sharded_state",
    "is_sharded",
    "load_sharded_state",
    "save_sharded_state",
    "shard_model",
    "sharding_engine",
    "zero_stage",
]
