"""FG-OVD: pick the right fine-grained caption for a box, from region features pooled out of the patch tokens.

A box counts when its positive caption scores strictly above every negative; region features are an area-weighted
average of the projected patch tokens. See docs/evaluation.md (What is computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.modeling_longclip import check_pixel_values
from .metrics import pairwise_accuracy
from .readers import FGOVDSet
from .retrieval import EvalSettings, autocast_context, encode_texts, image_batches, model_device, unreadable_summary


def processed_geometry(image_processor) -> tuple[int, int, int]:
    """`(shortest_edge, crop_height, crop_width)` of a CLIP image processor (resize then centre crop)."""
    size = image_processor.size
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", True) else None
    if shortest is None:
        height = size["height"] if isinstance(size, dict) else size.height
        width = size["width"] if isinstance(size, dict) else size.width
        return -1, height, width
    if crop is None:
        return shortest, shortest, shortest
    crop_h = crop["height"] if isinstance(crop, dict) else crop.height
    crop_w = crop["width"] if isinstance(crop, dict) else crop.width
    return shortest, crop_h, crop_w


def box_to_crop(box, image_size, geometry) -> tuple[float, float, float, float]:
    """Map an `(x, y, w, h)` pixel box of the original image to `(x0, y0, x1, y1)` in the processed (cropped) frame."""
    width, height = image_size
    shortest, crop_h, crop_w = geometry
    if shortest == -1:  # plain resize to (height, width)
        sx, sy, ox, oy = crop_w / width, crop_h / height, 0.0, 0.0
    else:
        scale = shortest / min(width, height)
        sx = sy = scale
        ox = (width * scale - crop_w) / 2
        oy = (height * scale - crop_h) / 2
    x, y, w, h = box
    return x * sx - ox, y * sy - oy, (x + w) * sx - ox, (y + h) * sy - oy


def roi_weights(box_xyxy, grid_h: int, grid_w: int, cell_h: float, cell_w: float) -> torch.Tensor:
    """`(grid_h, grid_w)` weights: the area of each patch cell covered by the box (normalised to sum 1)."""
    x0, y0, x1, y1 = box_xyxy
    left = torch.arange(grid_w, dtype=torch.float32) * cell_w
    top = torch.arange(grid_h, dtype=torch.float32) * cell_h
    overlap_x = (torch.clamp(torch.minimum(left + cell_w, torch.tensor(x1)) - torch.maximum(left, torch.tensor(x0)), min=0))
    overlap_y = (torch.clamp(torch.minimum(top + cell_h, torch.tensor(y1)) - torch.maximum(top, torch.tensor(y0)), min=0))
    weights = overlap_y[:, None] * overlap_x[None, :]
    total = weights.sum()
    if total <= 0:
        cx = min(max((x0 + x1) / 2, 0), grid_w * cell_w - 1e-6)
        cy = min(max((y0 + y1) / 2, 0), grid_h * cell_h - 1e-6)
        weights = torch.zeros(grid_h, grid_w)
        weights[int(cy // cell_h), int(cx // cell_w)] = 1.0
        return weights
    return weights / total


def region_features(patch_tokens: torch.Tensor, boxes_xyxy, crop_hw: tuple[int, int]) -> torch.Tensor:
    """Pool boxes out of one image's patch tokens.

    Args:
        patch_tokens (`torch.Tensor` of shape `(num_patches, dim)`): projected patch tokens (no CLS), row-major grid.
        boxes_xyxy (list of 4-tuples): boxes in the processed frame.
        crop_hw (`(int, int)`): processed image height and width.

    Returns:
        `torch.Tensor` of shape `(num_boxes, dim)`, L2-normalised.
    """
    num_patches = patch_tokens.shape[0]
    crop_h, crop_w = crop_hw
    grid_w = round((num_patches * crop_w / crop_h) ** 0.5)
    grid_h = num_patches // grid_w
    if grid_h * grid_w != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a grid for a {crop_h}x{crop_w} image")
    weights = torch.stack(
        [roi_weights(box, grid_h, grid_w, crop_h / grid_h, crop_w / grid_w).flatten() for box in boxes_xyxy]
    ).to(device=patch_tokens.device, dtype=patch_tokens.dtype)
    return F.normalize(weights @ patch_tokens, dim=-1)


@torch.inference_mode()
def evaluate_fgovd_split(model, processor, split: FGOVDSet, settings: EvalSettings | None = None) -> dict:
    """Accuracy on one FG-OVD split; boxes of unreadable images are skipped and counted (images counted by reason:
    ``unreadable_images``, ``unreadable_examples``, ``unreadable_reasons``)."""
    settings = settings or EvalSettings()
    if not hasattr(model, "get_image_token_features"):
        raise TypeError(
            f"FG-OVD pools patch tokens from `get_image_token_features`, which {type(model).__name__} lacks; "
            "load the checkpoint as an hf_longclip model (e.g. LongCLIPModel.from_clip) to evaluate it"
        )
    model.eval()
    device = model_device(model, settings)
    geometry = processed_geometry(processor.image_processor)
    text_embeds = encode_texts(model, processor.tokenizer, split.captions, "global", settings)["text_embeds"]
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    by_image: dict[int, list[int]] = {}
    for b, box in enumerate(split.boxes):
        by_image.setdefault(box.image_index, []).append(b)
    wanted = sorted(by_image)
    region = {}
    failed = []
    for indices, pixels, sizes, bad in image_batches([split.image_paths[i] for i in wanted], processor.image_processor, settings, desc=split.name):
        failed.extend(item._replace(index=wanted[item.index]) for item in bad)  # local -> split image index
        if pixels is None:
            continue
        check_pixel_values(pixels, values=True)  # on the CPU: no device synchronisation
        with autocast_context(device, settings.dtype):
            tokens = model.get_image_token_features(pixels.to(device))
        tokens = tokens[:, -(tokens.shape[1] - 1) :].float()  # drop CLS
        for row, (local, size) in enumerate(zip(indices, sizes)):
            image_index = wanted[local]
            boxes = [box_to_crop(split.boxes[b].box, size, geometry) for b in by_image[image_index]]
            pooled = region_features(tokens[row], boxes, geometry[1:])
            for b, feature in zip(by_image[image_index], pooled):
                region[b] = feature
    scored = sorted(region)
    if not scored:
        return {"accuracy": 0.0, "num_boxes": 0, **unreadable_summary(failed, f"fgovd {split.name}")}
    features = torch.stack([region[b] for b in scored])
    max_neg = max(len(split.boxes[b].negatives) for b in scored)
    negatives = torch.zeros(len(scored), max(max_neg, 1), dtype=torch.long)
    mask = torch.zeros_like(negatives, dtype=torch.bool)
    for row, b in enumerate(scored):
        neg = split.boxes[b].negatives
        negatives[row, : len(neg)] = torch.tensor(neg, dtype=torch.long)
        mask[row, : len(neg)] = True
    text_embeds = text_embeds.to(features.device)
    positive = (features * text_embeds[[split.boxes[b].positive for b in scored]]).sum(-1)
    negative = torch.einsum("nd,nmd->nm", features, text_embeds[negatives.to(features.device)])
    return {
        "accuracy": pairwise_accuracy(positive.cpu(), negative.cpu(), mask),
        "num_boxes": len(scored),
        "skipped_boxes": len(split.boxes) - len(scored),
        **unreadable_summary(failed, f"fgovd {split.name}"),
    }


def evaluate_fgovd(model, processor, splits: list[FGOVDSet], settings: EvalSettings | None = None) -> dict:
    """Accuracy per split (``{"splits": {name: {...}}, "mean_accuracy": ...}``)."""
    per_split = {split.name: evaluate_fgovd_split(model, processor, split, settings) for split in splits}
    mean = sum(r["accuracy"] for r in per_split.values()) / max(len(per_split), 1)
    return {"splits": per_split, "mean_accuracy": mean}


__all__ = ["box_to_crop", "evaluate_fgovd", "evaluate_fgovd_split", "processed_geometry", "region_features", "roi_weights"]
