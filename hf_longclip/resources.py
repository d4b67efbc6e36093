"""Data files that ship inside the wheel and live at the top of a source checkout: training recipes and model-card
templates. A wheel holds them under ``hf_longclip/recipes/`` and ``hf_longclip/model_cards/``; an editable install
reads them from ``training_scripts/configs/`` and ``model_cards/`` (pyproject.toml maps one onto the other)."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(in_package: str, in_checkout: str, marker: str) -> Path:
    """``hf_longclip/<in_package>`` when it holds `marker` (an installed wheel), else ``<checkout>/<in_checkout>``."""
    shipped = _PACKAGE / in_package
    return shipped if (shipped / marker).is_file() else _PACKAGE.parent / in_checkout


def recipes_dir() -> Path:
    """The folder of the training recipes (``<name>.yaml``), ``$HF_LONGCLIP_RECIPES`` if set."""
    if os.environ.get("HF_LONGCLIP_RECIPES"):
        return Path(os.environ["HF_LONGCLIP_RECIPES"])
    return shipped_dir("recipes", "training_scripts/configs", "quickstart.yaml")


def available_recipes() -> list[str]:
    """Names of the shipped recipes (``--config <name>``)."""
    folder = recipes_dir()
    return sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file from a shipped recipe's name (``longclip-vit-b16``) or a path; a `ValueError` listing the
    shipped recipes when it is neither."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = os.fspath(name_or_path)
    if path.suffix not in (".yaml", ".yml") and os.sep not in text and "/" not in text:
        named = recipes_dir() / f"{text}.yaml"
        if named.is_file():
            return named
    raise ValueError(
        f"recipe {text!r} is neither a file nor a shipped recipe; shipped recipes: {', '.join(available_recipes())}"
    )


__all__ = ["available_recipes", "recipes_dir", "resolve_recipe", "shipped_dir"]
