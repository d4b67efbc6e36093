"""A synthetic long-caption data set that is generated locally: scenes of coloured shapes with long captions.

Deterministic given the seed, nothing downloaded; used by the quickstart, the tests and offline demos.
See docs/data.md (Generated scenes).
"""

from __future__ import annotations

import json
import os
import random
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

    Returns:
        ``{"train": path of train.jsonl, "eval": path of eval.jsonl}``.
    """
    root = Path(folder)
    meta = {"num_train": num_train, "num_eval": num_eval, "seed": seed, "image_size": image_size, "version": 1}
    paths = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    meta_path = root / "meta.json"
    if meta_path.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return paths
        except ValueError:
            pass
    (root / "images").mkdir(parents=True, exist_ok=True)
    # Held-out scenes use a seed derived from, but different to, the training seed.
    for split, count, split_seed in (("train", num_train, seed), ("eval", num_eval, seed + 1_000_003)):
        lines = []
        for i, scene in enumerate(iter_scenes(count, split_seed)):
            rel = f"images/{split}_{i:05d}.png"
            scene.render(image_size).save(root / rel)
            record = {"image": rel, "caption": scene.caption(), "short_caption": scene.short_caption(), "id": f"{split}-{i}"}
            lines.append(json.dumps(record))
        tmp = paths[split].with_suffix(".jsonl.tmp")
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""))
        os.replace(tmp, paths[split])
    meta_path.write_text(json.dumps(meta))
    return paths


__all__ = [
    "COLORS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SYNTHETIC_WORDS",
    "Scene",
    "SceneObject",
    "iter_scenes",
    "random_scene",
    "synthetic_records",
    "write_synthetic_dataset",
]
