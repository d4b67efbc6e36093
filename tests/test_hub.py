"""Model cards (parse, numbers, runnable usage snippet) and the push -> download round trip through a local
Hub endpoint (tests/fake_hub.py) with the real huggingface_hub client."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer

from hf_longclip import BetaCLIPModel, FineLIPModel, FixCLIPModel, LongCLIPModel, MulCLIPModel
from hf_longclip.hub import eval_results_from_json, push_to_hub, render_model_card, save_for_hub
from hf_longclip.testing_utils import tiny_clip

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402

RESULTS = {
    "model": "tiny",
    "scoring": "global",
    "settings": {"batch_size": 4, "dtype": "fp32", "device": "cpu"},
    "benchmarks": {
        "urban1k": {"t2i_R@1": 78.9, "t2i_R@5": 95.1, "t2i_R@10": 97.7, "i2t_R@1": 81.3, "i2t_R@5": 96.0,
                    "i2t_R@10": 98.2, "num_images": 1000, "num_texts": 1000, "unreadable_images": 0},
        "coco": {"t2i_R@1": 40.4, "t2i_R@5": 65.8, "t2i_R@10": 75.9, "i2t_R@1": 57.6, "i2t_R@5": 80.4,
                 "i2t_R@10": 87.9, "num_images": 5000, "num_texts": 25000, "unreadable_images": 2},
        "fgovd": {"splits": {"1_attributes": {"accuracy": 45.25, "num_boxes": 100},
                             "color": {"accuracy": 30.5, "num_boxes": 50}}, "mean_accuracy": 37.875},
        "zeroshot": {"top1": 61.0, "top5": 88.5, "num_classes": 10, "num_images": 200},
    },
}


def _inputs(processor):
    text = processor(text=["a red circle next to a blue square " * 5, "a dog"], return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return text, pixels


def _outputs(model, processor):
    text, pixels = _inputs(processor)
    with torch.no_grad():
        return (
            model.get_text_features(**text).pooler_output,
            model.get_image_features(pixel_values=pixels).pooler_output,
        )


# ----------------------------------------------------------------------------------------------- cards
@pytest.mark.parametrize(
    "cls, title",
    [(LongCLIPModel, "Long-CLIP"), (FineLIPModel, "FineLIP"), (BetaCLIPModel, "beta-CLIP"), (FixCLIPModel, "Fix-CLIP"),
     (MulCLIPModel, "MulCLIP")],
)
def test_card_parses_and_carries_the_numbers(processor, cls, title):
    extra = {"num_groups": 2, "group_align_start": 1} if cls is FixCLIPModel else {}  # tiny towers: 2 layers
    model = cls.from_clip(tiny_clip(processor=processor), **extra)
    card = render_model_card(model, RESULTS, repo_id="me/tiny", base_model="openai/clip-vit-base-patch16",
                             datasets=["Lin-Chen/ShareGPT4V"], training_recipe={"learning_rate": 1e-6, "epochs": 2})
    parsed = ModelCard(str(card))
    data = parsed.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.base_model == "openai/clip-vit-base-patch16" and data.datasets == ["Lin-Chen/ShareGPT4V"]
    assert data.license == "apache-2.0" and "hf_longclip" in data.tags
    found = {(r.task_type, r.dataset_name, r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    assert found[("text-to-image-retrieval", "Urban1k", None, "recall@1")] == 78.9
    assert found[("image-to-text-retrieval", "COCO 5k (Karpathy test)", None, "recall@10")] == 87.9
    assert found[("fine-grained-region-text-matching", "FG-OVD", "color", "accuracy")] == 30.5
    assert len(data.eval_results) == 2 * 6 + 2 + 2
    text = parsed.text
    assert f"## {title}" in text and "| Urban1k | 1000 | 1000 | 78.90 |" in text and "| color | 50 | 30.50 |" in text
    assert "learning_rate: 1.0e-06" in text and "Unreadable images skipped: {'coco': 2}" in text
    assert "{{" not in str(card)  # every template variable was filled


def test_eval_results_from_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RESULTS))
    assert [r.metric_value for r in eval_results_from_json(path)] == [r.metric_value for r in eval_results_from_json(RESULTS)]


def test_usage_snippet_runs_as_pasted(tmp_path, processor, longclip_model):
    """The card's python block runs in a fresh interpreter that never imports hf_longclip (remote code path)."""
    folder = tmp_path / "repo"
    save_for_hub(longclip_model, processor, folder, repo_id=str(folder), results=RESULTS)
    readme = (folder / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert "import hf_longclip" not in snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", snippet + "\nassert probs.shape == (1, 2)\nprint('OK', probs.sum().item())"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK 1.0" in done.stdout or "OK 0.99" in done.stdout


# ----------------------------------------------------------------------------------------------- Hub round trip
@pytest.fixture
def fake_hub(monkeypatch):
    """Point huggingface_hub at a local fake Hub and lift HF_HUB_OFFLINE for this test only.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE into `huggingface_hub.constants` at import time, and both the
    client and transformers read those module attributes at call time, so patching the attributes is enough.
    """
    import huggingface_hub.constants as constants

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub


def test_push_then_download_gives_identical_outputs(fake_hub, tmp_path, processor, longclip_model):
    info = push_to_hub(
        longclip_model, processor, "me/tiny-longclip", results=RESULTS, export_clip=True,
        export_diffusers_text_encoder=True, commit_message="Upload tiny Long-CLIP", endpoint=fake_hub.endpoint,
    )
    commits = [path for method, path in fake_hub.requests if method == "POST" and "/commit/" in path]
    assert len(commits) == 1  # model, processor, card and both exports in one commit
    repo = fake_hub.repos["me/tiny-longclip"]
    assert repo.messages[info.oid] == "Upload tiny Long-CLIP"
    files = set(repo.commits[info.oid])
    assert {"config.json", "model.safetensors", "README.md", "modeling_longclip.py", "configuration_longclip.py",
            "clip/config.json", "clip/model.safetensors", "text_encoder/config.json", "tokenizer/tokenizer_config.json"} <= files
    assert json.loads(repo.commits[info.oid]["config.json"])["auto_map"]["AutoModel"].endswith("LongCLIPModel")

    cache = tmp_path / "cache"
    loaded = AutoModel.from_pretrained("me/tiny-longclip", cache_dir=cache)
    assert type(loaded) is LongCLIPModel
    for a, b in zip(_outputs(longclip_model, processor), _outputs(loaded, processor)):
        assert torch.equal(a, b)
    loaded_processor = AutoProcessor.from_pretrained("me/tiny-longclip", cache_dir=cache)
    text, _ = _inputs(processor)
    assert torch.equal(loaded_processor(text=["a red circle next to a blue square " * 5, "a dog"], return_tensors="pt")["input_ids"], text["input_ids"])

    clip = CLIPModel.from_pretrained("me/tiny-longclip", subfolder="clip", cache_dir=cache)
    for a, b in zip(_outputs(longclip_model, processor), _outputs(clip, processor)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    encoder = CLIPTextModel.from_pretrained("me/tiny-longclip", subfolder="text_encoder", cache_dir=cache)
    tokenizer = CLIPTokenizer.from_pretrained("me/tiny-longclip", subfolder="tokenizer", cache_dir=cache)
    assert tokenizer.model_max_length == 248 and encoder.config.max_position_embeddings == 248
    with torch.no_grad():
        ids = text["input_ids"]
        torch.testing.assert_close(encoder(input_ids=ids).last_hidden_state, longclip_model.text_model(input_ids=ids).last_hidden_state)
    card = ModelCard(repo.commits[info.oid]["README.md"].decode())
    assert any(r.metric_value == 78.9 for r in card.data.eval_results)


def test_push_revision_private_and_pull_request(fake_hub, processor):
    model = FineLIPModel.from_clip(tiny_clip(processor=processor))
    first = push_to_hub(model, processor, "org/tiny-finelip", private=True, revision="dev", commit_message="to dev",
                        endpoint=fake_hub.endpoint)
    repo = fake_hub.repos["org/tiny-finelip"]
    assert repo.private and repo.refs["dev"] == first.oid and repo.refs["main"] != first.oid
    pr = push_to_hub(model, processor, "org/tiny-finelip", create_pr=True, commit_message="as a PR", endpoint=fake_hub.endpoint)
    assert pr.pr_url.endswith("/org/tiny-finelip/discussions/1") and repo.refs["refs/pr/1"] == pr.oid
    assert repo.refs["main"] != pr.oid  # a PR leaves main alone
    loaded = AutoModel.from_pretrained("org/tiny-finelip", revision="dev")
    assert type(loaded) is FineLIPModel
    for a, b in zip(_outputs(model, processor), _outputs(loaded, processor)):
        assert torch.equal(a, b)


def test_cli_push(fake_hub, tmp_path, processor, longclip_model):
    from hf_longclip.cli import main

    folder = tmp_path / "model"
    longclip_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    code = main(["push", "--model", str(folder), "--repo-id", "me/from-cli", "--results", str(results),
                 "--commit-message", "cli push", "--endpoint", fake_hub.endpoint, "--base-model", "openai/clip-vit-base-patch16"])
    assert code == 0
    repo = fake_hub.repos["me/from-cli"]
    head = repo.refs["main"]
    assert repo.messages[head] == "cli push"
    card = ModelCard(repo.commits[head]["README.md"].decode())
    assert card.data.base_model == "openai/clip-vit-base-patch16"


# ----------------------------------------------------------------------------------------------- bad pushes
def _closed_port_endpoint() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


@pytest.fixture
def repo_creations(monkeypatch):
    """Every `HfApi.create_repo` call (they still go through)."""
    from huggingface_hub import HfApi

    calls = []
    original = HfApi.create_repo

    def recorded(self, repo_id, *args, **kwargs):
        calls.append(repo_id)
        return original(self, repo_id, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", recorded)
    return calls


def test_push_checks_every_input_before_creating_the_repo(fake_hub, repo_creations, tmp_path, processor, longclip_model):
    """A bad repository id, a missing / invalid results file or a card that cannot be rendered fails before the Hub
    is contacted, so no empty repository is left behind."""
    not_json = tmp_path / "not.json"
    not_json.write_text("{oops")
    no_benchmarks = tmp_path / "other.json"
    no_benchmarks.write_text(json.dumps({"accuracy": 1}))
    cases = [
        (dict(repo_id="bad repo id!!"), ValueError, "invalid repository id"),
        (dict(repo_id="me/x", results=tmp_path / "missing.json"), FileNotFoundError, "not found"),
        (dict(repo_id="me/x", results=not_json), ValueError, "not valid JSON"),
        (dict(repo_id="me/x", results=no_benchmarks), ValueError, "no 'benchmarks'"),
        (dict(repo_id="me/x", template_dir=tmp_path / "no_templates"), FileNotFoundError, "template"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            push_to_hub(longclip_model, processor, endpoint=fake_hub.endpoint, **kwargs)
    assert repo_creations == [] and fake_hub.repos == {} and fake_hub.requests == []


def test_push_offline_and_without_network_fail_cleanly(monkeypatch, repo_creations, processor, longclip_model):
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineModeIsEnabled, match="HF_HUB_OFFLINE"):
        push_to_hub(longclip_model, processor, "me/x")
    assert repo_creations == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint = _closed_port_endpoint()
    with pytest.raises(ConnectionError, match=f"cannot reach the Hub at {endpoint}"):
        push_to_hub(longclip_model, processor, "me/x", endpoint=endpoint)


def test_cli_push_fails_in_one_line(monkeypatch, repo_creations, tmp_path, capsys, processor, longclip_model):
    import huggingface_hub.constants as constants

    import hf_longclip.cli as cli

    folder = tmp_path / "model"
    longclip_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loads = []
    load = cli._load_model_and_processor
    monkeypatch.setattr(cli, "_load_model_and_processor", lambda *a, **k: loads.append(a) or load(*a, **k))

    def one_error_line() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    base = ["push", "--model", str(folder)]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli.main([*base, "--repo-id", "me/x"]) == 1
    assert "offline" in one_error_line()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert cli.main([*base, "--repo-id", "bad repo id!!"]) == 1
    assert "invalid repository id 'bad repo id!!'" in one_error_line()
    assert cli.main([*base, "--repo-id", "me/x", "--results", str(tmp_path / "missing.json")]) == 1
    assert "missing.json' not found" in one_error_line()
    assert loads == [] and repo_creations == []  # refused before the model was even loaded
    endpoint = _closed_port_endpoint()
    assert cli.main([*base, "--repo-id", "me/x", "--endpoint", endpoint]) == 1
    assert f"cannot reach the Hub at {endpoint}" in one_error_line()


def test_card_shows_hard_negative_scores_in_their_own_table(processor, longclip_model):
    """A `hardneg:<file>` result is a hard-negative score, not a retrieval row (which would be all NaN)."""
    from hf_longclip.hub import evaluation_markdown

    results = {**RESULTS, "benchmarks": {**RESULTS["benchmarks"], "hardneg:scenes/hard_negatives.jsonl": {
        "accuracy": 13.0, "mean_rank": 2.9, "chance": 16.67, "chance_mean_rank": 3.5, "num_images": 200,
        "num_negatives": 1000}}}
    markdown = evaluation_markdown(results)
    assert "nan" not in markdown.lower()
    assert "| scenes/hard_negatives.jsonl | 200 | 13.00 | 2.90 | 16.67 |" in markdown
    entries = [r for r in eval_results_from_json(results) if r.dataset_type == "hard-negatives"]
    assert [(r.metric_value, r.dataset_name) for r in entries] == [(13.0, "scenes/hard_negatives.jsonl")]
    card = render_model_card(longclip_model, results, repo_id="me/tiny")
    assert "Hard-negative accuracy" in str(card.data.to_dict())
