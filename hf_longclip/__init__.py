"""hf_longclip: long-context, fine-grained CLIP models as transformers models.

Importing the package registers every variant with transformers' Auto classes, so
``AutoModel.from_pretrained(folder_or_repo)`` works without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_betaclip import BetaCLIPConfig
from .configuration_longclip import LongCLIPConfig, stretched_length
from .modeling_betaclip import BetaCLIPModel, BetaCLIPOutput, TextConditionedPooler
from .modeling_longclip import (
    FrozenPrefixEmbedding,
    LongCLIPModel,
    LongCLIPOutput,
    stretch_position_embeddings,
)
from .configuration_mulclip import MulCLIPConfig
from .configuration_finelip import FineLIPConfig
from .modeling_finelip import FineLIPModel, FineLIPOutput
from .modeling_mulclip import MulCLIPModel, MulCLIPOutput
from .configuration_fixclip import FixCLIPConfig
from .modeling_fixclip import FixCLIPModel, FixCLIPOutput
from .processing_longclip import LongCLIPProcessor

__version__ = "0.1.0"


def _register(config_cls, model_cls) -> None:
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    # CLIP-style models serve transformers' zero-shot-image-classification pipeline as they are.
    AutoModelForZeroShotImageClassification.register(config_cls, model_cls, exist_ok=True)
    AutoProcessor.register(config_cls, LongCLIPProcessor, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies the code, so saved folders load with trust_remote_code.
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModel")


_register(LongCLIPConfig, LongCLIPModel)
_register(FixCLIPConfig, FixCLIPModel)
_register(BetaCLIPConfig, BetaCLIPModel)
_register(MulCLIPConfig, MulCLIPModel)
_register(FineLIPConfig, FineLIPModel)
LongCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "FixCLIPConfig",
    "FixCLIPModel",
    "FixCLIPOutput",
    "FineLIPConfig",
    "FineLIPModel",
    "FineLIPOutput",
    "MulCLIPConfig",
    "MulCLIPModel",
    "MulCLIPOutput",
    "BetaCLIPConfig",
    "BetaCLIPModel",
    "BetaCLIPOutput",
    "TextConditionedPooler",
    "FrozenPrefixEmbedding",
    "LongCLIPConfig",
    "LongCLIPModel",
    "LongCLIPOutput",
    "LongCLIPProcessor",
    "stretch_position_embeddings",
    "stretched_length",
]
