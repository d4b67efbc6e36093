"""Exports that load with real weights under transformers 5 *and* 4.x, and the single-file format.

The folders are written by the code users run: ``hf-longclip export`` (through ``cli.main``), `save_for_hub` (what
``hf-longclip push --export-*`` uploads) and `export_long_text_components`. The fast tests load them back under
transformers 5 (this environment); the slow test loads the same folders in a separate venv with the latest
transformers 4.x and a diffusers release matching it, and compares with the outputs computed here.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hf_longclip import LongCLIPModel
from hf_longclip.cli import main
from hf_longclip.hub import save_for_hub
from hf_longclip.testing_utils import DEFAULT_WORDS, tiny_clip, tiny_processor

TEXTS = [
    " ".join(DEFAULT_WORDS[i % len(DEFAULT_WORDS)] for i in range(300)),  # cut at 248 tokens
    "A red dog, 3 cats & it's a SUNNY day... wow!",  # '!' is the pad token of the diffusers tokenizer
    "a dog",
]
LONG_PROMPT = " ".join(DEFAULT_WORDS[(7 * i) % len(DEFAULT_WORDS)] for i in range(180)) + " wow! a dog!"
CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection, CLIPModel)}
OUTPUTS = {
    "CLIPTextModel": ("last_hidden_state", "pooler_output"),
    "CLIPTextModelWithProjection": ("last_hidden_state", "text_embeds"),
    "CLIPModel": ("text_embeds", "image_embeds", "logits_per_image"),
}


def _run(args, cwd: Path, timeout: int):
    from test_packaging import _run as run_clean  # a clean environment: no PYTHON* / VIRTUAL_ENV, offline Hub

    return run_clean(args, cwd=cwd, timeout=timeout)


# ----------------------------------------------------------------------------------------------- the exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every export of one tiny Long-CLIP, the reference models they were made from, and shared inputs."""
    root = tmp_path_factory.mktemp("exports")
    processor = tiny_processor()
    model = LongCLIPModel.from_clip(tiny_clip(seed=3, processor=processor)).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    for fmt in ("clip", "text", "text-with-projection", "diffusers-text-encoder"):
        assert main(["export", "--model", str(root / "model"), "--output", str(root / fmt), "--format", fmt]) == 0
    assert main(["export", "--model", str(root / "model"), "--output", str(root / "single.safetensors"),
                 "--format", "single-file"]) == 0
    assert main(["export", "--model", str(root / "model"), "--output", str(root / "single-noproj.safetensors"),
                 "--format", "single-file", "--no-projection"]) == 0
    save_for_hub(model, processor, root / "hub", card="card", export_clip=True, export_diffusers_text_encoder=True)

    ids = processor.tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    references = {
        "CLIPTextModel": model.to_text_model(),
        "CLIPTextModelWithProjection": model.to_text_model(with_projection=True),
        "CLIPModel": model.to_clip_model(),
    }
    models = {  # name: (folder, class)
        "text": (root / "text", "CLIPTextModel"),
        "text-with-projection": (root / "text-with-projection", "CLIPTextModelWithProjection"),
        "clip": (root / "clip", "CLIPModel"),
        "diffusers-text-encoder": (root / "diffusers-text-encoder" / "text_encoder", "CLIPTextModel"),
        "push-clip": (root / "hub" / "clip", "CLIPModel"),
        "push-text-encoder": (root / "hub" / "text_encoder", "CLIPTextModel"),
    }
    tokenizers = {
        "text": root / "text",
        "text-with-projection": root / "text-with-projection",
        "clip": root / "clip",
        "diffusers-text-encoder": root / "diffusers-text-encoder" / "tokenizer",
        "push-clip": root / "hub" / "clip",
        "push-tokenizer": root / "hub" / "tokenizer",
    }
    expected_tokenizers = {
        "diffusers-text-encoder": _pad_longclip(processor.tokenizer),
        "push-tokenizer": _pad_longclip(processor.tokenizer),
    }
    return dict(root=root, model=model, processor=processor, ids=ids, pixels=pixels, references=references,
                models=models, tokenizers=tokenizers, expected_tokenizers=expected_tokenizers)


def _pad_longclip(tokenizer):
    from hf_longclip.diffusion import long_prompt_tokenizer

    return long_prompt_tokenizer(tokenizer, 248, "longclip")


def _inputs(exports, class_name: str) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": exports["ids"]}
    if class_name == "CLIPModel":
        inputs["pixel_values"] = exports["pixels"]
    return inputs


def _outputs(model, class_name: str, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return {key: getattr(out, key) for key in OUTPUTS[class_name]}


def _weight_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            names.update(handle.keys())
    return names


# ----------------------------------------------------------------------------------------------- transformers 5
MODEL_FOLDERS = ["text", "text-with-projection", "clip", "diffusers-text-encoder", "push-clip", "push-text-encoder"]


@pytest.mark.parametrize("name", MODEL_FOLDERS)
def test_folder_exports_round_trip_under_transformers_5(exports, name):
    folder, class_name = exports["models"][name]
    files = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files), files
    # the names 4.x expects: the text tower under text_model. (transformers 5 keeps a CLIPTextModel's at the root)
    reference = exports["references"][class_name]
    state_names = set(reference.state_dict())
    expected = {"text_model." + n for n in state_names} if class_name == "CLIPTextModel" else state_names
    assert _weight_names(folder) == expected
    loaded, info = CLASSES[class_name].from_pretrained(folder, output_loading_info=True)
    assert type(loaded) is CLASSES[class_name]
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    inputs = _inputs(exports, class_name)
    for key, expected in _outputs(reference, class_name, inputs).items():
        torch.testing.assert_close(_outputs(loaded.eval(), class_name, inputs)[key], expected, rtol=0, atol=0, msg=key)
    # and the reference is the variant's own text tower
    if class_name == "CLIPTextModel":
        with torch.no_grad():
            own = exports["model"].text_model(input_ids=exports["ids"]).last_hidden_state
        torch.testing.assert_close(_outputs(loaded, class_name, inputs)["last_hidden_state"], own, rtol=0, atol=0)


TOKENIZER_FOLDERS = ["text", "text-with-projection", "clip", "diffusers-text-encoder", "push-clip", "push-tokenizer"]


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_tokenizer_folders_hold_slow_and_fast_files_at_248(exports, name, tmp_path):
    folder = exports["tokenizers"][name]
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in folder.iterdir()
    }
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 248 and "auto_map" not in config and "local_files_only" not in config
    assert config.get("processor_class") in (None, "CLIPProcessor")
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")  # the line 4.x's slow class skips
    expected = exports["expected_tokenizers"].get(name, exports["processor"].tokenizer)
    want = expected(TEXTS, padding="max_length", truncation=True).input_ids
    assert len(want[0]) == 248
    # transformers 5 has one CLIP tokenizer class (CLIPTokenizerFast is an alias); it reads tokenizer.json, and
    # vocab.json + merges.txt alone (the slow files) must describe the same tokenizer
    from transformers import CLIPTokenizerFast

    only_slow_files = tmp_path / "slow"
    shutil.copytree(folder, only_slow_files, ignore=shutil.ignore_patterns("tokenizer.json"))
    for cls, source in ((CLIPTokenizer, folder), (CLIPTokenizerFast, folder), (CLIPTokenizer, only_slow_files)):
        tokenizer = cls.from_pretrained(source)
        assert tokenizer.model_max_length == 248
        assert tokenizer(TEXTS, padding="max_length", truncation=True).input_ids == want, (cls, source)
        assert tokenizer.pad_token_id == expected.pad_token_id


def test_clip_export_processor_loads_without_hf_longclip_code(exports):
    from transformers import AutoProcessor, CLIPProcessor

    for folder in (exports["root"] / "clip", exports["root"] / "hub" / "clip"):
        assert (folder / "preprocessor_config.json").is_file()  # where 4.x image processors look
        assert "LongCLIP" not in (folder / "processor_config.json").read_text()
        processor = AutoProcessor.from_pretrained(folder)
        assert type(processor) is CLIPProcessor and processor.tokenizer.model_max_length == 248


def test_single_file_keys_metadata_and_strict_load(exports):
    root, reference = exports["root"], exports["references"]["CLIPTextModelWithProjection"]
    state = load_file(root / "single.safetensors")
    expected = {k for k in reference.state_dict() if k != "text_projection.weight"}  # already text_model.*
    assert all(k.startswith("text_model.") for k in expected)
    assert set(state) == expected | {"text_projection.weight"}
    # what ComfyUI's loaders look at: a CLIP-L-style layer key and a 248-row position table
    assert "text_model.encoder.layers.0.mlp.fc1.weight" in state
    assert state["text_model.embeddings.position_embedding.weight"].shape == (248, reference.config.hidden_size)
    with safe_open(root / "single.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["max_position_embeddings"] == "248"
    config = CLIPTextConfig(**json.loads(metadata["text_config"]))
    assert config.max_position_embeddings == 248

    with_projection = CLIPTextModelWithProjection(config).eval()
    with_projection.load_state_dict(state, strict=True)  # transformers 5 names it text_model.* + text_projection
    plain = CLIPTextModel(config).eval()  # transformers 5 keeps this one's tower at the root
    plain.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items() if k.startswith("text_model.")},
                          strict=True)
    ids = exports["ids"]
    with torch.no_grad():
        torch.testing.assert_close(with_projection(ids).text_embeds, reference(ids).text_embeds, rtol=0, atol=0)
        torch.testing.assert_close(plain(ids).last_hidden_state, reference(ids).last_hidden_state, rtol=0, atol=0)
    no_projection = load_file(root / "single-noproj.safetensors")
    assert set(no_projection) == expected


def test_single_file_options_and_refusals(exports, tmp_path, capsys):
    model_dir = str(exports["root"] / "model")
    out = tmp_path / "te.fp16.safetensors"
    assert main(["export", "--model", model_dir, "--output", str(out), "--format", "single-file", "--dtype", "fp16"]) == 0
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}
    capsys.readouterr()
    for argv, message in (
        (["--output", str(tmp_path / "te.bin"), "--format", "single-file"], "must end in .safetensors"),
        (["--output", str(tmp_path / "x"), "--format", "text", "--dtype", "fp16"], "apply to --format single-file only"),
    ):
        assert main(["export", "--model", model_dir, *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "te.bin").exists() and not (tmp_path / "x").exists()


def test_pipeline_export_components_are_portable(tmp_path):
    pytest.importorskip("diffusers")
    from hf_longclip.diffusion import (
        export_long_text_components,
        load_long_text_components,
        long_prompt_sdxl_pipeline,
        tiny_longclip,
        tiny_sdxl_base_pipeline,
    )

    pipe = long_prompt_sdxl_pipeline(tiny_sdxl_base_pipeline(), tiny_longclip())
    export_long_text_components(pipe, tmp_path)
    assert all(n.startswith("text_model.") for n in _weight_names(tmp_path / "text_encoder"))
    assert _weight_names(tmp_path / "text_encoder_2") == set(pipe.text_encoder_2.state_dict())  # already 4.x names
    for sub in ("tokenizer", "tokenizer_2"):
        assert (tmp_path / sub / "vocab.json").is_file() and (tmp_path / sub / "merges.txt").is_file()
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        _, info = cls.from_pretrained(tmp_path / sub, output_loading_info=True)
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    components = load_long_text_components(tmp_path)
    ids = components["tokenizer_2"](LONG_PROMPT, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(components["text_encoder_2"](ids).text_embeds, pipe.text_encoder_2(ids).text_embeds)
    # a re-export of what was loaded (5.x then saves with the prefix itself) gives the same names
    export_long_text_components(pipe.__class__(**{**pipe.components, **components}), tmp_path / "again")
    assert _weight_names(tmp_path / "again" / "text_encoder") == _weight_names(tmp_path / "text_encoder")


# ----------------------------------------------------------------------------------------------- transformers 4.x
TF4_REQUIREMENTS = ["transformers<5", "diffusers", "safetensors", "tokenizers"]

CHECK_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch, transformers, diffusers, tokenizers, safetensors
from safetensors.torch import load_file

work = Path(sys.argv[1])
spec = json.loads((work / "spec.json").read_text())
tensors = load_file(work / "tensors.safetensors")
report = {"versions": {m.__name__: m.__version__ for m in (torch, transformers, diffusers, tokenizers, safetensors)},
          "models": {}, "tokenizers": {}, "single_file": {}, "pipelines": {}}

def loading_problems(info):
    keys = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    return {k: [str(x) for x in info.get(k) or []] for k in keys}

for name, entry in spec["models"].items():
    cls = getattr(transformers, entry["class"])
    model, info = cls.from_pretrained(entry["path"], output_loading_info=True)
    model.eval()
    with torch.no_grad():
        out = model(**{k: tensors[v] for k, v in entry["inputs"].items()})
    report["models"][name] = {
        "class": type(model).__name__, "problems": loading_problems(info),
        "positions": model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings")
                     else model.config.text_config.max_position_embeddings,
        "diffs": {k: (getattr(out, k) - tensors[f"{name}/{k}"]).abs().max().item() for k in entry["outputs"]},
    }

for name, entry in spec["tokenizers"].items():
    for cls_name in ("CLIPTokenizer", "CLIPTokenizerFast"):
        tokenizer = getattr(transformers, cls_name).from_pretrained(entry["path"])
        ids = tokenizer(entry["texts"], padding="max_length", truncation=True).input_ids
        report["tokenizers"][f"{name}/{cls_name}"] = {
            "class": type(tokenizer).__name__, "model_max_length": tokenizer.model_max_length,
            "ids_equal": ids == entry["ids"], "pad_token_id": tokenizer.pad_token_id,
        }

for name, entry in spec["single_file"].items():
    state = load_file(entry["path"])
    config = transformers.CLIPTextConfig(**json.loads(entry["config"]))
    model = getattr(transformers, entry["class"])(config).eval()
    result = model.load_state_dict(state, strict=True)  # 4.x names: text_model.* (+ text_projection.weight)
    with torch.no_grad():
        out = model(tensors["input_ids"])
    report["single_file"][name] = {"diffs": {k: (getattr(out, k) - tensors[f"{name}/{k}"]).abs().max().item()
                                             for k in entry["outputs"]}}

for name, entry in spec["pipelines"].items():
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(entry["path"], safety_checker=None,
                                                            requires_safety_checker=False)
    embeds = pipe.encode_prompt(entry["prompt"], "cpu", 1, False)[0]
    report["pipelines"][name] = {"tokenizer": type(pipe.tokenizer).__name__,
                                 "text_encoder": type(pipe.text_encoder).__name__,
                                 "model_max_length": pipe.tokenizer.model_max_length,
                                 "diff": (embeds - tensors[f"{name}/prompt_embeds"]).abs().max().item()}

(work / "report.json").write_text(json.dumps(report, indent=1))
print("OK")
"""


def _cache_dir() -> Path:
    import os

    return Path(os.environ.get("HF_LONGCLIP_TEST_CACHE", Path.home() / ".cache" / "hf_longclip_tests"))


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def transformers4_python() -> Path:
    """A venv with torch (this environment's version), the latest transformers 4.x, a diffusers release pip
    matches to it, safetensors and tokenizers; built once under the test cache folder and reused."""
    torch_version = torch.__version__.split("+")[0]
    requirements = [f"torch=={torch_version}", *TF4_REQUIREMENTS]
    env = _cache_dir() / f"transformers4-py{sys.version_info.major}{sys.version_info.minor}"
    python, marker = env / "bin" / "python", env / "hf_longclip_ready.json"
    if marker.is_file() and python.is_file() and json.loads(marker.read_text()).get("requirements") == requirements:
        return python
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    base_python = getattr(sys, "_base_executable", sys.executable)  # as test_packaging: no pip inside, ours drives it
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(env)], check=True)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *requirements],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        shutil.rmtree(env, ignore_errors=True)
        tail = " ".join(done.stderr.split()[-60:])
        if not _pypi_reachable():
            pytest.skip(f"cannot build the transformers 4.x venv (no network: pypi.org unreachable): {tail}")
        pytest.fail(f"pip could not build the transformers 4.x venv: {tail}")
    show = "import transformers, diffusers; print(transformers.__version__, diffusers.__version__)"
    versions = subprocess.run([python, "-c", show], capture_output=True, text=True, check=True).stdout.split()
    assert versions[0].startswith("4."), versions
    marker.write_text(json.dumps({"requirements": requirements, "transformers": versions[0], "diffusers": versions[1]}))
    return python


def _sd_folder_with_long_components(root: Path, exports) -> tuple[Path, torch.Tensor]:
    """A tiny SD pipeline folder whose text_encoder/ and tokenizer/ are our export (model_index.json names the
    slow CLIPTokenizer), and its transformers 5 prompt embeddings."""
    from diffusers import StableDiffusionPipeline

    from hf_longclip.diffusion import tiny_sd_base_pipeline

    base = tiny_sd_base_pipeline()
    folder = root / "sd-long"
    base.save_pretrained(folder)
    # the export's tokenizer must fit the base's vocabulary: both come from DEFAULT_WORDS
    assert base.tokenizer.get_vocab() == exports["processor"].tokenizer.get_vocab()
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / sub)
        shutil.copytree(exports["root"] / "diffusers-text-encoder" / sub, folder / sub)
    hidden = base.unet.config.cross_attention_dim
    assert hidden == exports["model"].config.text_config.hidden_size
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        return folder, pipe.encode_prompt(LONG_PROMPT, "cpu", 1, False)[0]


@pytest.mark.slow
def test_exports_load_under_transformers_4(exports, transformers4_python, tmp_path):
    pytest.importorskip("diffusers")
    started = time.monotonic()
    tensors = {"input_ids": exports["ids"].contiguous(), "pixel_values": exports["pixels"].contiguous()}
    spec = {"models": {}, "tokenizers": {}, "single_file": {}, "pipelines": {}}
    for name, (folder, class_name) in exports["models"].items():
        inputs = _inputs(exports, class_name)
        for key, value in _outputs(exports["references"][class_name], class_name, inputs).items():
            tensors[f"{name}/{key}"] = value.contiguous()
        spec["models"][name] = {"path": str(folder), "class": class_name, "outputs": list(OUTPUTS[class_name]),
                                "inputs": {k: k for k in inputs}}
    for name, folder in exports["tokenizers"].items():
        expected = exports["expected_tokenizers"].get(name, exports["processor"].tokenizer)
        spec["tokenizers"][name] = {"path": str(folder), "texts": TEXTS,
                                    "ids": expected(TEXTS, padding="max_length", truncation=True).input_ids}
    for name, class_name in (("single", "CLIPTextModelWithProjection"), ("single-noproj", "CLIPTextModel")):
        path = exports["root"] / f"{name}.safetensors"
        with safe_open(path, framework="pt") as handle:
            config = handle.metadata()["text_config"]
        for key, value in _outputs(exports["references"][class_name], class_name, {"input_ids": exports["ids"]}).items():
            tensors[f"{name}/{key}"] = value.contiguous()
        spec["single_file"][name] = {"path": str(path), "class": class_name, "config": config,
                                     "outputs": list(OUTPUTS[class_name])}
    # control: a CLIPTextModel saved by transformers 5's plain save_pretrained (the old export) must be caught
    exports["references"]["CLIPTextModel"].save_pretrained(tmp_path / "plain-save")
    spec["models"]["control-plain-save"] = {**spec["models"]["text"], "path": str(tmp_path / "plain-save")}
    for key in OUTPUTS["CLIPTextModel"]:
        tensors[f"control-plain-save/{key}"] = tensors[f"text/{key}"].clone()
    folder, embeds = _sd_folder_with_long_components(tmp_path, exports)
    tensors["sd/prompt_embeds"] = embeds.contiguous()
    spec["pipelines"]["sd"] = {"path": str(folder), "prompt": LONG_PROMPT}
    save_file(tensors, tmp_path / "tensors.safetensors")
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    done = _run([transformers4_python, "-c", CHECK_SCRIPT, tmp_path], cwd=tmp_path, timeout=900)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"\ntransformers 4.x check ({time.monotonic() - started:.0f} s): {json.dumps(report['versions'])}")
    assert report["versions"]["transformers"].startswith("4.")

    assert set(report["models"]) == set(spec["models"])
    control = report["models"].pop("control-plain-save")
    ignored = control["problems"]["unexpected_keys"]  # 4.x ignores the root names and re-initialises every weight
    assert ignored and len(control["problems"]["missing_keys"]) == len(ignored)
    assert not any(k.startswith("text_model.") for k in ignored) and control["diffs"]["last_hidden_state"] > 1e-2
    for name, result in report["models"].items():
        assert result["class"] == spec["models"][name]["class"]
        assert not any(result["problems"].values()), (name, result["problems"])
        assert result["positions"] == 248
        assert max(result["diffs"].values()) <= 1e-5, (name, result["diffs"])
        print(f"  {name}: {result['class']}, 0 missing / unexpected, max |diff| {max(result['diffs'].values()):.2e}")
    assert len(report["tokenizers"]) == 2 * len(spec["tokenizers"])
    for name, result in report["tokenizers"].items():
        assert result["class"] == name.split("/")[1], (name, result)  # the slow class really is the slow one
        assert result["model_max_length"] == 248 and result["ids_equal"], (name, result)
    for name, result in report["single_file"].items():
        assert max(result["diffs"].values()) <= 1e-5, (name, result)
        print(f"  {name}.safetensors: load_state_dict(strict=True) into {spec['single_file'][name]['class']}, "
              f"max |diff| {max(result['diffs'].values()):.2e}")
    sd = report["pipelines"]["sd"]
    assert sd["tokenizer"] == "CLIPTokenizer" and sd["model_max_length"] == 248 and sd["diff"] <= 1e-5, sd
    print(f"  SD pipeline with the exported text_encoder/ + tokenizer/ (slow CLIPTokenizer): max |diff| {sd['diff']:.2e}")
