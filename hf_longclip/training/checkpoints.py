"""Training checkpoints that are never half-written, never run code when read, and never mix two runs.

``accelerator.save_state`` writes into a temporary folder that is renamed once complete. Nothing is loaded with
pickle's full power: accelerate reads the optimizer and RNG files with ``weights_only=True``, the learning-rate
schedule is rebuilt from the step (it is a pure function of it), and the trainer's own state is JSON. Each checkpoint
records the run's fingerprint (settings, model shape, processes) so that a resume with different settings, or a new
run in another run's folder, is refused with the difference. See docs/training.md (Checkpoints, resuming, outputs).
"""

from __future__ import annotations

import errno
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
_PATTERN = re.compile(r"^step-(\d+)$")

#: Settings a resumed run may change: where and how often it logs, evaluates, saves and publishes, how it reads the
#: data (not what). They are applied and logged; a difference in any other setting refuses the resume.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "stop_after_steps", "logging_steps", "save_steps",
    "save_total_limit", "eval_steps", "eval_before_training", "eval_batch_size", "eval_data", "eval_format",
    "eval_split", "max_eval_samples", "report_to", "tracker_project", "disable_progress_bar", "num_workers",
    "text_cache_dir", "text_num_proc", "strict", "save_final_model", "push_to_hub", "hub_model_id", "hub_private",
    "hub_revision", "record_index", "index_dir",
})
#: Files of a checkpoint written by earlier versions that held pickled objects (the scheduler); never loaded.
_PICKLED_CUSTOM_STATE = "custom_checkpoint_*.pkl"


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with a trainer state file), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, spec: str) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint in `output_dir` (None if there is none); else the folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state (JSON) of a checkpoint; a `ValueError` naming the file when it is not valid JSON."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file} cannot be read as a trainer state: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} is not a trainer state (a JSON object)")
    return state


# ----------------------------------------------------------------------------------------------- run identity
def run_fingerprint(settings: dict[str, Any], model, num_processes: int) -> dict[str, Any]:
    """What makes two checkpoints parts of the same run: every setting that changes what is trained (all but
    `RESUMABLE_CHANGES`), the shapes of the model's tensors and the number of processes (with the per-device batch
    it fixes the global batch and the sample order)."""
    shapes = sorted((name, tuple(tensor.shape)) for name, tensor in model.state_dict().items())
    digest = hashlib.sha256(repr(shapes).encode("utf-8")).hexdigest()[:16]
    return {
        "settings": {k: v for k, v in sorted(settings.items()) if k not in RESUMABLE_CHANGES},
        "model_shape": digest,
        "num_tensors": len(shapes),
        "num_processes": num_processes,
    }


def setting_defaults() -> dict[str, Any]:
    """Every training setting's default (the settings groups' dataclass defaults)."""
    from .arguments import DataArguments, ModelArguments, TrainingArguments

    defaults: dict[str, Any] = {}
    for group in (ModelArguments, DataArguments, TrainingArguments):
        for item in dataclasses.fields(group):
            if item.default is not dataclasses.MISSING:
                defaults[item.name] = item.default
            elif item.default_factory is not dataclasses.MISSING:
                defaults[item.name] = item.default_factory()
    return defaults


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    """Refuse (`ValueError` listing every difference) to resume `checkpoint` under a different run fingerprint.

    A setting the checkpoint does not record (added by a later version of the package) is no difference while the
    current run leaves it at its default, which is what the earlier version did."""
    if not saved:
        return
    lines = []
    old, new = saved.get("settings", {}), current["settings"]
    defaults = setting_defaults()
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            lines.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    if saved.get("num_processes") != current["num_processes"]:
        lines.append(f"processes: {saved.get('num_processes')} -> {current['num_processes']}")
    if not lines and saved.get("model_shape") != current["model_shape"]:
        lines.append(f"model tensors: {saved.get('num_tensors')} with other shapes -> {current['num_tensors']}")
    if lines:
        raise ValueError(
            f"{checkpoint} belongs to a different run; resuming it with these settings would mix two runs. "
            f"Changed: {'; '.join(lines)}. Restore them, or start a new run in another output_dir (settings that "
            f"may change on resume: {', '.join(sorted(RESUMABLE_CHANGES))})"
        )


def check_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Before any work: `output_dir` must be writable, and a new run must not start among another run's
    checkpoints (their save limit would delete the new ones and ``latest`` would pick the old run)."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"output_dir {folder} is not writable: {error.strerror or error}") from None
    existing = list_checkpoints(folder)
    if existing and not resuming:
        if not overwrite:
            steps = ", ".join(path.name.split("-")[1].lstrip("0") or "0" for path in existing)
            raise ValueError(
                f"output_dir {folder} holds the checkpoints of another run (steps {steps}); resume it with "
                "--resume_from_checkpoint latest, choose another --output_dir, or pass --overwrite_output_dir to "
                "delete them"
            )
        shutil.rmtree(checkpoint_dir(folder), ignore_errors=True)


def unsafe_files(checkpoint: str | os.PathLike) -> list[str]:
    """Pickled custom state in `checkpoint` (``custom_checkpoint_*.pkl``, from earlier versions), which is ignored."""
    return sorted(path.name for path in Path(checkpoint).glob(_PICKLED_CUSTOM_STATE))


def checkpoint_bytes(output_dir: str | os.PathLike, model) -> int:
    """Bytes one checkpoint takes: the newest one's files, else the model's tensors three times over (weights and
    AdamW's two moments)."""
    found = list_checkpoints(output_dir)
    if found:
        return sum(path.stat().st_size for path in found[-1].rglob("*") if path.is_file())
    return 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _megabytes(count: int) -> str:
    return f"{count / 2**20:.0f} MiB"


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int, needed_bytes: int = 0,
    write_state: Callable[[str], None] | None = None,
) -> Path:
    """Save the accelerator state and `state` as checkpoint ``step``; every process must call this.

    `write_state` (called on every process with the temporary folder) replaces ``accelerator.save_state``: sharded
    training writes its own safetensors shards (`hf_longclip.training.sharding.save_sharded_state`).

    The files go to a temporary folder that the main process renames once everything (the trainer state last) is
    on disk, then old checkpoints beyond `keep` are removed. A failed write (a full disk) on any process removes the
    temporary folder on all of them and raises one `ValueError` naming the folder and the space needed
    (`needed_bytes`); the previous checkpoints are untouched.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    failure: OSError | None = None
    try:
        if write_state is None:
            accelerator.save_state(str(tmp), safe_serialization=True)
        else:
            write_state(str(tmp))
        if accelerator.is_main_process:
            with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
    except OSError as error:
        failure = error
    if _on_any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        free = shutil.disk_usage(root).free if root.exists() else 0
        if failure is not None and failure.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f"the disk is full ({_megabytes(needed_bytes)} needed, {_megabytes(free)} free)"
        elif failure is not None:
            what = f"{failure.strerror or failure}"
        else:
            what = "another process could not write its part"
        raise ValueError(
            f"checkpoint {final} was not written: {what}; the previous checkpoints are intact (free space or lower "
            "save_total_limit, then resume with --resume_from_checkpoint latest)"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _on_any_process(accelerator, flag: bool) -> bool:
    """`flag` or-ed over the processes (every process must call this)."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    total = accelerator.reduce(torch.tensor([1.0 if flag else 0.0], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "RESUMABLE_CHANGES",
    "STATE_FILE",
    "check_output_dir",
    "check_resume",
    "checkpoint_bytes",
    "checkpoint_dir",
    "list_checkpoints",
    "read_trainer_state",
    "resolve_checkpoint",
    "run_fingerprint",
    "save_checkpoint",
    "unsafe_files",
]
