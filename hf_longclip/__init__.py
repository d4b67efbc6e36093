"""hf_longclip: long-context, fine-grained CLIP models as transformers models.

Importing the package registers every variant of the registry (`hf_longclip.variants`) with transformers' Auto
classes, so ``AutoModel.from_pretrained(folder_or_repo)`` works without ``trust_remote_code``.
"""

from .models import *  # noqa: F403  (the configurations, models, outputs and processor)
from .models import __all__ as _MODEL_NAMES
from .variants import VARIANTS, Variant, get_variant, register_variant

__version__ = "0.1.0"

__all__ = [*_MODEL_NAMES, "VARIANTS", "Variant", "get_variant", "register_variant"]
