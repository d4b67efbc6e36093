"""Scaling out: FSDP2 on 2 CPU processes equals 1 process (losses, consolidated weights, evaluation), cached
accumulation under FSDP2, sharded checkpoints that resume bit-identically and load without unpickling, variants that
cannot be sharded refused at start-up, DeepSpeed ZeRO-2 / ZeRO-3 (when deepspeed is installed).

The 2-process runs go through the trainer's own FSDP2 path (accelerate runs CPU processes as DDP and ignores FSDP);
on GPUs the same units are applied before accelerate's FSDP2 prepare (docs/training.md, Scaling out).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_longclip.testing_utils import spawn_distributed, spawn_launched, tiny_variant

ROOT = Path(__file__).resolve().parents[1]
FSDP2_ENV = {"accelerate_use_fsdp": "true", "fsdp_version": "2"}

#: Parameters whose true gradient is exactly 0 (attention key biases: a softmax ignores a constant shift; FineLIP's
#: aggregation output bias: the softmax over tokens cancels it). Float noise is their gradient, which Adam turns into
#: full-size steps of random sign, so no two runs share them.
ZERO_GRADIENT = ("k_proj.bias", "aggregation.fc2.bias")


def train(*flags) -> dict:
    from hf_longclip.training import main

    return main([str(f) for f in flags])


def _flags(out_dir, variant: str, per_device: int, accum: int, *extra) -> list:
    """tests/test_train_script.py's multi-process flags (a tiny quickstart run of 3 steps) plus `extra`."""
    from test_train_script import _distributed_flags

    return [*_distributed_flags(out_dir, variant, per_device, accum), *extra]


def _fsdp2_worker(out_dir, variant, per_device, accum, extra):
    train(*_flags(out_dir, variant, per_device, accum, *extra))


def _run_fsdp2(out_dir: Path, variant: str, per_device: int, accum: int, *extra) -> dict:
    """The trainer on 2 CPU processes with FSDP configured as `accelerate launch` does from an FSDP2 config."""
    from accelerate.utils import patch_environment

    with patch_environment(**FSDP2_ENV):
        spawn_distributed(_fsdp2_worker, args=(str(out_dir), variant, per_device, accum, [str(e) for e in extra]))
    return json.loads((out_dir / "train_summary.json").read_text())


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = {k: (b[k] - a[k]).abs().max().item() for k in a
           if not k.endswith(ZERO_GRADIENT) and not torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-6)}
    assert not bad, bad
    assert len(a) - sum(k.endswith(ZERO_GRADIENT) for k in a) > 30


def _only_safe_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".json"))


# ----------------------------------------------------------------------------------------------- FSDP2, 2 processes
def test_fsdp2_two_processes_equal_one_process_with_cached_accumulation(tmp_path):
    """Long-CLIP, 2 processes x 2 samples x 2 cached micro-batches under FSDP2 == 1 plain process x 8 samples: the
    same loss terms at every logged step, the same consolidated weights (one safetensors save_pretrained folder that
    AutoModel loads), the same held-out evaluation before, during and after training; the sharded checkpoint holds
    only safetensors and JSON."""
    evaluation = ["--synthetic_num_eval", 8, "--eval_before_training", "true", "--eval_steps", 2, "--save_steps", 2]
    single = train(*_flags(tmp_path / "one", "longclip", 8, 1, *evaluation))
    multi = _run_fsdp2(tmp_path / "two", "longclip", 2, 2, *evaluation)
    assert multi["global_step"] == single["global_step"] == 3
    for which in ("first_loss_terms", "last_loss_terms"):
        assert single[which].keys() == multi[which].keys() and len(single[which]) == 3
        for key, value in single[which].items():
            assert multi[which][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (which, key)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    _assert_same_weights(a, b)
    # the frozen rows of the position table survive sharding (the state-dict hook writes them per shard)
    position = "text_model.embeddings.position_embedding.weight"
    assert torch.equal(b[position][:20], a[position][:20])
    assert set(multi["evaluations"]) == {"before", "step-2", "after"} == set(single["evaluations"])
    for tag in ("before", "after"):
        for key in ("t2i_R@1", "i2t_R@5", "num_texts"):
            assert multi["evaluations"][tag][key] == single["evaluations"][tag][key], (tag, key)
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "two")
    assert loaded.config.model_type == "longclip"
    assert torch.equal(loaded.state_dict()["visual_projection.weight"], b["visual_projection.weight"])
    checkpoint = tmp_path / "two" / "checkpoints" / "step-00000002"
    assert (checkpoint / "sharded_state" / "format.json").is_file()
    assert len(list((checkpoint / "sharded_state").glob("*.safetensors"))) == 2  # one file per process
    assert _only_safe_files(checkpoint) == []


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_finelip_heads(tmp_path):
    """FineLIP (aggregation heads as FSDP units, a frozen logit_scale) with naive accumulation: 2 processes x 2
    samples x 2 micro-batches under FSDP2 == 1 plain process x 4 samples x 2 micro-batches (each micro-batch's loss
    sees the same 4 samples)."""
    single = train(*_flags(tmp_path / "one", "finelip", 4, 2, "--accumulation_mode", "naive"))
    multi = _run_fsdp2(tmp_path / "two", "finelip", 2, 2, "--accumulation_mode", "naive")
    for key, value in single["last_loss_terms"].items():
        assert multi["last_loss_terms"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    _assert_same_weights(load_file(tmp_path / "one" / "model.safetensors"),
                         load_file(tmp_path / "two" / "model.safetensors"))


class _Payload:
    """Unpickling this object creates `marker` (what a hostile checkpoint would do with any code it likes)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_fsdp2_stop_and_resume_from_sharded_checkpoint_is_bit_identical(tmp_path):
    """2 processes under FSDP2 with cached accumulation: stopping after step 2 and resuming from the sharded
    checkpoint ends with exactly the weights of an uninterrupted run; pickles planted where torch's own DCP reader
    would look (``.metadata``, ``*.distcp``) are never read."""
    extra = ["--max_steps", 4, "--save_steps", 2]
    _run_fsdp2(tmp_path / "whole", "longclip", 2, 2, *extra)
    part = _run_fsdp2(tmp_path / "parts", "longclip", 2, 2, *extra, "--stop_after_steps", 2)
    assert part["global_step"] == 2 and not part["finished"]
    sharded = tmp_path / "parts" / "checkpoints" / "step-00000002" / "sharded_state"
    marker = tmp_path / "PWNED"
    for name in (".metadata", "__0_0.distcp"):  # what torch's FileSystemReader would unpickle
        (sharded / name).write_bytes(pickle.dumps(_Payload(marker)))
    rest = _run_fsdp2(tmp_path / "parts", "longclip", 2, 2, *extra, "--resume_from_checkpoint", "latest")
    assert rest["finished"] and rest["global_step"] == 4 and not marker.exists()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "parts" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ----------------------------------------------------------------------------------------------- one process
@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group in this process (FSDP2 and DCP need one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded_finelip(seed: int):
    from hf_longclip.training.sharding import shard_model

    model = tiny_variant("finelip", seed=seed, global_loss_weight=1.0).train()
    handle = shard_model(model, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, handle, optimizer


def test_sharded_state_round_trip_reads_only_safetensors_and_json(tmp_path, one_process_group):
    """save_sharded_state / load_sharded_state restore every model and optimizer tensor of another model built from
    a different seed; the files are safetensors and JSON; a hostile pickle next to them is never unpickled; a folder
    without the format file is refused."""
    from torch.distributed.tensor import DTensor

    from hf_longclip.training.sharding import has_sharded_state, load_sharded_state, save_sharded_state

    model, handle, optimizer = _sharded_finelip(seed=0)
    assert isinstance(model.text_model.encoder.layers[0].mlp.fc1.weight, DTensor)
    assert not isinstance(model.logit_scale, DTensor) and [id(p) for p in handle.replicated] == [id(model.logit_scale)]
    for p in model.parameters():  # one optimiser step, so the optimiser holds moments and step counts
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    save_sharded_state(model, optimizer, tmp_path / "ckpt")
    assert has_sharded_state(tmp_path / "ckpt") and _only_safe_files(tmp_path / "ckpt") == []
    marker = tmp_path / "PWNED"
    (tmp_path / "ckpt" / "sharded_state" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))

    other, _, other_optimizer = _sharded_finelip(seed=5)
    expected = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    before = other.state_dict()["visual_projection.weight"].full_tensor()
    assert not torch.equal(before, expected["visual_projection.weight"])
    load_sharded_state(other, other_optimizer, tmp_path / "ckpt")
    assert not marker.exists()
    loaded = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in other.state_dict().items()}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            a, b = optimizer.state[p][key], other_optimizer.state[q][key]
            a, b = (t.full_tensor() if isinstance(t, DTensor) else t for t in (a, b))
            assert torch.equal(a, b), key
    (tmp_path / "ckpt" / "sharded_state" / "format.json").unlink()
    with pytest.raises(ValueError, match="is not a sharded training state"):
        load_sharded_state(other, other_optimizer, tmp_path / "ckpt")


def test_clip_grad_norm_counts_shards_once_and_replicated_parameters_once(one_process_group):
    """The global norm over sharded (DTensor) and replicated gradients equals the plain model's."""
    model, handle, _ = _sharded_finelip(seed=0)
    plain = tiny_variant("finelip", seed=0, global_loss_weight=1.0)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        q.grad = torch.linspace(-1, 1, q.numel()).view_as(q) * (1 + len(name) % 3)
        p.grad = q.grad.clone() if p.dim() == 0 else type(p).from_local(q.grad.clone(), p.device_mesh, p.placements)
    expected = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
    total = handle.clip_grad_norm_(0.5)
    torch.testing.assert_close(total, expected)
    for p, q in zip(model.parameters(), plain.parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        torch.testing.assert_close(grad, q.grad)


# ----------------------------------------------------------------------------------------------- units and refusals
def test_sharding_units_come_from_the_model():
    """Units: every encoder layer and embedding of both towers and the variant's head blocks (from
    `_no_split_modules`); never a parameter holder without a forward (Fix-CLIP's regional prompts), never a module
    whose parameters the model reads outside its forward (Fix-CLIP's image embeddings when it masks before the
    position embedding)."""
    finelip = tiny_variant("finelip")
    units = finelip.sharding_units()
    names = {name for name, module in finelip.named_modules() if any(module is u for u in units)}
    layers = {f"{tower}.encoder.layers.{i}" for tower in ("text_model", "vision_model") for i in range(2)}
    assert names == layers | {"text_model.embeddings", "vision_model.embeddings", "image_aggregation",
                              "text_aggregation"}
    assert units.index(finelip.text_model.encoder.layers[0]) < len(units)  # children before parents: all leaves here
    fixclip = tiny_variant("fixclip")
    assert fixclip.config.mask_before_position_embedding
    fix_units = fixclip.sharding_units()
    assert not any(u is fixclip.regional_prompts or u is fixclip.vision_model.embeddings for u in fix_units)
    assert any(u is fixclip.vision_group_heads[0] for u in fix_units)
    unmasked = tiny_variant("fixclip", mask_before_position_embedding=False)
    assert any(u is unmasked.vision_model.embeddings for u in unmasked.sharding_units())


def test_models_say_why_they_cannot_be_sharded():
    from hf_longclip.training.sharding import check_shardable

    for name in ("longclip", "finelip", "fixclip"):
        assert tiny_variant(name).sharding_conflicts() == [], name
    for name, reason in (("mulclip", "subcaptions"), ("betaclip", "sentence and phrase rows")):
        with pytest.raises(ValueError, match=rf"cannot train with per-module sharded parameters .*{reason}.*"
                                             r"depends on each process's data.*DDP .* DeepSpeed ZeRO-2"):
            check_shardable(tiny_variant(name))
    shared = tiny_variant("finelip")
    shared.text_aggregation.fc1.weight = shared.visual_projection.weight  # a head tied to the backbone
    assert any("visual_projection.weight is shared with text_aggregation.fc1.weight" in c
               for c in shared.sharding_conflicts())
    unused = tiny_variant("longclip")
    unused.ddp_find_unused_parameters = True
    assert any("without a gradient" in c for c in unused.sharding_conflicts())


def _fail_if_called(*args, **kwargs):
    raise AssertionError("work started")


@pytest.mark.parametrize("variant", ["mulclip", "betaclip"])
def test_unshardable_variant_under_fsdp_is_refused_before_any_work(variant, monkeypatch, tmp_path):
    from hf_longclip.training import parse_training_arguments, trainer
    from hf_longclip.training.sharding import FSDP2_TRAINER

    monkeypatch.setattr(trainer, "sharding_engine", lambda accelerator: FSDP2_TRAINER)
    monkeypatch.setattr(trainer, "training_records", _fail_if_called)
    args = parse_training_arguments(["--base", "tiny-random", "--variant", variant, "--output_dir", tmp_path / "run"])
    with pytest.raises(ValueError, match="cannot train with per-module sharded parameters"):
        trainer.run(*args)


def test_engine_comes_from_accelerate_config_and_fsdp_version_1_is_refused(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hf_longclip.training.sharding import DDP, FSDP2_ACCELERATE, FSDP2_TRAINER, sharding_engine

    def accelerator(kind, processes=2, fsdp_version=2):
        plugin = SimpleNamespace(fsdp_version=fsdp_version)
        return SimpleNamespace(distributed_type=kind, num_processes=processes, state=SimpleNamespace(fsdp_plugin=plugin))

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding_engine(accelerator(DistributedType.MULTI_CPU)) == DDP
    assert sharding_engine(accelerator(DistributedType.FSDP)) == FSDP2_ACCELERATE  # GPUs: accelerate's FSDP
    with pytest.raises(ValueError, match="hf_longclip trains with FSDP2 only: set fsdp_version: 2"):
        sharding_engine(accelerator(DistributedType.FSDP, fsdp_version=1))
    # `accelerate launch` with an FSDP config on CPUs: accelerate joins CPU processes, the trainer shards
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding_engine(accelerator(DistributedType.MULTI_CPU)) == FSDP2_TRAINER
    assert sharding_engine(accelerator(DistributedType.NO, processes=1)) == DDP  # one process: nothing to shard
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="FSDP version 1 is configured"):
        sharding_engine(accelerator(DistributedType.MULTI_CPU))


# ----------------------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_worker(out_dir, variant, stage):
    from hf_longclip.testing_utils import deepspeed_on_cpus

    deepspeed_on_cpus()
    train(*_flags(out_dir, variant, 4, 1, "--accumulation_mode", "naive"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_equal_one_process(stage, tmp_path):
    """DeepSpeed ZeRO-2 / ZeRO-3 through accelerate on 2 CPU processes (gloo; accelerate's backend choice patched,
    `deepspeed_on_cpus`) == 1 plain process: the same loss terms and the same final weights (ZeRO-3 gathers them
    for save_pretrained)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf-longclip[deepspeed]')")
    single = train(*_flags(tmp_path / "one", "longclip", 8, 1))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage), "DS_ACCELERATOR": "cpu",
           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true", "ACCELERATE_MIXED_PRECISION": "no"}
    spawn_launched(_deepspeed_worker, args=(str(tmp_path / "two"), "longclip", stage), env=env)
    multi = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    for key, value in single["last_loss_terms"].items():
        assert multi["last_loss_terms"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    _assert_same_weights(load_file(tmp_path / "one" / "model.safetensors"),
                         load_file(tmp_path / "two" / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- GPUs
def _cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.slow
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 CUDA GPUs: accelerate's own FSDP2 / DeepSpeed path (the "
                                                "trainer's CPU paths are tested above)")
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_gpu_engines_through_accelerate_launch_equal_one_gpu(engine, tmp_path):
    """`accelerate launch` with examples/multinode/<engine>.yaml on 2 GPUs (one node) == the trainer on 1 GPU: the
    same loss terms and final weights."""
    import os
    import subprocess
    import sys

    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'hf-longclip[deepspeed]')")
    mode = ["--accumulation_mode", "naive"] if engine.startswith("zero") else []
    single = train(*_flags(tmp_path / "one", "longclip", 8, 1))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "examples" / "multinode" / f"{engine}.yaml"), "--num_machines", "1", "--num_processes", "2",
        "--mixed_precision", "no", "-m", "hf_longclip.train",
        *map(str, _flags(tmp_path / "two", "longclip", 4, 1, *mode)),
    ]
    subprocess.run(command, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}, timeout=1800)
    multi = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    for key, value in single["last_loss_terms"].items():
        assert multi["last_loss_terms"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    _assert_same_weights(load_file(tmp_path / "one" / "model.safetensors"),
                         load_file(tmp_path / "two" / "model.safetensors"))


def test_deepspeed_configured_without_the_extra_names_it(monkeypatch, tmp_path):
    import sys

    from hf_longclip.extras import MissingExtraError
    from hf_longclip.training import parse_training_arguments, trainer

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    monkeypatch.setattr(trainer, "build_model_and_processor", _fail_if_called)
    with pytest.raises(MissingExtraError, match=r"DeepSpeed training .* needs 'deepspeed', which is not installed: "
                                                r"pip install 'hf-longclip\[deepspeed\]'"):
        trainer.run(*parse_training_arguments(["--output_dir", str(tmp_path / "run")]))
