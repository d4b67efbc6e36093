"""The variant registry: the one table of what hf_longclip implements.

Each entry names a variant's config, model and collator, its model-card text and its training-recipe defaults.
Everything else is derived from it: Auto registration (`register_variant`), the CLI's and the training arguments'
choices, model cards, the benchmarks' and the tests' parametrisation. Adding a variant is one `Variant(...)` entry
below plus the variant's own files (docs/adding_a_variant.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .data.collate import LongCLIPCollator
from .data.collate_betaclip import BetaCLIPCollator
from .data.collate_finelip import FineLIPCollator
from .data.collate_fixclip import FixCLIPCollator
from .data.collate_mulclip import MulCLIPCollator
from .data.transforms import TRANSFORM_NAMES as TRAIN_TRANSFORMS
from .models.configuration_betaclip import BetaCLIPConfig
from .models.configuration_finelip import FineLIPConfig
from .models.configuration_fixclip import FixCLIPConfig
from .models.configuration_longclip import LongCLIPConfig
from .models.configuration_mulclip import MulCLIPConfig
from .models.modeling_betaclip import BetaCLIPModel
from .models.modeling_finelip import FineLIPModel
from .models.modeling_fixclip import FixCLIPModel
from .models.modeling_longclip import LongCLIPModel
from .models.modeling_mulclip import MulCLIPModel
from .models.processing_longclip import LongCLIPProcessor
from .text.hierarchy import HIERARCHY_FIELDS

@dataclass(frozen=True)
class Variant:
    """One registered variant.

    Args:
        name: the ``model_type`` of its config, the ``--variant`` value and the stem of its card section
            (``model_cards/<name>.md``), docs page (``docs/<name>.md``) and recipes.
        title: display name (model cards, logs).
        config_class, model_class: its transformers classes (the model subclasses `LongCLIPModel`).
        collator_class: builds training batches; called as ``collator_class(processor, seed=..., **collator_config)``.
        summary: one-sentence model-card summary.
        reference_recipe: the model card's training section when a card is rendered without a run's settings.
        recipes: its training recipes, file names in ``training_scripts/configs/``.
        tags: extra Hub tags.
        train_transform: the default train-time image transform of its recipes.
        record_fields: extra record fields its collator reads (prepared once before training, e.g. beta-CLIP's
            caption hierarchy).
        tiny_config: config fields that make a 2-layer model valid (``--base tiny-random`` and the quickstart, tests,
            benchmarks' smoke mode, the transformers conformance run).
    """

    name: str
    title: str
    config_class: type
    model_class: type
    collator_class: type
    summary: str
    reference_recipe: str
    recipes: tuple[str, ...]
    tags: tuple[str, ...] = ()
    train_transform: str = "eval"
    record_fields: tuple[str, ...] = ()
    tiny_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.config_class.model_type != self.name:
            raise ValueError(f"variant {self.name!r}: its config's model_type is {self.config_class.model_type!r}")
        if self.model_class.config_class is not self.config_class:
            raise ValueError(f"variant {self.name!r}: {self.model_class.__name__}.config_class is not {self.config_class}")
        if not issubclass(self.model_class, LongCLIPModel):
            raise TypeError(f"variant {self.name!r}: {self.model_class.__name__} must subclass LongCLIPModel")
        if self.train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"variant {self.name!r}: train_transform must be one of {TRAIN_TRANSFORMS}")
        object.__setattr__(self, "tiny_config", MappingProxyType(dict(self.tiny_config)))

    def make_collator(self, processor, seed: int | None = None, **collator_config):
        """The variant's collator; a `collator_config` key the collator does not take raises `ValueError`."""
        try:
            return self.collator_class(processor, seed=seed, **collator_config)
        except TypeError as error:
            raise ValueError(
                f"collator_config {dict(collator_config)} does not fit {self.collator_class.__name__}: {error}"
            ) from None


_VARIANTS: dict[str, Variant] = {}
#: Read-only view of the registry, in registration order.
VARIANTS: Mapping[str, Variant] = MappingProxyType(_VARIANTS)


def register_variant(variant: Variant) -> Variant:
    """Add a variant: the registry entry, transformers' Auto classes (config, model, zero-shot image classification,
    processor) and the ``auto_map`` that `save_pretrained` writes for ``trust_remote_code`` loading."""
    if variant.name in _VARIANTS and _VARIANTS[variant.name] != variant:
        raise ValueError(f"a different variant is already registered as {variant.name!r}")
    _VARIANTS[variant.name] = variant
    config_class, model_class = variant.config_class, variant.model_class
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, LongCLIPProcessor, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModel")
    return variant


def get_variant(name_or_model: str | Any) -> Variant:
    """The registered variant of a name, a config or a model; `ValueError` listing the choices otherwise."""
    name = name_or_model
    if not isinstance(name, str):
        config = getattr(name_or_model, "config", name_or_model)
        name = getattr(config, "model_type", None)
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(_VARIANTS)}") from None


for _variant in (
    Variant(
        "longclip", "Long-CLIP", LongCLIPConfig, LongCLIPModel, LongCLIPCollator,
        summary="A CLIP model whose text encoder reads 248 tokens (Long-CLIP), for retrieval and classification with "
        "long, detailed captions.",
        reference_recipe="Authors' reference recipe: ShareGPT4V long captions (about 1.2M; the first 1000 entries "
        "held out), short caption = first sentence; AdamW, lr 1e-6, global batch 2048, label smoothing 0.1, 2 epochs "
        "in the code (6 in the training notes); loss = InfoNCE(image, long) + InfoNCE(PCA-32 image, short).",
        recipes=("longclip-vit-b16.yaml",),
        tags=("long-clip",),
    ),
    Variant(
        "finelip", "FineLIP", FineLIPConfig, FineLIPModel, FineLIPCollator,
        summary="A long-caption CLIP (248 tokens) with fine-grained token aggregation and late-interaction scoring "
        "(FineLIP).",
        reference_recipe="Authors' reference recipe: ShareGPT4V (about 1.2M, first 1000 held out); lr 1e-6 for the "
        "backbone and 2e-4 for the aggregation heads; batch 128 x 4 accumulation steps; 6 epochs; bidirectional "
        "hinge loss (margin 0.2) on the CLIM score with a one-epoch warm-up.",
        recipes=("finelip-vit-b16.yaml",),
        tags=("finelip", "fine-grained"),
    ),
    Variant(
        "fixclip", "Fix-CLIP", FixCLIPConfig, FixCLIPModel, FixCLIPCollator,
        summary="A long-caption CLIP (248 tokens) with a masked short-caption branch, regional prompts and "
        "hierarchical alignment heads (Fix-CLIP).",
        reference_recipe="The authors' recipe is not public; see `config.json` for the branch, prompt and loss "
        "settings used.",
        recipes=("fixclip-vit-b16.yaml",),
        tags=("fixclip",),
        tiny_config={"num_groups": 2},
    ),
    Variant(
        "mulclip", "MulCLIP", MulCLIPConfig, MulCLIPModel, MulCLIPCollator,
        summary="A long-caption CLIP (248 tokens) with multi-level calibration heads (MulCLIP).",
        reference_recipe="The authors' recipe is not public (the paper trains on DOCCI long captions); see "
        "`config.json` for the loss weights used.",
        recipes=("mulclip-vit-b16.yaml",),
        tags=("mulclip",),
    ),
    Variant(
        "betaclip", "beta-CLIP", BetaCLIPConfig, BetaCLIPModel, BetaCLIPCollator,
        summary="A long-caption CLIP (248 tokens) with a text-conditioned pooling block trained with beta-CAL "
        "(beta-CLIP).",
        reference_recipe="Authors' reference recipe: filtered ShareGPT4V; AdamW, lr 1e-5 (backbone, cosine to 1e-7) "
        "and 1e-3 (pooling block, cosine to 1e-4); batch 64 per GPU x 8 accumulation x 4 GPUs = 2048; 10 epochs; "
        "AMP; up to 5 sentences and 30 phrases per image.",
        recipes=("betaclip-vit-b16-ce.yaml", "betaclip-vit-b16-bce.yaml"),
        tags=("betaclip", "fine-grained"),
        train_transform="random_resized_crop",
        record_fields=HIERARCHY_FIELDS,
    ),
):
    register_variant(_variant)
LongCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["TRAIN_TRANSFORMS", "VARIANTS", "Variant", "get_variant", "register_variant"]
