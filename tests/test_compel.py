"""compel (prompt weighting, ``pip install compel``; in the ``dev`` extra) with a 248-token long SD pipeline.

compel reads the prompt length from ``tokenizer.model_max_length`` and calls the text encoder itself, so a long
pipeline needs nothing special: unweighted prompts of up to 248 tokens give exactly ``pipe.encode_prompt``'s
embeddings, longer ones are cut at 248 as the pipeline cuts them, and ``truncate_long_prompts=False`` with
``SplitLongTextMode.BRUTAL`` chunks exactly as `encode_long_prompt` does. See docs/diffusion.md (compel).
"""

import random

import pytest
import torch

compel = pytest.importorskip("compel", reason="compel is not installed (pip install compel; it needs transformers 5)")
pytest.importorskip("diffusers")

from compel import Compel, ReturnedEmbeddingsType, SplitLongTextMode  # noqa: E402

from hf_longclip.diffusion import (  # noqa: E402
    encode_long_prompt,
    long_prompt_sd_pipeline,
    tiny_longclip,
    tiny_sd_base_pipeline,
)
from hf_longclip.testing_utils import DEFAULT_WORDS  # noqa: E402


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(DEFAULT_WORDS) for _ in range(n))  # one token each


@pytest.fixture(scope="module")
def pipe():
    return long_prompt_sd_pipeline(tiny_sd_base_pipeline(), tiny_longclip())


@pytest.mark.parametrize("n", [3, 76, 150, 246, 300])  # 246 words + start + end = 248; 300 is cut at 248
def test_unweighted_compel_equals_encode_prompt(pipe, n):
    prompt = words(n, seed=n)
    embeds = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)(prompt)
    assert embeds.shape == (1, 248, pipe.text_encoder.config.hidden_size)
    assert torch.equal(embeds, pipe.encode_prompt(prompt, "cpu", 1, False)[0])


def test_weighting_runs_past_77_tokens_and_generates(pipe):
    processor = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    tail = words(150, seed=1)
    plain, weighted = processor(f"a red dog {tail} on the grass"), processor(f"a red dog {tail} on the (grass)1.8")
    assert plain.shape == weighted.shape == (1, 248, pipe.text_encoder.config.hidden_size)
    changed = (plain - weighted).abs().amax(dim=-1)[0]
    # 'grass' is token 1 + 3 + 150 + 2 = 156: far past CLIP's 77, and only it (and nothing before it) changes
    assert changed[156] > 0 and torch.all(changed[:156] == 0)
    negative = processor("")
    latents = pipe(prompt_embeds=weighted, negative_prompt_embeds=negative, num_inference_steps=2, height=32, width=32,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(latents).all()


def test_untruncated_brutal_split_equals_encode_long_prompt(pipe):
    prompt = words(400, seed=4)
    processor = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False,
                       split_long_text_mode=SplitLongTextMode.BRUTAL)
    embeds = processor(prompt)
    assert embeds.shape[1] == 2 * 248
    assert torch.equal(embeds, encode_long_prompt(pipe, prompt, do_classifier_free_guidance=False)["prompt_embeds"])


def test_penultimate_normalized_needs_the_transformers_4_layout(pipe):
    """compel's PENULTIMATE_HIDDEN_STATES_NORMALIZED (its SD clip-skip mode) reads ``text_encoder.text_model``, which
    transformers 5's CLIPTextModel no longer has (the same limitation as diffusers' SD ``clip_skip``)."""
    processor = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                       returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED)
    with pytest.raises(AttributeError, match="text_model"):
        processor("a dog")
