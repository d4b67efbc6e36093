"""Model cards, Hub-ready folders and one-commit pushes (`render_model_card`, `save_for_hub`, `push_to_hub`).

See docs/evaluation.md (Model cards, Publishing).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import OfflineModeIsEnabled

from .resources import shipped_dir
from .variants import get_variant


def _template_dir() -> Path:
    """``$HF_LONGCLIP_CARD_TEMPLATES``, else the templates shipped in the wheel (``hf_longclip/model_cards/``),
    else ``model_cards/`` at the top of a source checkout (editable installs)."""
    if os.environ.get("HF_LONGCLIP_CARD_TEMPLATES"):
        return Path(os.environ["HF_LONGCLIP_CARD_TEMPLATES"])
    return shipped_dir("model_cards", "model_cards", "base.md")


#: Where the card templates live (see `_template_dir`).
DEFAULT_TEMPLATE_DIR = _template_dir()

_BENCHMARK_INFO = {
    # name: (display name, dataset id for model-index, split)
    "urban1k": ("Urban1k", "urban1k", "test"),
    "sharegpt4v-1k": ("ShareGPT4V-1k", "sharegpt4v-1k", "first-1000"),
    "dci": ("DCI", "dci", "all"),
    "docci": ("DOCCI", "docci", "test"),
    "coco": ("COCO 5k (Karpathy test)", "coco-karpathy", "test"),
    "coco-val2017": ("COCO val2017", "coco", "val2017"),
    "flickr30k": ("Flickr30k 1k (Karpathy test)", "flickr30k-karpathy", "test"),
    "fgovd": ("FG-OVD", "fg-ovd", "benchmark"),
    "zeroshot": ("Zero-shot classification", "local-class-folders", "all"),
}


def _load_results(results: str | os.PathLike | Mapping | None) -> dict | None:
    """The results dict of a path or mapping; a one-line error for a missing / unreadable file or invalid JSON."""
    if results is None:
        return None
    if isinstance(results, Mapping):
        return dict(results)
    path = Path(results)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(results)!r} not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise OSError(f"cannot read results file {str(results)!r}: {error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"results file {str(results)!r} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"results file {str(results)!r} holds a {type(data).__name__}, not the object `hf-longclip evaluate` writes")
    return data


def check_results(results: str | os.PathLike | Mapping | None) -> dict | None:
    """The results of `results` (a path or mapping) if they are what :func:`hf_longclip.evaluation.evaluate` writes
    (an object with a ``"benchmarks"`` mapping), else a one-line `FileNotFoundError` / `ValueError`."""
    data = _load_results(results)
    if data is not None and not isinstance(data.get("benchmarks"), Mapping):
        where = f"results file {str(results)!r}" if not isinstance(results, Mapping) else "the results"
        raise ValueError(f"{where} has no 'benchmarks' mapping; pass the JSON `hf-longclip evaluate --output` writes")
    return data


def check_push_inputs(repo_id: str, results: str | os.PathLike | Mapping | None = None) -> dict | None:
    """What a push needs before anything touches the Hub: not offline, a valid repository id, readable results.

    Raises:
        `huggingface_hub.errors.OfflineModeIsEnabled` (a `ConnectionError`) when ``HF_HUB_OFFLINE`` is set,
        `ValueError` for a malformed `repo_id` (``"namespace/name"`` or ``"name"``) or results that are not
        `hf-longclip evaluate` output, `FileNotFoundError` for a missing results file.

    Returns:
        The loaded results (or None).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    if constants.HF_HUB_OFFLINE:
        raise OfflineModeIsEnabled(
            "pushing needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to push"
        )
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"invalid repository id {repo_id!r}: expected 'namespace/name'")
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ValueError(f"invalid repository id {repo_id!r}: {' '.join(str(error).split())}") from None
    return check_results(results)


def _is_hard_negative(name: str) -> bool:
    """Whether a benchmark name of a results JSON is a ``hardneg:<file>`` hard-negative score."""
    return name.startswith("hardneg:")


def eval_results_from_json(results: str | os.PathLike | Mapping) -> list[EvalResult]:
    """``EvalResult`` entries (model-index) from a results JSON of :func:`hf_longclip.evaluation.evaluate`.

    Retrieval: task ``text-to-image-retrieval`` / ``image-to-text-retrieval``, metric ``recall@k``; FG-OVD: task
    ``fine-grained-region-text-matching``, metric ``accuracy`` per split (``dataset_config``); zero-shot: task
    ``zero-shot-image-classification``, ``top-1`` / ``top-5`` accuracy. Values are percentages.
    """
    data = _load_results(results) or {}
    scoring = data.get("scoring", "global")
    out: list[EvalResult] = []
    for name, metrics in data.get("benchmarks", {}).items():
        display, dataset_type, split = _BENCHMARK_INFO.get(name, (name, name, "test"))
        if name == "fgovd":
            for split_name, split_metrics in metrics.get("splits", {}).items():
                out.append(EvalResult(
                    task_type="fine-grained-region-text-matching", dataset_type=dataset_type, dataset_name=display,
                    dataset_config=split_name, dataset_split=split, metric_type="accuracy",
                    metric_name=f"Accuracy ({split_name})", metric_value=round(float(split_metrics["accuracy"]), 2),
                ))
        elif _is_hard_negative(name):
            if "accuracy" in metrics:
                out.append(EvalResult(
                    task_type="image-text-matching", dataset_type="hard-negatives", dataset_name=name.split(":", 1)[1],
                    dataset_split="test", metric_type="accuracy", metric_name="Hard-negative accuracy",
                    metric_value=round(float(metrics["accuracy"]), 2),
                ))
        elif name == "zeroshot":
            for key in ("top1", "top5"):
                if key in metrics:
                    out.append(EvalResult(
                        task_type="zero-shot-image-classification", dataset_type=dataset_type, dataset_name=display,
                        dataset_split=split, metric_type="accuracy", metric_name=f"Top-{key[3:]} accuracy",
                        metric_value=round(float(metrics[key]), 2),
                    ))
        else:
            for direction, task in (("t2i", "text-to-image-retrieval"), ("i2t", "image-to-text-retrieval")):
                for key, value in metrics.items():
                    if key.startswith(f"{direction}_R@"):
                        k = key.split("@")[1]
                        out.append(EvalResult(
                            task_type=task, dataset_type=dataset_type, dataset_name=display, dataset_split=split,
                            metric_type=f"recall@{k}", metric_name=f"{direction.upper()} R@{k} ({scoring})",
                            metric_value=round(float(value), 2),
                        ))
    return out


def evaluation_markdown(results: str | os.PathLike | Mapping | None) -> str:
    """A markdown summary of a results JSON (retrieval table, FG-OVD table, zero-shot lines)."""
    data = _load_results(results)
    if not data or not data.get("benchmarks"):
        return "No evaluation results were attached to this card. Run `hf-longclip evaluate` and push with `--results`."
    benches = data["benchmarks"]
    lines = [
        f"Scoring: `{data.get('scoring', 'global')}`; settings: `{json.dumps(data.get('settings', {}))}`. "
        "Recall in percent; image-to-text counts a hit when any of the image's captions is in the top k; "
        "ties are counted against the model.",
        "",
    ]
    retrieval = [(n, m) for n, m in benches.items() if n not in ("fgovd", "zeroshot") and not _is_hard_negative(n)]
    if retrieval:
        lines += [
            "| Benchmark | images | texts | T2I R@1 | T2I R@5 | T2I R@10 | I2T R@1 | I2T R@5 | I2T R@10 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in retrieval:
            cells = [f"{m.get(f'{d}_R@{k}', float('nan')):.2f}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
            lines.append(f"| {_BENCHMARK_INFO.get(name, (name,))[0]} | {m.get('num_images')} | {m.get('num_texts')} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fgovd" in benches:
        lines += ["| FG-OVD split | boxes | accuracy |", "|---|---|---|"]
        for split, m in benches["fgovd"].get("splits", {}).items():
            lines.append(f"| {split} | {m.get('num_boxes')} | {m['accuracy']:.2f} |")
        lines.append("")
    hard = [(n, m) for n, m in benches.items() if _is_hard_negative(n)]
    if hard:
        lines += ["| Hard-negative file | images | accuracy | mean rank | chance |", "|---|---|---|---|---|"]
        for name, m in hard:
            lines.append(
                f"| {name.split(':', 1)[1]} | {m.get('num_images')} | {m.get('accuracy', float('nan')):.2f} | "
                f"{m.get('mean_rank', float('nan')):.2f} | {m.get('chance', float('nan')):.2f} |"
            )
        lines.append("")
    if "zeroshot" in benches:
        m = benches["zeroshot"]
        lines.append(f"Zero-shot classification ({m.get('num_classes')} classes, {m.get('num_images')} images): "
                     f"top-1 {m.get('top1', float('nan')):.2f}, top-5 {m.get('top5', float('nan')):.2f}.")
    unreadable = {n: m.get("unreadable_images", 0) for n, m in benches.items() if m.get("unreadable_images")}
    if unreadable:
        lines.append(f"\nUnreadable images skipped: {unreadable}.")
    return "\n".join(lines).rstrip() + "\n"


def render_model_card(
    model,
    results: str | os.PathLike | Mapping | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | Sequence[str] | None = None,
    datasets: str | Sequence[str] | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] | None = None,
    training_recipe: str | Mapping | None = None,
    has_clip_export: bool = False,
    has_diffusers_export: bool = False,
    template_dir: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the model card of `model` from ``model_cards/`` templates.

    Args:
        model: a saved-or-in-memory hf_longclip model (its `config.model_type` picks the variant section).
        results: the evaluation results JSON (path or dict) -> ``model-index`` and an evaluation section.
        repo_id (`str`, *optional*): used in the usage snippet (defaults to `model_name`).
        base_model, datasets, license, tags: card metadata. `base_model` defaults to the config's
            ``_name_or_path`` when that looks like a Hub id.
        training_recipe (`str` or mapping, *optional*): this checkpoint's training settings (a mapping is shown as
            YAML); without it the card shows the authors' reference recipe.
        has_clip_export, has_diffusers_export (`bool`): mention the ``clip/`` / ``text_encoder/`` sub-folders.
        template_dir: folder holding ``base.md`` and ``<variant>.md``.

    Returns:
        `huggingface_hub.ModelCard`; ``str(card)`` is the README.md text.
    """
    import jinja2

    template_dir = Path(template_dir or DEFAULT_TEMPLATE_DIR)
    base_template = template_dir / "base.md"
    if not base_template.is_file():
        raise FileNotFoundError(
            f"model card template {base_template} not found; pass template_dir= or set HF_LONGCLIP_CARD_TEMPLATES"
        )
    config = model.config
    variant = get_variant(config)
    model_type = variant.name
    section_file = template_dir / f"{model_type}.md"
    if not section_file.is_file():
        raise FileNotFoundError(f"model card section {section_file} of the {variant.title} variant not found")
    variant_section = jinja2.Template(section_file.read_text(encoding="utf-8")).render(config=config).strip()
    repo_id = repo_id or model_name or "path/to/this/model"
    model_name = model_name or repo_id.rstrip("/").split("/")[-1]
    if base_model is None:
        source = getattr(config, "_name_or_path", "") or ""
        base_model = source if source.count("/") == 1 and not os.path.exists(source) else None
    if isinstance(datasets, str):
        datasets = [datasets]
    eval_results = eval_results_from_json(results) if results is not None else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=sorted({"clip", "hf_longclip", "long-text", "image-text-retrieval", *variant.tags, *(tags or [])}),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    if training_recipe is None:
        training_section = variant.reference_recipe
    elif isinstance(training_recipe, Mapping):
        training_section = "Settings of this run:\n\n```yaml\n" + yaml.safe_dump(dict(training_recipe), sort_keys=False) + "```"
    else:
        training_section = str(training_recipe)
    text_config = config.text_config
    vision_config = config.vision_config
    return ModelCard.from_template(
        card_data,
        template_str=base_template.read_text(encoding="utf-8"),
        model_name=model_name,
        repo_id=repo_id,
        summary=variant.summary,
        variant_title=variant.title,
        model_type=model_type,
        base_model_text=f"`{base_model}`" if isinstance(base_model, str) else (", ".join(base_model) if base_model else "not recorded"),
        text_length=text_config.max_position_embeddings,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        projection_dim=config.projection_dim,
        license=license,
        variant_section=variant_section,
        training_section=training_section,
        evaluation_section=evaluation_markdown(results),
        has_clip_export=has_clip_export,
        has_diffusers_export=has_diffusers_export,
    )


def save_for_hub(
    model,
    processor,
    save_directory: str | os.PathLike,
    *,
    card: ModelCard | str | None = None,
    export_clip: bool = False,
    export_diffusers_text_encoder: bool = False,
    safe_serialization: bool = True,
    **card_kwargs,
) -> Path:
    """Write what a repository holds into `save_directory`.

    Layout: the variant model (safetensors, ``config.json`` with ``auto_map`` and the copied modeling code), the
    processor files, ``README.md``; with `export_clip` a stock ``CLIPModel`` + ``CLIPProcessor`` in ``clip/``; with
    `export_diffusers_text_encoder` ``text_encoder/`` (``CLIPTextModel`` from ``model.to_text_model()``) and
    ``tokenizer/`` (248-token tokenizer padding with id 0, the authors' SD convention). The exports are written by
    :mod:`hf_longclip.export`, as ``hf-longclip export`` writes them, and load under transformers 4.x and 5.

    Args:
        card: a rendered card (or README text); default: :func:`render_model_card` with `card_kwargs`.
    """
    from .export import save_clip_processor, save_model

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if export_clip:  # the same writers as `hf-longclip export --format clip`: loads under transformers 4.x and 5
        save_model(model.to_clip_model(), folder / "clip")
        save_clip_processor(processor.image_processor, processor.tokenizer, folder / "clip")
    if export_diffusers_text_encoder:
        from .diffusion import export_text_encoder

        export_text_encoder(model.to_text_model(), folder, processor.tokenizer)
    if card is None:
        card = render_model_card(
            model, has_clip_export=export_clip, has_diffusers_export=export_diffusers_text_encoder, **card_kwargs
        )
    (folder / "README.md").write_text(str(card), encoding="utf-8")
    return folder


def push_to_hub(
    model,
    processor,
    repo_id: str,
    *,
    results: str | os.PathLike | Mapping | None = None,
    card: ModelCard | str | None = None,
    export_clip: bool = False,
    export_diffusers_text_encoder: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    **card_kwargs,
):
    """Upload model, processor, card and optional exports to `repo_id` in one commit.

    Every input is checked, and everything is written locally (model, processor, exports, the rendered card), before
    the Hub is contacted (`check_push_inputs`: offline mode, the repository id, the results), so a bad input leaves
    no empty repository behind. The repository is then created if missing (`private` applies then); a `revision`
    branch is created from the default branch if missing. With `create_pr` the commit opens a pull request (against
    `revision` when given).

    Args:
        model, processor: the variant model and its `LongCLIPProcessor`.
        repo_id (`str`): ``"namespace/name"``.
        results: evaluation results JSON for the card (see :func:`render_model_card`).
        card: a ready card instead of rendering one.
        export_clip, export_diffusers_text_encoder: see :func:`save_for_hub`.
        commit_message, commit_description, revision, private, create_pr, token: passed to huggingface_hub.
        endpoint (`str`, *optional*): Hub endpoint (default ``HF_ENDPOINT`` / huggingface.co).
        card_kwargs: more :func:`render_model_card` arguments (``base_model``, ``datasets``, ``license``, ...).

    Returns:
        `huggingface_hub.CommitInfo` (``.oid``, ``.commit_url``, ``.pr_url``).

    Raises:
        What `check_push_inputs` raises, before anything is uploaded; the card's and the exports' own errors, also
        before; `ConnectionError` naming the endpoint when the Hub cannot be reached; the Hub's HTTP errors
        (`huggingface_hub.errors.HfHubHTTPError`, an `OSError`: authentication, permissions).
    """
    results = check_push_inputs(repo_id, results)
    variant = get_variant(model).title
    card_kwargs.setdefault("repo_id", repo_id)
    with tempfile.TemporaryDirectory(prefix="hf_longclip_push_") as folder:
        save_for_hub(
            model,
            processor,
            folder,
            card=card,
            export_clip=export_clip,
            export_diffusers_text_encoder=export_diffusers_text_encoder,
            results=results,
            **card_kwargs,
        )
        # create_commit, not upload_folder: upload_folder may split a folder into several commits (its xet
        # pipeline) and refuses create_pr together with a revision.
        root = Path(folder)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(root).as_posix(), path_or_fileobj=str(path))
            for path in sorted(root.rglob("*"))
            if path.is_file()
        ]
        api = HfApi(endpoint=endpoint, token=token)
        with _hub_errors(api.endpoint):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or f"Upload {variant} model, processor and model card",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )


@contextlib.contextmanager
def _hub_errors(endpoint: str):
    """Turn a transport failure of the HTTP client (no network, DNS, refused connection, timeout), which is neither
    an `OSError` nor a `ValueError`, into a one-line `ConnectionError` naming the endpoint. The Hub's own answers
    (`HfHubHTTPError`, an `OSError`) and argument errors pass through unchanged."""
    try:
        yield
    except (OSError, ValueError, TypeError):
        raise
    except Exception as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise ConnectionError(f"cannot reach the Hub at {endpoint}: {type(error).__name__}: {message}") from error


__all__ = [
    "DEFAULT_TEMPLATE_DIR",
    "check_push_inputs",
    "check_results",
    "eval_results_from_json",
    "evaluation_markdown",
    "push_to_hub",
    "render_model_card",
    "save_for_hub",
]
