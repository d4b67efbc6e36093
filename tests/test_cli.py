"""The ``hf-longclip`` sub-commands convert / stretch / export, driven in-process through ``cli.main``.

A tiny stock CLIPModel + processor saved to a folder stands in for a Hub checkpoint; every output folder is loaded
back with the Auto / stock classes and compared with the in-memory model.
"""

import json

import pytest
import torch
from transformers import (
    AutoModel,
    AutoProcessor,
    BertConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from hf_longclip import VARIANTS, LongCLIPModel, LongCLIPProcessor
from hf_longclip.cli import SUBCOMMANDS, main
from hf_longclip.testing_utils import tiny_clip, tiny_processor

LONG_CAPTION = "a large red circle in the top left next to a small blue square on the table " * 6


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A saved tiny stock CLIP (77 positions) with its tokenizer and image processor: a stand-in Hub checkpoint."""
    folder = tmp_path_factory.mktemp("clip")
    processor = tiny_processor()
    tiny_clip(seed=0, processor=processor).save_pretrained(folder)
    CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stretched_dir(clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stretched") / "model"
    assert main(["stretch", "--base", str(clip_dir), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def inputs():
    processor = tiny_processor()
    text = processor(text=[LONG_CAPTION, "a dog"], return_tensors="pt")
    assert text["input_ids"].shape[1] > 77
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return text, pixels


def _features(model, text, pixels):
    with torch.no_grad():
        return (
            model.get_text_features(**text).pooler_output,
            model.get_image_features(pixel_values=pixels).pooler_output,
        )


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # transformers' progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_subcommands_registered():
    assert {"convert", "stretch", "export", "evaluate", "push"} <= set(SUBCOMMANDS)


# ----------------------------------------------------------------------------------------------- stretch
def test_stretch_saves_a_model_equal_to_from_clip(clip_dir, stretched_dir, inputs):
    model = AutoModel.from_pretrained(stretched_dir)
    processor = AutoProcessor.from_pretrained(stretched_dir)
    assert type(model) is LongCLIPModel and isinstance(processor, LongCLIPProcessor)
    assert processor.tokenizer.model_max_length == 248
    assert model.config.text_config.max_position_embeddings == 248
    reference = LongCLIPModel.from_clip(CLIPModel.from_pretrained(clip_dir))
    text, pixels = inputs
    assert torch.equal(processor(text=[LONG_CAPTION], return_tensors="pt")["input_ids"], text["input_ids"][:1])
    for ours, expected in zip(_features(model.eval(), text, pixels), _features(reference, text, pixels)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    source = CLIPModel.from_pretrained(clip_dir)
    torch.testing.assert_close(model.logit_scale, source.logit_scale)  # the source's, kept by default


def test_stretch_can_reset_the_logit_scale_as_long_clip_does(clip_dir, tmp_path):
    assert main(["stretch", "--base", str(clip_dir), "--output", str(tmp_path), "--reset-logit-scale"]) == 0
    model = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(model.logit_scale, torch.tensor(4.6052))  # the authors' --log_scale
    assert model.config.logit_scale_init_value == 4.6052


@pytest.mark.parametrize("variant", [name for name in VARIANTS if name != "longclip"])
def test_stretch_variants(clip_dir, stretched_dir, inputs, tmp_path, variant):
    out = tmp_path / variant
    # the registry's tiny_config makes the 2-layer towers valid (Fix-CLIP's groups must divide them)
    extra = [arg for k, v in VARIANTS[variant].tiny_config.items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["stretch", "--base", str(clip_dir), "--output", str(out), "--variant", variant, *extra]) == 0
    model = AutoModel.from_pretrained(out).eval()
    assert type(model) is VARIANTS[variant].model_class
    for key, value in VARIANTS[variant].tiny_config.items():
        assert getattr(model.config, key) == value
    # the backbone is the stretched CLIP: text tokens equal the Long-CLIP model's
    base = AutoModel.from_pretrained(stretched_dir).eval()
    ids = inputs[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.text_model(ids).last_hidden_state, base.text_model(ids).last_hidden_state, rtol=0, atol=0)


def test_stretch_geometry_and_logit_scale(clip_dir, tmp_path, capsys):
    out = tmp_path / "k10r2"
    assert main(["stretch", "--base", str(clip_dir), "--output", str(out), "--keep", "10", "--ratio", "2"]) == 0
    assert f"(77 -> 144 positions, keep 10, ratio 2) and LongCLIPProcessor to {out}" in capsys.readouterr().out
    model = AutoModel.from_pretrained(out)
    assert model.config.text_config.max_position_embeddings == 10 + 2 * 67
    assert (model.config.position_keep, model.config.position_ratio) == (10, 2)
    assert AutoProcessor.from_pretrained(out).tokenizer.model_max_length == 144
    source = CLIPModel.from_pretrained(clip_dir)
    torch.testing.assert_close(model.logit_scale, source.logit_scale)
    table = model.text_model.embeddings.position_embedding.weight
    torch.testing.assert_close(table[:10], source.text_model.embeddings.position_embedding.weight[:10], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- convert
def _openai_layout(model: LongCLIPModel, keep: int = 20) -> dict:
    """The authors' checkpoint layout (OpenAI CLIP names, fused q/k/v, two 248-row position tables)."""
    sd = model.state_dict()
    out = {}
    towers = (("text_model.encoder.layers.", "transformer.resblocks.", model.config.text_config.num_hidden_layers),
              ("vision_model.encoder.layers.", "visual.transformer.resblocks.", model.config.vision_config.num_hidden_layers))
    for src, dst, layers in towers:
        for i in range(layers):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for suffix in ("weight", "bias"):
                out[f"{d}attn.in_proj_{suffix}"] = torch.cat([sd[f"{s}self_attn.{x}_proj.{suffix}"] for x in "qkv"])
                for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{d}{old}.{suffix}"] = sd[f"{s}{new}.{suffix}"]
    table = sd["text_model.embeddings.position_embedding.weight"]
    trained, frozen = table.clone(), table.clone()
    trained[:keep] = 7.0  # unused rows of each table: must not reach the merged one
    frozen[keep:] = -7.0
    v = "vision_model."
    out.update({
        "positional_embedding": frozen,
        "positional_embedding_res": trained,
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
        "mask1": torch.zeros(248, 1),
    })
    return out


def test_convert_original_checkpoint(clip_dir, inputs, tmp_path, capsys):
    source = LongCLIPModel.from_clip(CLIPModel.from_pretrained(clip_dir))  # width 32, 4 heads per tower
    with torch.no_grad():  # trained rows differ from a plain stretch
        source.text_model.embeddings.position_embedding.weight[20:] += 0.05 * torch.randn(228, 32)
        source.logit_scale.fill_(3.0)
    checkpoint = tmp_path / "longclip-tiny.pt"
    torch.save(_openai_layout(source), checkpoint)
    out = tmp_path / "converted"
    # the files store no head counts; OpenAI's width // 64 rule cannot give the tiny towers' 4 heads
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(out), "--processor-dir", str(clip_dir)]) == 1
    assert "(--text-heads / --vision-heads)" in capsys.readouterr().err
    heads = ["--text-heads", "4", "--vision-heads", "4"]
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(out), "--processor-dir", str(clip_dir), *heads]) == 0
    assert str(out) in capsys.readouterr().out
    model = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model) is LongCLIPModel and isinstance(processor, LongCLIPProcessor)
    assert processor.tokenizer.model_max_length == 248
    text, pixels = inputs
    for ours, expected in zip(_features(model, text, pixels), _features(source.eval(), text, pixels)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.logit_scale, torch.tensor(3.0))
    # --base-processor takes a Hub id or a folder the same way
    again = tmp_path / "converted2"
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(again), "--base-processor", str(clip_dir), *heads]) == 0
    assert AutoProcessor.from_pretrained(again).tokenizer.get_vocab() == processor.tokenizer.get_vocab()


# ----------------------------------------------------------------------------------------------- export
def test_export_clip(stretched_dir, inputs, tmp_path):
    model = AutoModel.from_pretrained(stretched_dir).eval()
    out = tmp_path / "clip"
    assert main(["export", "--model", str(stretched_dir), "--output", str(out), "--format", "clip"]) == 0
    exported = CLIPModel.from_pretrained(out).eval()
    assert type(exported) is CLIPModel
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor) is CLIPProcessor and processor.tokenizer.model_max_length == 248
    text, pixels = inputs
    for ours, expected in zip(_features(exported, text, pixels), _features(model, text, pixels)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["text", "text-with-projection"])
def test_export_text(stretched_dir, inputs, tmp_path, fmt):
    model = AutoModel.from_pretrained(stretched_dir).eval()
    out = tmp_path / fmt
    assert main(["export", "--model", str(stretched_dir), "--output", str(out), "--format", fmt]) == 0
    cls = CLIPTextModelWithProjection if fmt == "text-with-projection" else CLIPTextModel
    exported = cls.from_pretrained(out).eval()
    assert type(exported) is cls and exported.config.max_position_embeddings == 248
    tokenizer = CLIPTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 248
    text = inputs[0]
    assert torch.equal(tokenizer([LONG_CAPTION], truncation=True, return_tensors="pt")["input_ids"], text["input_ids"][:1])
    with torch.no_grad():
        if cls is CLIPTextModel:
            ours, expected = exported(**text).pooler_output, model.text_model(**text).pooler_output
        else:
            ours, expected = exported(**text).text_embeds, model.get_text_features(**text).pooler_output
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_export_diffusers_text_encoder(stretched_dir, inputs, tmp_path, capsys):
    model = AutoModel.from_pretrained(stretched_dir).eval()
    out = tmp_path / "sd"
    assert main(["export", "--model", str(stretched_dir), "--output", str(out), "--format", "diffusers-text-encoder"]) == 0
    assert str(out / "text_encoder") in capsys.readouterr().out
    encoder = CLIPTextModel.from_pretrained(out, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(out, subfolder="tokenizer")
    assert tokenizer.model_max_length == 248 and tokenizer.pad_token_id == 0  # the authors' SD padding
    ids = tokenizer([LONG_CAPTION], padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 248)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids).last_hidden_state, model.text_model(ids).last_hidden_state, rtol=0, atol=0)


def test_export_fixclip_clip_format_is_refused(clip_dir, tmp_path, capsys):
    fix = tmp_path / "fix"
    assert main(["stretch", "--base", str(clip_dir), "--output", str(fix), "--variant", "fixclip", "--set", "num_groups=2"]) == 0
    capsys.readouterr()
    assert main(["export", "--model", str(fix), "--output", str(tmp_path / "out"), "--format", "clip"]) == 1
    line = _error_line(capsys)
    assert "to_clip_model() is not available for a Fix-CLIP with regional prompts" in line
    assert not (tmp_path / "out").exists()
    assert main(["export", "--model", str(fix), "--output", str(tmp_path / "text"), "--format", "text"]) == 0


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_exit_non_zero_with_one_line(clip_dir, stretched_dir, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    # online, so that push reaches its model check (offline it stops before loading anything: tests/test_hub.py)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    (tmp_path / "empty").mkdir()
    images_only = tmp_path / "images_only"  # an image processor but no tokenizer files
    tiny_processor().image_processor.save_pretrained(images_only)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    out = str(tmp_path / "out")
    cases = [
        (["convert", "--checkpoint", str(tmp_path / "missing.pt"), "--output", out, "--processor-dir", str(clip_dir)],
         "is not a file"),
        (["convert", "--checkpoint", str(tmp_path / "junk.pt"), "--output", out, "--processor-dir", str(clip_dir)],
         "cannot convert"),
        (["convert", "--checkpoint", str(tmp_path / "other.pt"), "--output", out, "--processor-dir", str(clip_dir)],
         "cannot convert"),
        (["convert", "--checkpoint", str(tmp_path / "other.pt"), "--output", out, "--processor-dir", str(tmp_path / "empty")],
         "cannot load a CLIP tokenizer and image processor"),
        (["convert", "--checkpoint", str(tmp_path / "other.pt"), "--output", out, "--processor-dir", str(images_only)],
         "no CLIP tokenizer files"),
        (["stretch", "--base", str(clip_dir), "--output", out, "--variant", "nosuchclip"], "unknown variant 'nosuchclip'"),
        (["stretch", "--base", str(bert), "--output", out], "is a 'bert' model"),
        (["stretch", "--base", str(tmp_path / "empty"), "--output", out], "has no config.json"),
        (["stretch", "--base", str(tmp_path / "missing"), "--output", out], "is not a folder"),
        (["stretch", "--base", str(stretched_dir), "--output", out], "is a 'longclip' model"),
        (["stretch", "--base", str(clip_dir), "--output", out, "--keep", "80"], "keep"),
        (["stretch", "--base", str(clip_dir), "--output", out, "--variant", "fixclip"], "num_groups=4 must divide"),
        (["stretch", "--base", str(clip_dir), "--output", out, "--set", "no_such_field=1"], "has no field 'no_such_field'"),
        (["export", "--model", str(clip_dir), "--output", out, "--format", "clip"], "not an hf_longclip model"),
        (["export", "--model", str(bert), "--output", out, "--format", "text"], "not an hf_longclip model"),
        (["export", "--model", str(stretched_dir), "--output", out, "--format", "onnx"], "unknown format 'onnx'"),
        # evaluate / push with a --model that is not a saved model: one line, not a traceback
        (["evaluate", "--model", str(tmp_path / "missing"), "--data-root", out], "is not a folder"),
        (["evaluate", "--model", str(tmp_path / "empty"), "--data-root", out], "cannot load a model and processor"),
        (["evaluate", "--model", str(bert), "--data-root", out], "cannot load a model and processor"),
        (["push", "--model", str(tmp_path / "empty"), "--repo-id", "me/x"], "cannot load a model and processor"),
        (["push", "--model", str(tmp_path / "missing"), "--repo-id", "me/x"], "is not a folder"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        line = _error_line(capsys)
        assert expected in line, (argv, line)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors exit with 2
        main(["convert", "--checkpoint", "x.pt", "--output", out, "--base-processor", "a", "--processor-dir", "b"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
