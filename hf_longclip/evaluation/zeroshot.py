"""Zero-shot classification from a folder of class-named sub-folders.

Each class is embedded as the normalised mean of its normalised prompt embeddings (one prompt per template, CLIP's
prompt ensembling); images are classified by cosine with the class embeddings. Global (CLS / EOT) embeddings only:
fine-grained scoring modes compare one image with one text and have no class-ensemble form.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .metrics import topk_accuracy
from .readers import ClassificationSet
from .retrieval import (
    EvalSettings,
    _no_readable_images,
    encode_images,
    encode_texts,
    unreadable_summary,
)

#: A small generic prompt ensemble; pass your own (or a file) for a specific data set.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a drawing of a {}.",
)


def load_templates(source: str | Path | Sequence[str] | None) -> list[str]:
    """Templates from a sequence, a text file (one template with ``{}`` per line) or the defaults."""
    if source is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source = [line.strip() for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    templates = [source] if isinstance(source, str) else list(source)
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"every template needs a '{{}}' placeholder for the class name; got {bad or templates}")
    return templates


@torch.inference_mode()
def class_embeddings(model, tokenizer, class_names: Sequence[str], templates: Sequence[str], settings: EvalSettings | None = None) -> torch.Tensor:
    """`(num_classes, dim)` normalised class embeddings (mean of the normalised template embeddings)."""
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = encode_texts(model, tokenizer, prompts, "global", settings)["text_embeds"].float()
    embeds = F.normalize(embeds, dim=-1).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(embeds, dim=-1)


def evaluate_zeroshot(
    model, processor, dataset: ClassificationSet, templates: Sequence[str] | str | Path | None = None, settings: EvalSettings | None = None
) -> dict:
    """Top-1 / top-5 accuracy (percent; top-5 is 100 with five classes or fewer). Unreadable images are skipped and
    counted by reason (``unreadable_images``, ``unreadable_examples``, ``unreadable_reasons``)."""
    settings = settings or EvalSettings()
    model.eval()
    templates = load_templates(templates)
    weights = class_embeddings(model, processor.tokenizer, dataset.class_names, templates, settings)
    features, kept, failed = encode_images(model, processor.image_processor, dataset.image_paths, "global", settings)
    if not kept:
        raise _no_readable_images(dataset.name, len(dataset.image_paths), failed)
    logits = F.normalize(features["image_embeds"].float(), dim=-1) @ weights.to(features["image_embeds"].device).t()
    result = topk_accuracy(logits, [dataset.labels[i] for i in kept], (1, 5))
    result.update(
        num_images=len(kept),
        num_classes=len(dataset.class_names),
        num_templates=len(templates),
        **unreadable_summary(failed, dataset.name),
    )
    return result


__all__ = ["DEFAULT_TEMPLATES", "class_embeddings", "evaluate_zeroshot", "load_templates"]
