"""Readers for the local copies of the evaluation benchmarks.

Every reader takes the ``--data-root`` folder and returns plain lists (image paths, texts, which image each text
describes); nothing is decoded here. A missing folder or file raises :class:`BenchmarkLayoutError`, whose message
spells out the layout the reader expects. The layouts are documented in ``docs/evaluation.md`` and in
:data:`LAYOUTS`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

#: The expected layout of each benchmark under ``--data-root`` (quoted in every layout error).
LAYOUTS: dict[str, str] = {
    "urban1k": "Urban1k/image/<id>.jpg and Urban1k/caption/<id>.txt (one long caption per file, same stem as the image)",
    "sharegpt4v-1k": (
        "sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json (the first 1000 entries are used; caption = "
        "conversations[1].value) and the images at sharegpt4v/<entry['image']>"
    ),
    "dci": (
        "dci/densely_captioned_images/annotations/<name>.json (fields 'image' and 'extra_caption'), "
        "dci/densely_captioned_images/photos/<image> and optionally dci/densely_captioned_images/splits.json "
        "({split: [annotation file names]}; all splits are used)"
    ),
    "docci": (
        "docci/docci_descriptions.jsonlines (one JSON object per line with 'example_id', 'split', 'image_file', "
        "'description'; split 'test' is used) and docci/images/<image_file>"
    ),
    "coco": (
        "coco/dataset_coco.json (Karpathy split file; images with split 'test', 5000 images) and the images at "
        "coco/<filepath>/<filename> (e.g. coco/val2014/COCO_val2014_000000391895.jpg)"
    ),
    "coco-val2017": "coco/annotations/captions_val2017.json and coco/val2017/<file_name> (5000 images)",
    "flickr30k": (
        "flickr30k/dataset_flickr30k.json (Karpathy split file; split 'test', 1000 images) and "
        "flickr30k/flickr30k-images/<filename>"
    ),
    "fgovd": (
        "fgovd/benchmarks/<split>.json (COCO-style: 'images' [{id, file_name}], 'categories' [{id, name}] where the "
        "name is a caption, 'annotations' [{image_id, bbox [x, y, w, h], category_id, neg_category_ids}]) and "
        "fgovd/images/<file_name>"
    ),
    "zeroshot": "zeroshot/<class name>/<image files> (one sub-folder per class; '_' in a folder name reads as a space)",
}

#: FG-OVD difficulty / attribute splits, in the order of the benchmark paper.
FGOVD_SPLITS: tuple[str, ...] = (
    "1_attributes",
    "2_attributes",
    "3_attributes",
    "shuffle_negatives",
    "color",
    "material",
    "pattern",
    "transparency",
)


class BenchmarkLayoutError(FileNotFoundError):
    """A benchmark folder or file is missing or malformed; the message names the expected layout."""

    def __init__(self, benchmark: str, problem: str, data_root: str | Path):
        self.benchmark = benchmark
        super().__init__(
            f"{benchmark}: {problem}. Expected under data root {str(data_root)!r}: {LAYOUTS.get(benchmark, '?')} "
            "(see docs/evaluation.md)"
        )


@dataclass
class RetrievalSet:
    """An image-text retrieval benchmark.

    Args:
        name (`str`): benchmark name.
        image_paths (`list[Path]`): one path per image.
        texts (`list[str]`): every caption.
        text_to_image (`list[int]`): for each text, the index of its image in `image_paths`.
        split (`str`): what part of the data set this is (documented per reader).
    """

    name: str
    image_paths: list[Path]
    texts: list[str]
    text_to_image: list[int]
    split: str = ""


@dataclass
class FGOVDBox:
    """One FG-OVD box: image index, `(x, y, w, h)` box in pixels, positive caption index, negative caption indices."""

    image_index: int
    box: tuple[float, float, float, float]
    positive: int
    negatives: list[int]


@dataclass
class FGOVDSet:
    """One FG-OVD split: images, captions (category names) and boxes."""

    name: str
    image_paths: list[Path]
    captions: list[str]
    boxes: list[FGOVDBox] = field(default_factory=list)


@dataclass
class ClassificationSet:
    """A folder of class-named sub-folders: image paths, their labels and the class names."""

    name: str
    image_paths: list[Path]
    labels: list[int]
    class_names: list[str]


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def _require(path: Path, benchmark: str, data_root: Path, kind: str = "file") -> Path:
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        raise BenchmarkLayoutError(benchmark, f"missing {kind} {str(path)!r}", data_root)
    return path


def _load_json(path: Path, benchmark: str, data_root: Path):
    _require(path, benchmark, data_root)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkLayoutError(benchmark, f"{str(path)!r} is not valid JSON ({error})", data_root) from error


def _clean(text: str) -> str:
    return " ".join(text.replace("\n", " ").split())


def read_urban1k(data_root: str | Path) -> RetrievalSet:
    """Urban1k: 1000 urban images, one long caption each (`Urban1k/image/`, `Urban1k/caption/`)."""
    root = Path(data_root)
    base = _require(root / "Urban1k", "urban1k", root, "folder")
    image_dir = _require(base / "image", "urban1k", root, "folder")
    caption_dir = _require(base / "caption", "urban1k", root, "folder")
    images = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not images:
        raise BenchmarkLayoutError("urban1k", f"no images in {str(image_dir)!r}", root)
    texts = []
    for image in images:
        caption = caption_dir / f"{image.stem}.txt"
        _require(caption, "urban1k", root)
        texts.append(_clean(caption.read_text(encoding="utf-8")))
    return RetrievalSet("urban1k", images, texts, list(range(len(images))), split="all 1000")


SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"


def read_sharegpt4v_1k(data_root: str | Path, count: int = 1000) -> RetrievalSet:
    """ShareGPT4V-1k: the first `count` entries of the share-captioner JSON (the split Long-CLIP holds out), read by
    the training reader (`hf_longclip.data.read_sharegpt4v`), so evaluation and training take the same caption."""
    from ..data.sources import read_sharegpt4v

    root = Path(data_root)
    base = _require(root / "sharegpt4v", "sharegpt4v-1k", root, "folder")
    json_path = _require(base / SHAREGPT4V_JSON, "sharegpt4v-1k", root)
    try:
        records = read_sharegpt4v(json_path, image_root=base, split="holdout", holdout=count)
    except (ValueError, json.JSONDecodeError) as error:
        raise BenchmarkLayoutError("sharegpt4v-1k", f"{json_path.name} is not a ShareGPT4V list: {error}", root) from error
    images, texts = [], []
    for record in records:
        if not isinstance(record["image"], str) or not isinstance(record["caption"], str):
            raise BenchmarkLayoutError(
                "sharegpt4v-1k", f"entry {record['id']} lacks an image or a captioner answer (conversations[1])", root
            )
        images.append(Path(record["image"]))
        texts.append(_clean(record["caption"]))
    return RetrievalSet("sharegpt4v-1k", images, texts, list(range(len(images))), split=f"first {len(images)} entries")


def read_dci(data_root: str | Path, caption_field: str = "extra_caption") -> RetrievalSet:
    """DCI: one complete (long) human description per image (`caption_field`, default ``extra_caption``)."""
    root = Path(data_root)
    base = _require(root / "dci" / "densely_captioned_images", "dci", root, "folder")
    annotation_dir = _require(base / "annotations", "dci", root, "folder")
    photo_dir = _require(base / "photos", "dci", root, "folder")
    splits_file = base / "splits.json"
    if splits_file.is_file():
        splits = _load_json(splits_file, "dci", root)
        names = [name for split in splits.values() for name in split]
    else:
        names = sorted(p.name for p in annotation_dir.glob("*.json"))
    if not names:
        raise BenchmarkLayoutError("dci", f"no annotation files in {str(annotation_dir)!r}", root)
    images, texts = [], []
    for name in names:
        annotation = _load_json(annotation_dir / name, "dci", root)
        if "image" not in annotation or caption_field not in annotation:
            raise BenchmarkLayoutError("dci", f"{name} lacks 'image' or {caption_field!r}", root)
        images.append(photo_dir / annotation["image"])
        texts.append(_clean(annotation[caption_field]))
    return RetrievalSet("dci", images, texts, list(range(len(images))), split="all annotated images")


def read_docci(data_root: str | Path, split: str = "test") -> RetrievalSet:
    """DOCCI: the `split` split (5000 test images, one long description each)."""
    root = Path(data_root)
    base = _require(root / "docci", "docci", root, "folder")
    descriptions = _require(base / "docci_descriptions.jsonlines", "docci", root)
    images, texts = [], []
    for line_number, line in enumerate(descriptions.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if entry["split"] != split:
                continue
            images.append(base / "images" / entry["image_file"])
            texts.append(_clean(entry["description"]))
        except (json.JSONDecodeError, KeyError) as error:
            raise BenchmarkLayoutError("docci", f"line {line_number} of {descriptions.name} is malformed ({error})", root) from error
    if not images:
        raise BenchmarkLayoutError("docci", f"no entries with split {split!r}", root)
    return RetrievalSet("docci", images, texts, list(range(len(images))), split=split)


def _read_karpathy(
    name: str, data_root: Path, json_path: Path, image_root: Path, split: str, captions_per_image: int
) -> RetrievalSet:
    data = _load_json(json_path, name, data_root)
    if not isinstance(data, dict) or "images" not in data:
        raise BenchmarkLayoutError(name, f"{json_path.name} has no 'images' list", data_root)
    images, texts, owner = [], [], []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        folder = image_root / entry["filepath"] if entry.get("filepath") else image_root
        index = len(images)
        images.append(folder / entry["filename"])
        for sentence in entry["sentences"][:captions_per_image]:
            texts.append(_clean(sentence["raw"]))
            owner.append(index)
    if not images:
        raise BenchmarkLayoutError(name, f"no images with split {split!r} in {json_path.name}", data_root)
    return RetrievalSet(name, images, texts, owner, split=f"Karpathy {split} ({len(images)} images)")


def read_coco(data_root: str | Path, captions_per_image: int = 5) -> RetrievalSet:
    """COCO 5k: the Karpathy test split (5000 val2014 images, the first 5 captions each)."""
    root = Path(data_root)
    base = _require(root / "coco", "coco", root, "folder")
    return _read_karpathy("coco", root, base / "dataset_coco.json", base, "test", captions_per_image)


def read_coco_val2017(data_root: str | Path, captions_per_image: int = 5) -> RetrievalSet:
    """COCO val2017 (5000 images, the first 5 captions each, images in file order of the annotation file).

    This is the split Long-CLIP's own retrieval script reads; papers' "COCO 5k" tables are usually Karpathy test.
    """
    root = Path(data_root)
    base = _require(root / "coco", "coco-val2017", root, "folder")
    data = _load_json(base / "annotations" / "captions_val2017.json", "coco-val2017", root)
    by_image: dict[int, list[str]] = {}
    for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(annotation["image_id"], []).append(_clean(annotation["caption"]))
    images, texts, owner = [], [], []
    for entry in data["images"]:
        captions = by_image.get(entry["id"], [])[:captions_per_image]
        index = len(images)
        images.append(base / "val2017" / entry["file_name"])
        texts.extend(captions)
        owner.extend([index] * len(captions))
    return RetrievalSet("coco-val2017", images, texts, owner, split="val2017")


def read_flickr30k(data_root: str | Path, captions_per_image: int = 5) -> RetrievalSet:
    """Flickr30k 1k: the Karpathy test split (1000 images, 5 captions each)."""
    root = Path(data_root)
    base = _require(root / "flickr30k", "flickr30k", root, "folder")
    return _read_karpathy(
        "flickr30k", root, base / "dataset_flickr30k.json", base / "flickr30k-images", "test", captions_per_image
    )


def read_fgovd(data_root: str | Path, splits: tuple[str, ...] | list[str] | None = None) -> list[FGOVDSet]:
    """FG-OVD splits (all of :data:`FGOVD_SPLITS` found, or exactly `splits`; a named split that is missing raises)."""
    root = Path(data_root)
    base = _require(root / "fgovd", "fgovd", root, "folder")
    bench_dir = _require(base / "benchmarks", "fgovd", root, "folder")
    if splits is None:
        names = [s for s in FGOVD_SPLITS if (bench_dir / f"{s}.json").is_file()]
        names += sorted(p.stem for p in bench_dir.glob("*.json") if p.stem not in FGOVD_SPLITS)
        if not names:
            raise BenchmarkLayoutError("fgovd", f"no <split>.json in {str(bench_dir)!r}", root)
    else:
        names = list(splits)
    out = []
    for name in names:
        data = _load_json(bench_dir / f"{name}.json", "fgovd", root)
        try:
            categories = {c["id"]: i for i, c in enumerate(data["categories"])}
            captions = [_clean(c["name"]) for c in data["categories"]]
            image_index = {img["id"]: i for i, img in enumerate(data["images"])}
            paths = [base / "images" / img["file_name"] for img in data["images"]]
            boxes = [
                FGOVDBox(
                    image_index[a["image_id"]],
                    tuple(float(v) for v in a["bbox"]),
                    categories[a["category_id"]],
                    [categories[c] for c in a.get("neg_category_ids", [])],
                )
                for a in data["annotations"]
            ]
        except (KeyError, TypeError) as error:
            raise BenchmarkLayoutError("fgovd", f"{name}.json is missing field {error}", root) from error
        out.append(FGOVDSet(name, paths, captions, boxes))
    return out


def read_class_folders(folder: str | Path, name: str = "zeroshot", data_root: str | Path | None = None) -> ClassificationSet:
    """Images in class-named sub-folders (sorted class names; '_' reads as a space)."""
    folder = Path(folder)
    root = Path(data_root) if data_root is not None else folder.parent
    _require(folder, "zeroshot", root, "folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise BenchmarkLayoutError("zeroshot", f"no class sub-folders in {str(folder)!r}", root)
    paths, labels = [], []
    for label, class_dir in enumerate(classes):
        for image in sorted(class_dir.iterdir(), key=_natural_key):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(image)
                labels.append(label)
    return ClassificationSet(name, paths, labels, [c.name.replace("_", " ") for c in classes])


def read_zeroshot(data_root: str | Path) -> ClassificationSet:
    """The ``zeroshot/`` folder of class-named sub-folders under `data_root`."""
    return read_class_folders(Path(data_root) / "zeroshot", "zeroshot", data_root)


RETRIEVAL_READERS = {
    "urban1k": read_urban1k,
    "sharegpt4v-1k": read_sharegpt4v_1k,
    "dci": read_dci,
    "docci": read_docci,
    "coco": read_coco,
    "coco-val2017": read_coco_val2017,
    "flickr30k": read_flickr30k,
}

__all__ = [
    "BenchmarkLayoutError",
    "ClassificationSet",
    "FGOVDBox",
    "FGOVDSet",
    "FGOVD_SPLITS",
    "LAYOUTS",
    "RETRIEVAL_READERS",
    "RetrievalSet",
    "read_class_folders",
    "read_coco",
    "read_coco_val2017",
    "read_dci",
    "read_docci",
    "read_fgovd",
    "read_flickr30k",
    "read_sharegpt4v_1k",
    "read_urban1k",
    "read_zeroshot",
]
