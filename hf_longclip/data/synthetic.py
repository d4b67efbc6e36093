"""A synthetic long-caption data set that is generated locally: scenes of coloured shapes with long captions.

Deterministic given the seed, nothing downloaded; used by the quickstart, the tests and offline demos.
See docs/data.md (Generated scenes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "cyan": (40, 220, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"gray": (110, 110, 110), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
#: Grid cell (row, column) -> the phrase naming it.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "the top left",
    (0, 1): "the top",
    (0, 2): "the top right",
    (1, 0): "the left",
    (1, 1): "the center",
    (1, 2): "the right",
    (2, 0): "the bottom left",
    (2, 1): "the bottom",
    (2, 2): "the bottom right",
}
_COUNTS = {3: "three", 4: "four", 5: "five", 6: "six"}

#: Every word the captions use, for building a small whole-word tokenizer.
SYNTHETIC_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(COLORS)
        | set(BACKGROUNDS)
        | set(SHAPES)
        | {s + "s" for s in SHAPES}
        | set(SIZES)
        | set(_COUNTS.values())
        | {w for phrase in POSITIONS.values() for w in phrase.split()}
        | set("the image shows shapes on a background there is in is to of above below left right next".split())
    )
)


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene: background and objects; renders to an image and describes itself in a long caption."""

    background: str
    objects: tuple[SceneObject, ...]

    def caption(self) -> str:
        """Summary sentence, one sentence per object, one relation sentence."""
        count = _COUNTS[len(self.objects)]
        sentences = [f"The image shows {count} shapes on a {self.background} background"]
        for obj in self.objects:
            sentences.append(f"There is {obj.phrase()} in {POSITIONS[obj.cell]} of the image")
        a, b = self.objects[0], self.objects[1]
        sentences.append(f"The {a.color} {a.shape} is {_relation(a.cell, b.cell)} the {b.color} {b.shape}")
        return ". ".join(sentences) + "."

    def short_caption(self) -> str:
        """The summary sentence (what Long-CLIP's ``first_sentence`` rule extracts from :meth:`caption`)."""
        return self.caption().split(". ")[0]

    def render(self, image_size: int = 64) -> Image.Image:
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        cell = image_size / 3
        for obj in self.objects:
            radius = cell * (0.45 if obj.size == "large" else 0.25)
            cx, cy = (obj.cell[1] + 0.5) * cell, (obj.cell[0] + 0.5) * cell
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif obj.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        return image


def _relation(a: tuple[int, int], b: tuple[int, int]) -> str:
    if a[0] < b[0]:
        return "above"
    if a[0] > b[0]:
        return "below"
    return "to the left of" if a[1] < b[1] else "to the right of"


def random_scene(rng: random.Random, min_objects: int = 3, max_objects: int = 6) -> Scene:
    """Draw a scene: 3-6 objects in distinct cells, each with a random shape, colour and size."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample(sorted(POSITIONS), count)
    objects = tuple(
        SceneObject(rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(SIZES), cell) for cell in cells
    )
    return Scene(rng.choice(sorted(BACKGROUNDS)), objects)


def iter_scenes(num_scenes: int, seed: int = 0) -> Iterator[Scene]:
    """``num_scenes`` scenes from a seeded generator (the same seed always gives the same scenes)."""
    if num_scenes < 0:
        raise ValueError(f"num_scenes must be >= 0, got {num_scenes}")
    rng = random.Random(seed)
    for _ in range(num_scenes):
        yield random_scene(rng)


def heldout_seed(seed: int) -> int:
    """The scene seed of the held-out (eval) split of a data set generated with `seed` (train scenes use `seed`)."""
    return seed + 1_000_003


# ----------------------------------------------------------------------------------------------- caption parsing
_SUMMARY = re.compile(r"The image shows (\w+) shapes on a (\w+) background")
_OBJECT = re.compile(r"There is a (\w+) (\w+) (\w+) in (the [a-z ]+) of the image")
_COUNT_VALUES = {word: count for count, word in _COUNTS.items()}
_CELLS = {phrase: cell for cell, phrase in POSITIONS.items()}


def parse_caption(caption: str) -> Scene:
    """The scene a caption of `Scene.caption` describes (its exact inverse).

    Raises:
        `ValueError`: `caption` is not in the generator's format (a word outside its vocabulary, a wrong count, a
        relation sentence that does not follow from the objects' cells, ...).
    """
    if not caption.endswith("."):
        raise ValueError(f"not a scene caption (no final full stop): {caption[:80]!r}")
    sentences = caption[:-1].split(". ")
    summary = _SUMMARY.fullmatch(sentences[0])
    if summary is None or summary.group(1) not in _COUNT_VALUES or summary.group(2) not in BACKGROUNDS:
        raise ValueError(f"not a scene summary sentence: {sentences[0]!r}")
    count = _COUNT_VALUES[summary.group(1)]
    if len(sentences) != count + 2:
        raise ValueError(f"the summary announces {count} shapes, but the caption has {len(sentences) - 2} shape sentences")
    objects = []
    for sentence in sentences[1 : count + 1]:
        match = _OBJECT.fullmatch(sentence)
        if (
            match is None
            or match.group(1) not in SIZES
            or match.group(2) not in COLORS
            or match.group(3) not in SHAPES
            or match.group(4) not in _CELLS
        ):
            raise ValueError(f"not a scene shape sentence: {sentence!r}")
        size, color, shape, where = match.groups()
        objects.append(SceneObject(shape, color, size, _CELLS[where]))
    scene = Scene(summary.group(2), tuple(objects))
    if len({obj.cell for obj in objects}) != len(objects):
        raise ValueError(f"two shapes share a cell in {caption[:80]!r}")
    if scene.caption() != caption:  # the relation sentence (or spacing) is not what the generator writes
        raise ValueError(f"the relation sentence does not match the shapes: {sentences[-1]!r}")
    return scene


# ----------------------------------------------------------------------------------------------- hard negatives
#: What a hard negative of `hard_negative_captions` changes: one attribute of one shape (``colour``, ``shape``,
#: ``size``, ``position``), or ``swap``: one attribute exchanged between two shapes (binding).
NEGATIVE_TYPES: tuple[str, ...] = ("colour", "shape", "size", "position", "swap")
_SWAP_ATTRIBUTES = ("color", "shape", "size")  # tried in this order: colour binding first


def _with_object(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = dataclasses.replace(objects[index], **changes)
    return Scene(scene.background, tuple(objects))


def hard_negative_scenes(scene: Scene, rng: random.Random) -> list[tuple[Scene, str]]:
    """Scenes that differ from `scene` in exactly one attribute of one shape, one per `NEGATIVE_TYPES` entry:
    ``colour`` / ``shape`` / ``size`` of a random shape changed to another value, ``position``: a random shape moved
    to an empty cell, ``swap`` (scenes with >= 2 shapes): the colours of two shapes of different colours exchanged
    (shapes, then sizes, when every shape has the same colour; left out when no two shapes differ in any of them).

    Returns:
        `[(negative scene, type), ...]` in `NEGATIVE_TYPES` order; shapes keep their order in the caption.
    """
    objects = scene.objects
    out: list[tuple[Scene, str]] = []
    i = rng.randrange(len(objects))
    out.append((_with_object(scene, i, color=rng.choice([c for c in sorted(COLORS) if c != objects[i].color])), "colour"))
    i = rng.randrange(len(objects))
    out.append((_with_object(scene, i, shape=rng.choice([s for s in SHAPES if s != objects[i].shape])), "shape"))
    i = rng.randrange(len(objects))
    out.append((_with_object(scene, i, size=rng.choice([s for s in SIZES if s != objects[i].size])), "size"))
    empty = [cell for cell in sorted(POSITIONS) if cell not in {obj.cell for obj in objects}]
    if empty:
        i = rng.randrange(len(objects))
        out.append((_with_object(scene, i, cell=rng.choice(empty)), "position"))
    for attribute in _SWAP_ATTRIBUTES:
        pairs = [
            (a, b)
            for a in range(len(objects))
            for b in range(a + 1, len(objects))
            if getattr(objects[a], attribute) != getattr(objects[b], attribute)
        ]
        if pairs:
            a, b = rng.choice(pairs)
            swapped = _with_object(scene, a, **{attribute: getattr(objects[b], attribute)})
            out.append((_with_object(swapped, b, **{attribute: getattr(objects[a], attribute)}), "swap"))
            break
    return out


def hard_negative_records(num_scenes: int, seed: int = 0, split: str = "eval") -> list[dict]:
    """Attribute-binding records of the `split` scenes of a data set generated with `seed` (the held-out split by
    default: the same scenes, in the same order, as `write_synthetic_dataset`'s ``eval.jsonl``).

    Returns:
        ``{"image": "images/<split>_NNNNN.png", "caption", "negatives", "negative_types", "id"}`` per scene, the
        format `hf_longclip.evaluation.read_hard_negatives` reads. Deterministic given `seed`.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    scene_seed = heldout_seed(seed) if split == "eval" else seed
    rng = random.Random(scene_seed * 31 + 7)  # the negatives' own stream: the scenes stay those of the split
    records = []
    for i, scene in enumerate(iter_scenes(num_scenes, scene_seed)):
        negatives = hard_negative_scenes(scene, rng)
        records.append(
            {
                "image": f"images/{split}_{i:05d}.png",
                "caption": scene.caption(),
                "negatives": [negative.caption() for negative, _ in negatives],
                "negative_types": [kind for _, kind in negatives],
                "id": f"{split}-{i}",
            }
        )
    return records


def write_hard_negative_dataset(
    folder: str | os.PathLike,
    num_scenes: int = 200,
    seed: int = 0,
    image_size: int = 64,
    split: str = "eval",
    file_name: str = "hard_negatives.jsonl",
    render_images: bool = True,
) -> Path:
    """Write the attribute-binding hard negatives of a generated split: ``<folder>/hard_negatives.jsonl`` (one
    `hard_negative_records` record per line, image paths relative to `folder`) and, with `render_images`, the
    images ``<folder>/images/<split>_NNNNN.png`` (the same files `write_synthetic_dataset` writes for that split).

    Returns:
        The path of the JSONL file.
    """
    root = Path(folder)
    records = hard_negative_records(num_scenes, seed, split)
    if render_images:
        (root / "images").mkdir(parents=True, exist_ok=True)
        scene_seed = heldout_seed(seed) if split == "eval" else seed
        for record, scene in zip(records, iter_scenes(num_scenes, scene_seed)):
            scene.render(image_size).save(root / record["image"])
    root.mkdir(parents=True, exist_ok=True)
    path = root / file_name
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, path)
    return path


def synthetic_records(num_scenes: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """In-memory examples ``{"image": PIL.Image, "caption", "short_caption", "id"}``."""
    return [
        {"image": s.render(image_size), "caption": s.caption(), "short_caption": s.short_caption(), "id": i}
        for i, s in enumerate(iter_scenes(num_scenes, seed))
    ]


def write_synthetic_dataset(
    folder: str | os.PathLike,
    num_train: int = 2000,
    num_eval: int = 200,
    seed: int = 0,
    image_size: int = 64,
) -> dict[str, Path]:
    """Write a synthetic data set in the JSONL layout the training script reads.

    Layout: ``images/{train,eval}_NNNNN.png``, ``train.jsonl`` and ``eval.jsonl`` with one
    ``{"image": "images/...png", "caption": ..., "short_caption": ..., "id": ...}`` per line (image paths relative
    to ``folder``). Train and eval scenes come from different seeds, so evaluation is on held-out scenes. An existing
    complete data set with the same settings is reused (a ``meta.json`` records them).

    The held-out scenes also get attribute-binding hard negatives, ``hard_negatives.jsonl``
    (`write_hard_negative_dataset`; empty when `num_eval` is 0).

    Returns:
        ``{"train": path of train.jsonl, "eval": path of eval.jsonl, "hard_negatives": path of hard_negatives.jsonl}``.
    """
    root = Path(folder)
    meta = {"num_train": num_train, "num_eval": num_eval, "seed": seed, "image_size": image_size, "version": 2}
    paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl", "hard_negatives": root / "hard_negatives.jsonl"}
    meta_path = root / "meta.json"
    if meta_path.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return paths
        except ValueError:
            pass
    (root / "images").mkdir(parents=True, exist_ok=True)
    # Held-out scenes use a seed derived from, but different to, the training seed.
    for split, count, split_seed in (("train", num_train, seed), ("eval", num_eval, heldout_seed(seed))):
        lines = []
        for i, scene in enumerate(iter_scenes(count, split_seed)):
            rel = f"images/{split}_{i:05d}.png"
            scene.render(image_size).save(root / rel)
            record = {"image": rel, "caption": scene.caption(), "short_caption": scene.short_caption(), "id": f"{split}-{i}"}
            lines.append(json.dumps(record))
        tmp = paths[split].with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
        os.replace(tmp, paths[split])
    write_hard_negative_dataset(root, num_eval, seed, image_size, render_images=False)  # the eval images are written
    meta_path.write_text(json.dumps(meta))
    return paths


__all__ = [
    "COLORS",
    "NEGATIVE_TYPES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SYNTHETIC_WORDS",
    "Scene",
    "SceneObject",
    "hard_negative_records",
    "hard_negative_scenes",
    "heldout_seed",
    "iter_scenes",
    "parse_caption",
    "random_scene",
    "synthetic_records",
    "write_hard_negative_dataset",
    "write_synthetic_dataset",
]
