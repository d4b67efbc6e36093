"""Everything a saved hf_longclip model needs at load time: configurations, models, losses, the processor.

``save_pretrained`` copies these files next to the weights for ``trust_remote_code`` loading, so each of them imports
only torch, transformers (with huggingface_hub, which transformers' own configurations use), the standard library and
siblings of this folder (``tests/test_payload_imports.py`` checks it).
"""

from .configuration_betaclip import BetaCLIPConfig
from .configuration_finelip import FineLIPConfig
from .configuration_fixclip import FixCLIPConfig
from .configuration_longclip import LongCLIPConfig, stretched_length
from .configuration_mulclip import MulCLIPConfig
from .modeling_betaclip import BetaCLIPModel, BetaCLIPOutput, TextConditionedPooler
from .modeling_finelip import FineLIPModel, FineLIPOutput
from .modeling_fixclip import FixCLIPModel, FixCLIPOutput
from .modeling_longclip import (
    CLIPVariantOutput,
    FrozenPrefixEmbedding,
    LongCLIPModel,
    LongCLIPOutput,
    stretch_position_embeddings,
)
from .modeling_mulclip import MulCLIPModel, MulCLIPOutput
from .processing_longclip import LongCLIPProcessor

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
    "stretch_position_embeddings",
    "stretched_length",
]
