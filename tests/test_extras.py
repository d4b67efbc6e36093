"""Optional dependencies: a feature used without its pip extra raises an ImportError naming the extra."""

from __future__ import annotations

import sys

import pytest

from hf_longclip.extras import EXTRAS, MissingExtraError, require


def _sd_pipeline():
    from hf_longclip.diffusion import long_prompt_sd_pipeline

    long_prompt_sd_pipeline("some-org/stable-diffusion")


def _sdxl_pipeline():
    from hf_longclip.diffusion import long_prompt_sdxl_pipeline

    long_prompt_sdxl_pipeline("some-org/stable-diffusion-xl")


def _hf_dataset():
    from hf_longclip.data.sources import load_hf_dataset

    load_hf_dataset("some-org/captions")


def _train():
    from hf_longclip.training import ModelArguments, DataArguments, TrainingArguments, run

    run(ModelArguments(), DataArguments(), TrainingArguments())


@pytest.mark.parametrize(
    "module, extra, use",
    [
        ("diffusers", "diffusion", _sd_pipeline),
        ("diffusers", "diffusion", _sdxl_pipeline),
        ("datasets", "train", _hf_dataset),
        ("accelerate", "train", _train),
    ],
)
def test_missing_extra_names_it(module, extra, use, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    with pytest.raises(MissingExtraError, match=rf"needs '{module}', which is not installed: pip install "
                                                 rf"'hf-longclip\[{extra}\]'") as error:
        use()
    assert isinstance(error.value, ImportError) and error.value.extra == extra
    assert module in EXTRAS[extra][0]


def test_require_returns_the_module_and_refuses_unknown_extras():
    import torch

    assert require("torch", "train") is torch
    with pytest.raises(ValueError, match="unknown extra 'trian'"):
        require("torch", "trian")
