"""The built wheel, installed in fresh virtual environments that see no source tree: what ships, what the base
install can do, what needs the ``train`` extra, and training through ``hf-longclip train`` and ``accelerate launch
-m hf_longclip.train`` with 2 processes.

Each environment is a new venv with the wheel installed by pip; its dependencies are the installed distributions
that the wheel's requirements (base, or base + ``train``) pull in, read from their metadata and linked into a
folder on the environment's path, so nothing outside those requirements is importable there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".venv", ".git", "outputs", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built (no build isolation: this venv's setuptools) from a copy of the sources."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(work / "dist"), str(source)],
        check=True, capture_output=True, text=True,
    )
    (built,) = (work / "dist").glob("hf_longclip-*.whl")
    return built


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode("utf-8")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _closure(requirements: list[str], extras: set[str]) -> list[metadata.Distribution]:
    """The installed distributions `requirements` (with `extras` of the root) pull in, transitively."""
    found: dict[str, metadata.Distribution] = {}
    queue = [(Requirement(text), {""} | extras) for text in requirements]
    while queue:
        requirement, active = queue.pop()
        if requirement.marker is not None and not any(requirement.marker.evaluate({"extra": e}) for e in active):
            continue
        if canonicalize_name(requirement.name) == "hf-longclip":  # `all = hf-longclip[...]`
            continue
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        found[key] = metadata.distribution(requirement.name)
        own = {""} | set(requirement.extras)
        queue.extend((Requirement(text), own) for text in found[key].requires or [])
    return list(found.values())


def _fresh_env(root: Path, wheel: Path, extras: set[str]) -> Path:
    """A venv holding the wheel and exactly the dependencies of `extras`; returns its python."""
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    python = root / "env" / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = root / "deps"
    deps.mkdir()
    for dist in _closure(_requirements(wheel), extras):
        top = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for name in top:
            source = Path(dist.locate_file(name))
            if name.endswith(".pth") or not source.exists() or (deps / name).exists():
                continue
            (deps / name).symlink_to(source)
    (site / "hf_longclip_test_deps.pth").write_text(f"{deps}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    return python


def _run(args, cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment)


@pytest.fixture(scope="module")
def base_env(tmp_path_factory, wheel) -> Path:
    return _fresh_env(tmp_path_factory.mktemp("base-env"), wheel, set())


@pytest.fixture(scope="module")
def train_env(tmp_path_factory, wheel) -> Path:
    return _fresh_env(tmp_path_factory.mktemp("train-env"), wheel, {"train"})


# ----------------------------------------------------------------------------------------------- the wheel
def test_wheel_ships_recipes_cards_license_and_types(wheel):
    from hf_longclip import VARIANTS, __version__

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = archive.read(f"hf_longclip-{__version__}.dist-info/METADATA").decode()
    recipes = {Path(p).stem for p in (ROOT / "training_scripts" / "configs").glob("*.yaml")}
    assert recipes and {f"hf_longclip/recipes/{r}.yaml" for r in recipes} <= names
    assert {f"hf_longclip/model_cards/{v}.md" for v in VARIANTS} | {"hf_longclip/model_cards/base.md"} <= names
    assert "hf_longclip/py.typed" in names and f"hf_longclip-{__version__}.dist-info/licenses/LICENSE" in names
    assert wheel.name.startswith(f"hf_longclip-{__version__}-")  # the version comes from hf_longclip.__version__
    assert "License-Expression: Apache-2.0" in meta and "Project-URL: Issues," in meta
    assert not any(n.startswith(("tests/", "training_scripts/")) for n in names)
    base = [r for r in _requirements(wheel) if "extra ==" not in r]
    assert not any(r.startswith(("accelerate", "datasets", "spacy", "diffusers", "tensorboard")) for r in base)


def test_sdist_builds_the_same_complete_wheel(tmp_path):
    """pip installs from the sdist where no wheel fits: it must carry the recipes and card templates too."""
    import tarfile

    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", build, str(tmp_path / "sdist")], cwd=source, check=True,
                          capture_output=True, text=True)
    with tarfile.open(tmp_path / "sdist" / done.stdout.strip().splitlines()[-1]) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert (unpacked / "LICENSE").is_file() and (unpacked / "training_scripts" / "configs" / "quickstart.yaml").is_file()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
                    str(tmp_path / "dist"), str(unpacked)], check=True, capture_output=True, text=True)
    (built,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
    recipes = {Path(p).stem for p in (ROOT / "training_scripts" / "configs").glob("*.yaml")}
    assert {f"hf_longclip/recipes/{r}.yaml" for r in recipes} <= names
    assert "hf_longclip/model_cards/base.md" in names and "hf_longclip/py.typed" in names


# ----------------------------------------------------------------------------------------------- base install
BASE_SCRIPT = r"""
import importlib.util, json, sys
from pathlib import Path
import hf_longclip
assert str(Path(hf_longclip.__file__)).startswith(sys.prefix), hf_longclip.__file__   # the installed copy
missing = [m for m in ("accelerate", "datasets", "spacy", "diffusers") if importlib.util.find_spec(m)]
assert not missing, missing
import torch
from PIL import Image
from transformers import AutoModel, CLIPModel
import hf_longclip.cli, hf_longclip.evaluation, hf_longclip.hub, hf_longclip.training
from hf_longclip import LongCLIPModel
from hf_longclip.evaluation import EvalSettings
from hf_longclip.evaluation.readers import RetrievalSet
from hf_longclip.evaluation.retrieval import evaluate_retrieval
from hf_longclip.testing_utils import tiny_clip, tiny_processor

out = Path(sys.argv[1])
processor = tiny_processor()
model = LongCLIPModel.from_clip(tiny_clip(processor=processor)).eval()
model.save_pretrained(out / "model"); processor.save_pretrained(out / "model")
loaded = AutoModel.from_pretrained(out / "model")
assert type(loaded).__name__ == "LongCLIPModel"
assert isinstance(loaded.to_clip_model(), CLIPModel)
paths = []
for i, color in enumerate(["red", "blue", "green"]):
    paths.append(out / f"{i}.png"); Image.new("RGB", (40, 40), color).save(paths[-1])
data = RetrievalSet("tiny", paths, ["a red square", "a blue square", "a green square"], [0, 1, 2])
report = evaluate_retrieval(loaded, processor, data, settings=EvalSettings(batch_size=2, progress=False))
assert report["num_images"] == 3
try:
    hf_longclip.training.run(*(cls() for cls in hf_longclip.training.arguments.ARGUMENT_CLASSES))
except ImportError as error:
    print("TRAIN:", error)
print("OK")
"""


def test_base_install_loads_embeds_exports_evaluates_and_names_the_train_extra(base_env, tmp_path):
    done = _run([base_env, "-c", BASE_SCRIPT, tmp_path], cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr
    assert "TRAIN: training needs 'accelerate', which is not installed: pip install 'hf-longclip[train]'" in done.stdout
    version = _run([base_env.parent / "hf-longclip", "--version"], cwd=tmp_path)
    from hf_longclip import __version__

    assert version.returncode == 0 and version.stdout.startswith(f"hf-longclip {__version__} (transformers ")
    # the trainer from the command line: one line naming the extra, no traceback
    train = _run([base_env.parent / "hf-longclip", "train", "--config", "quickstart", "--max_train_steps", "1"],
                 cwd=tmp_path)
    assert train.returncode == 1 and "Traceback" not in train.stderr, train.stderr
    assert train.stderr.strip().splitlines()[-1].startswith("error: ") and "hf-longclip[train]" in train.stderr


# ----------------------------------------------------------------------------------------------- training
SMALL = ["--synthetic_num_train", "256", "--synthetic_num_eval", "16", "--per_device_train_batch_size", "8",
         "--eval_before_training", "false", "--save_steps", "0"]


def test_installed_trainer_runs_from_a_shipped_recipe_and_saves_an_automodel(train_env, tmp_path):
    out = tmp_path / "run"
    done = _run([train_env.parent / "hf-longclip", "train", "--config", "quickstart", "--max_train_steps", "5",
                 "--output_dir", out, *SMALL], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 5 and summary["finished"]
    check = ("import sys; from transformers import AutoModel; import hf_longclip; "
             "m = AutoModel.from_pretrained(sys.argv[1]); print(type(m).__name__, m.config.text_config.max_position_embeddings)")
    loaded = _run([train_env, "-c", check, out], cwd=tmp_path)
    assert loaded.stdout.split() == ["LongCLIPModel", "248"], loaded.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_accelerate_launch_module_with_two_cpu_processes(train_env, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2 -m hf_longclip.train`` on a machine without GPUs: the
    trainer joins the two processes in a gloo group (left alone, accelerate would run two independent rank-0
    trainings into one folder)."""
    out = tmp_path / "run"
    done = _run([train_env, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                 _free_port(), "-m", "hf_longclip.train", "--config", "quickstart", "--max_train_steps", "2",
                 "--output_dir", out, "--disable_progress_bar", *SMALL], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["samples_seen"] == 2 * 8 * 2  # steps x batch x processes
    assert (out / "model.safetensors").is_file()
