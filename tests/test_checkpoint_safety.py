"""Checkpoints that run no code when read, runs that never mix, and storage failures reported early and in one line."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

from hf_longclip.training import main as train_main
from hf_longclip.training.checkpoints import check_resume, list_checkpoints, read_trainer_state, run_fingerprint

#: A tiny model on a few generated scenes: 4 steps, a checkpoint every 2.
TINY = [
    "--base", "tiny-random", "--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "4",
    "--tiny_projection_dim", "32", "--tiny_image_size", "32", "--tiny_patch_size", "16", "--synthetic_image_size",
    "32", "--synthetic_num_train", "64", "--synthetic_num_eval", "0", "--num_workers", "0", "--disable_progress_bar",
    "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
    "--eval_before_training", "false", "--save_final_model", "false",
]


def train(output_dir: Path, *flags) -> dict:
    return train_main([*TINY, "--output_dir", str(output_dir), "--image_root", str(output_dir.parent / "data"),
                       *map(str, flags)])


class _Payload:
    """Unpickling this object creates `marker` (what a hostile checkpoint would do with any code it likes)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ----------------------------------------------------------------------------------------------- no code runs
def test_hostile_pickles_in_a_checkpoint_never_run(tmp_path):
    run = tmp_path / "run"
    train(run, "--stop_after_steps", 2)
    (checkpoint,) = list_checkpoints(run)
    marker = tmp_path / "PWNED"
    # earlier versions pickled the scheduler here, and accelerate unpickles custom state with weights_only=False
    torch.save({"last_epoch": _Payload(marker)}, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match=r"holds custom_checkpoint_0.pkl: pickled objects .* not loaded because "
                                         r"unpickling can run code.* delete these files to resume"):
        train(run, "--resume_from_checkpoint", "latest")
    assert not marker.exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    # RNG states go through weights_only loading (and are re-seeded every step anyway)
    torch.save({"random_state": _Payload(marker)}, checkpoint / "random_states_0.pkl")
    summary = train(run, "--resume_from_checkpoint", "latest")
    assert not marker.exists() and summary["finished"] and summary["global_step"] == 4
    # an optimizer state that is more than tensors and plain data is refused, naming the checkpoint
    latest = list_checkpoints(run)[-1]
    assert not list(latest.glob("custom_checkpoint_*.pkl")), "this version still pickles custom state"
    torch.save({"state": {}, "param_groups": [_Payload(marker)]}, latest / "optimizer.bin")
    with pytest.raises(ValueError, match=rf"{latest.name} cannot be loaded safely \(only tensors and plain data"):
        train(run, "--resume_from_checkpoint", str(latest))
    assert not marker.exists()


def test_resumed_schedule_equals_the_uninterrupted_one(tmp_path):
    """The schedule is rebuilt from the step (nothing pickled): after a resume mid-warm-up, with two parameter groups
    at different rates, the weights equal an uninterrupted run's exactly."""
    whole = train(tmp_path / "whole", "--warmup_steps", 2, "--head_learning_rate", "1e-2", "--variant", "finelip")
    train(tmp_path / "parts", "--warmup_steps", 2, "--head_learning_rate", "1e-2", "--variant", "finelip",
          "--stop_after_steps", 3)
    rest = train(tmp_path / "parts", "--warmup_steps", 2, "--head_learning_rate", "1e-2", "--variant", "finelip",
                 "--resume_from_checkpoint", "latest")
    assert rest["finished"] and whole["finished"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "parts" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- runs never mix
def test_a_new_run_in_another_runs_folder_is_refused_unless_overwritten(tmp_path):
    run = tmp_path / "run"
    train(run, "--max_steps", 6, "--save_steps", 2)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    with pytest.raises(ValueError, match=r"holds the checkpoints of another run \(steps 2, 4, 6\); resume it with "
                                         r"--resume_from_checkpoint latest.*--overwrite_output_dir"):
        train(run)
    assert [p.name for p in list_checkpoints(run)][-1] == "step-00000006"  # nothing deleted
    train(run, "--overwrite_output_dir")
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]


@pytest.mark.parametrize(
    "flags, changed",
    [
        (["--learning_rate", "2e-3"], r"learning_rate: 0\.001 -> 0\.002"),
        (["--variant", "finelip"], r"variant: 'longclip' -> 'finelip'"),
        (["--tiny_hidden_size", "64"], r"tiny_hidden_size: 32 -> 64"),
        (["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"],
         r"gradient_accumulation_steps: 1 -> 2; per_device_train_batch_size: 8 -> 4"),
    ],
)
def test_resuming_with_changed_settings_is_refused_with_the_difference(tmp_path, flags, changed):
    run = tmp_path / "run"
    train(run, "--stop_after_steps", 2)
    with pytest.raises(ValueError, match=rf"belongs to a different run.*Changed: {changed}"):
        train(run, "--resume_from_checkpoint", "latest", *flags)
    # from the command line: one line
    from hf_longclip.train import main

    with pytest.raises(SystemExit, match=r"^error: .*belongs to a different run"):
        main([*TINY, "--output_dir", str(run), "--image_root", str(tmp_path / "data"), "--resume_from_checkpoint",
              "latest", *flags])


def test_settings_documented_as_safe_change_on_resume_and_are_logged(tmp_path, caplog):
    run = tmp_path / "run"
    train(run, "--stop_after_steps", 2)
    with caplog.at_level(logging.INFO):
        summary = train(run, "--resume_from_checkpoint", "latest", "--logging_steps", 1, "--save_total_limit", 1)
    assert summary["finished"]
    assert "changed on resume (allowed): logging_steps 10 -> 1" in caplog.text
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]  # the new limit applied
    saved = read_trainer_state(list_checkpoints(run)[-1])
    assert saved["settings"]["logging_steps"] == 1 and saved["fingerprint"]["num_processes"] == 1


def test_model_shape_and_process_count_are_part_of_the_fingerprint():
    from hf_longclip.testing_utils import tiny_variant

    settings = {"variant": "longclip", "learning_rate": 1e-3, "logging_steps": 10}
    small, wide = tiny_variant("longclip"), tiny_variant("longclip", clip_kwargs={"hidden_size": 48})
    base = run_fingerprint(settings, small, 1)
    assert base["settings"] == {"variant": "longclip", "learning_rate": 1e-3}  # logging_steps may change
    check_resume(base, run_fingerprint({**settings, "logging_steps": 1}, small, 1), "ckpt")
    with pytest.raises(ValueError, match="model tensors: .* with other shapes"):
        check_resume(base, run_fingerprint(settings, wide, 1), "ckpt")
    with pytest.raises(ValueError, match="processes: 1 -> 2"):
        check_resume(base, run_fingerprint(settings, small, 2), "ckpt")


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default_only():
    """A checkpoint written before a setting existed (e.g. shuffle_buffer) resumes while the run leaves that setting at
    its default (what the older version did), and is refused when it is changed."""
    from hf_longclip.testing_utils import tiny_variant

    model = tiny_variant("longclip")
    old = run_fingerprint({"variant": "longclip"}, model, 1)
    check_resume(old, run_fingerprint({"variant": "longclip", "shuffle_buffer": 1000}, model, 1), "ckpt")
    with pytest.raises(ValueError, match="shuffle_buffer: '<unset>' -> 7"):
        check_resume(old, run_fingerprint({"variant": "longclip", "shuffle_buffer": 7}, model, 1), "ckpt")
    with pytest.raises(ValueError, match="not_a_setting"):  # unknown keys have no default to fall back on
        check_resume(old, run_fingerprint({"variant": "longclip", "not_a_setting": 1}, model, 1), "ckpt")


# ----------------------------------------------------------------------------------------------- storage
def test_unwritable_output_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    from hf_longclip.training import trainer

    def never(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(trainer, "build_model_and_processor", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=rf"output_dir {blocker}/run is not writable"):
        train(blocker / "run")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def save_until_full(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 1:
            return real_save(self, output_dir, **kwargs)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_until_full)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/step-00000004 was not written: the disk is full "
                                         r"\(\d+ MiB needed, \d+ MiB free\); the previous checkpoints are intact"):
        train(run)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no temporary folder left
    assert read_trainer_state(root / "step-00000002")["global_step"] == 2
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert train(run, "--resume_from_checkpoint", "latest")["finished"]  # and the run continues from it


def test_low_free_space_is_a_warning_at_start_up(tmp_path, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    from hf_longclip.training import trainer

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level(logging.WARNING):
        train(tmp_path / "run", "--max_steps", 1, "--save_steps", 0)
    assert "only 0 MiB free in" in caplog.text and "less than one checkpoint" in caplog.text
    assert shutil.disk_usage is not None
