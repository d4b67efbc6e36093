"""Shared fixtures: tiny random models built from configs; everything runs offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that wait for work sleep instead of spinning. On a machine shared with other jobs, spinning threads
# burn the cores the other threads of the same op need: measured here under a concurrent training run, two model test
# files took 59-63 s with spinning and 32-40 s without. Set before torch is imported (libgomp reads it at load); worker
# and spawned processes inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import hf_longclip  # noqa: F401  (registers the Auto classes)
from hf_longclip import LongCLIPModel
from hf_longclip.testing_utils import tiny_clip, tiny_processor

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def processor():
    """A LongCLIPProcessor with a locally built CLIP tokenizer (248 tokens) and a 32x32 image processor."""
    return tiny_processor()


@pytest.fixture
def clip_model(processor):
    """A tiny random stock CLIPModel with 77 text positions."""
    return tiny_clip(seed=0, processor=processor)


@pytest.fixture
def longclip_model(clip_model):
    """The tiny CLIP stretched to 248 positions."""
    return LongCLIPModel.from_clip(clip_model)
