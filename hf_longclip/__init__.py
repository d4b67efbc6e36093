"""hf_longclip: long-context, fine-grained CLIP models as transformers models.

Importing the package registers every variant of the registry (`hf_longclip.variants`) with transformers' Auto
classes, so ``AutoModel.from_pretrained(folder_or_repo)`` works without ``trust_remote_code``.
"""

from .models import (
    BetaCLIPConfig,
    BetaCLIPModel,
    BetaCLIPOutput,
    CLIPVariantOutput,
    FineLIPConfig,
    FineLIPModel,
    FineLIPOutput,
    FixCLIPConfig,
    FixCLIPModel,
    FixCLIPOutput,
    FrozenPrefixEmbedding,
    LongCLIPConfig,
    LongCLIPModel,
    LongCLIPOutput,
    LongCLIPProcessor,
    MulCLIPConfig,
    MulCLIPModel,
    MulCLIPOutput,
    TextConditionedPooler,
    stretch_position_embeddings,
    stretched_length,
)
from .variants import VARIANTS, Variant, get_variant, register_variant

__version__ = "0.1.0"

__all__ = [
    "BetaCLIPConfig",
    "BetaCLIPModel",
    "BetaCLIPOutput",
    "CLIPVariantOutput",
    "FineLIPConfig",
    "FineLIPModel",
    "FineLIPOutput",
    "FixCLIPConfig",
    "FixCLIPModel",
    "FixCLIPOutput",
    "FrozenPrefixEmbedding",
    "LongCLIPConfig",
    "LongCLIPModel",
    "LongCLIPOutput",
    "LongCLIPProcessor",
    "MulCLIPConfig",
    "MulCLIPModel",
    "MulCLIPOutput",
    "TextConditionedPooler",
    "VARIANTS",
    "Variant",
    "get_variant",
    "register_variant",
    "stretch_position_embeddings",
    "stretched_length",
]
