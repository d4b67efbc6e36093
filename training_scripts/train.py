#!/usr/bin/env python
"""Fine-tune any hf_longclip variant: a thin wrapper over the installed entry point ``hf_longclip.train``.

    accelerate launch training_scripts/train.py --config longclip-vit-b16 [--setting value ...]

is the same as ``accelerate launch -m hf_longclip.train ...`` and ``hf-longclip train ...`` (see docs/training.md).
"""

import sys

from hf_longclip.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
