"""Command-line training: ``accelerate launch -m hf_longclip.train --config RECIPE [--setting value ...]``.

The same entry point as ``hf-longclip train`` and ``training_scripts/train.py``. Recipes are addressed by name
(``--config longclip-vit-b16``) or by path; ``--help`` lists every setting, grouped, with its default and aliases,
and the shipped recipes. See docs/training.md.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Train from command-line words; any bad setting or data prints one ``error: ...`` line (exit status 1).
    Returns the run's summary (see :func:`hf_longclip.training.run`)."""
    from .extras import MissingExtraError
    from .training.trainer import main as train_main

    try:
        return train_main(argv)
    except (ValueError, MissingExtraError) as error:  # bad settings or data; a missing extra (named)
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
