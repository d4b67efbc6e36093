"""Optional dependencies: which pip extra provides what, and the error a missing one gives.

``pip install hf-longclip`` installs what loading, embedding, export, evaluation and Hub publishing need. Training,
beta-CLIP's phrase parsing and the diffusers helpers need an extra; using them without it raises an `ImportError`
that names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra -> the modules it provides (import names) and what needs them.
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "train": (("accelerate", "datasets", "webdataset"), "training"),
    "text": (("spacy",), "beta-CLIP's caption parsing (spaCy)"),
    "diffusion": (("diffusers",), "the diffusers long-prompt helpers"),
    "deepspeed": (("deepspeed",), "DeepSpeed training (accelerate's distributed_type: DEEPSPEED)"),
}


class MissingExtraError(ImportError):
    """A feature was used without the pip extra that provides its dependencies; the message names the extra."""

    def __init__(self, message: str, extra: str):
        super().__init__(message)
        self.extra = extra


def install_hint(extra: str) -> str:
    """The command that installs `extra`."""
    return f"pip install 'hf-longclip[{extra}]'"


def require(module: str, extra: str, feature: str | None = None) -> ModuleType:
    """Import `module`, or raise a `MissingExtraError` (an `ImportError`) saying that `feature` needs the pip extra `extra`.

    Example:

    ```python
    >>> accelerate = require("accelerate", "train")  # doctest: +SKIP
    ```
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        what = feature or EXTRAS[extra][1]
        raise MissingExtraError(
            f"{what} needs {module.split('.')[0]!r}, which is not installed: {install_hint(extra)}", extra
        ) from error


__all__ = ["EXTRAS", "MissingExtraError", "install_hint", "require"]
