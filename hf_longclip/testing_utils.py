"""Tiny models and processors built from configs, for tests, benchmarks and offline demos (no Hub access)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from .data.tokenizer import build_clip_tokenizer
from .models.processing_longclip import LongCLIPProcessor

#: Words the tiny tokenizer knows as whole tokens (others fall back to byte-level pieces).
DEFAULT_WORDS = (
    "a an the image shows photo of in on at to and with is are next left right top bottom middle center "
    "red green blue yellow purple orange white black cyan pink small large big circle square triangle "
    "dog cat man woman car tree house sky grass table chair sitting standing leaning against near front back"
).split()

#: Eight short multi-sentence scene captions in the tiny tokenizer's words (ids 0..7 of the common test batches).
SCENE_CAPTIONS = (
    "a large red circle in the top left. it is next to a blue square. the sky is blue",
    "a small green triangle at the bottom. a dog sitting near a tree",
    "a cat sitting on a chair near a table",
    "a white car in front of a house. a tree on the left. a dog. a man standing",
    "a purple square",
    "an orange circle and a yellow triangle in the middle of the image. a woman on the right",
    "a black dog leaning against a white car. the grass is green",
    "a big blue circle. a small cyan square. a pink triangle at the top right",
)


def tiny_clip_config(
    vocab_size: int = 600,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    projection_dim: int = 16,
    image_size: int = 32,
    patch_size: int = 8,
    max_position_embeddings: int = 77,
    eos_token_id: int | None = None,
) -> CLIPConfig:
    """A small stock `CLIPConfig` (77 text positions by default) with a tokenizer-compatible vocabulary."""
    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=eos - 1,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )


def tiny_processor(
    words: Iterable[str] = DEFAULT_WORDS, image_size: int = 32, max_length: int = 248
) -> LongCLIPProcessor:
    """A `LongCLIPProcessor` with a locally built tokenizer and a PIL image processor at `image_size`."""
    tokenizer = build_clip_tokenizer(words, model_max_length=max_length)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LongCLIPProcessor.from_parts(image_processor, tokenizer, max_length)


def tiny_clip(seed: int = 0, processor: LongCLIPProcessor | None = None, **config_kwargs) -> CLIPModel:
    """A randomly initialised tiny stock `CLIPModel` whose vocabulary matches `processor` (or the default one)."""
    processor = processor or tiny_processor()
    config_kwargs.setdefault("vocab_size", len(processor.tokenizer))
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**config_kwargs)).eval()


def tiny_variant(name: str, seed: int = 0, processor: LongCLIPProcessor | None = None, clip_kwargs=None, **fields):
    """A tiny random model of a registered variant: `tiny_clip` stretched by the variant's ``from_clip`` with the
    registry's ``tiny_config`` (what makes 2-layer towers valid) and `fields` on top."""
    from .variants import get_variant

    variant = get_variant(name)
    clip = tiny_clip(seed, processor, **(clip_kwargs or {}))
    torch.manual_seed(seed + 1)
    return variant.model_class.from_clip(clip, **{**variant.tiny_config, **fields})


def run_without_package(script: str, timeout: float = 300):
    """Run a Python script in a fresh interpreter in which ``import hf_longclip`` fails (what a user without the
    package has: ``trust_remote_code`` loading must then work from the files saved next to the weights).

    Returns the `subprocess.CompletedProcess` (text output captured); the script is dedented first.
    """
    import subprocess
    import sys
    import textwrap

    blocker = textwrap.dedent(
        """
        import importlib.abc, sys
        class _BlockPackage(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "hf_longclip":
                    raise ImportError("hf_longclip is blocked in this process")
        sys.meta_path.insert(0, _BlockPackage())
        """
    )
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1"},
    )


__all__ = [
    "DEFAULT_WORDS",
    "SCENE_CAPTIONS",
    "deepspeed_on_cpus",
    "run_without_package",
    "spawn_distributed",
    "spawn_launched",
    "tiny_clip",
    "tiny_clip_config",
    "tiny_processor",
    "tiny_variant",
]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_then_leave_group(function, *args) -> None:
    """Worker body: run `function`, then leave the process group cleanly.

    A worker that exits while its gloo process group is alive can die in C++ ("terminate called without an active
    exception", SIGABRT) when the group's threads are torn down at interpreter exit.
    """
    import torch.distributed as dist

    function(*args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def spawn_distributed(function, args: tuple = (), num_processes: int = 2) -> None:
    """Run ``function(*args)`` in ``num_processes`` CPU processes joined in a gloo process group (accelerate's
    environment variables set, so ``Accelerator(cpu=True)`` inside sees the group).

    Like `accelerate.debug_launcher`, but the workers are *spawned*, not forked, and use a free port: a fork of a
    process whose torch/OpenMP thread pools already ran can block forever in its first parallel op, and the fixed
    port 29500 collides with concurrent runs. ``function`` must be importable (a module-level function); spawned
    workers re-import its module with the parent's ``sys.path``.
    """
    import functools
    import os
    import tempfile

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    # The process group deletes its rendezvous file when done, so it lives in a temporary folder.
    with tempfile.TemporaryDirectory() as folder, patch_environment(
        world_size=num_processes,
        master_addr="127.0.0.1",
        master_port=str(_free_port()),
        accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=os.path.join(folder, "rdv"),
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
        omp_num_threads="1",
    ):
        worker = functools.partial(_run_then_leave_group, function)
        start_processes(PrepareForLaunch(worker, debug=True), args=args, nprocs=num_processes, start_method="spawn")


def spawn_launched(function, args: tuple = (), num_processes: int = 2, env: dict[str, str] | None = None) -> None:
    """Run ``function(*args)`` in ``num_processes`` spawned CPU processes with the environment a launcher
    (``accelerate launch``, torchrun) gives each: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` /
    ``MASTER_PORT``, plus `env`. Unlike `spawn_distributed`, no process group is created beforehand: the code under
    test (accelerate, DeepSpeed) creates it, as in a launched run. ``function`` must be importable."""
    from torch.multiprocessing import start_processes

    start_processes(
        _launched_entry, args=(function, num_processes, _free_port(), dict(env or {}), args), nprocs=num_processes,
        start_method="spawn",
    )


def _launched_entry(index: int, function, world: int, port: int, env: dict[str, str], args: tuple) -> None:
    import os

    os.environ.update(env)
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    _run_then_leave_group(function, *args)


def deepspeed_on_cpus() -> None:
    """Let accelerate run DeepSpeed on CPU processes (tests only; call in each process before building the
    `Accelerator`).

    accelerate starts DeepSpeed only on its accelerator path (``cpu=False``), where it finds no backend without a
    GPU and runs one process alone; its CPU path (``cpu=True``) never selects DeepSpeed. This makes the accelerator
    path take gloo when a launcher started the process and no accelerator backend exists, so DeepSpeed (with its CPU
    accelerator, ``DS_ACCELERATOR=cpu``) runs over gloo. It patches ``PartialState._prepare_backend``, a private
    accelerate method (accelerate 1.x).
    """
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_hf_longclip_cpu_shim", False):
        return

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and int(os.environ.get("LOCAL_RANK", "-1")) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    prepare_backend._hf_longclip_cpu_shim = True
    PartialState._prepare_backend = prepare_backend
