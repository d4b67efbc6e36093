"""Long-CLIP across 2 CPU processes, and conversion of the authors' original .pt checkpoints."""

import os

import pytest
import torch
import torch.nn.functional as F

from hf_longclip import LongCLIPModel, stretch_position_embeddings
from hf_longclip.conversion import convert_original_checkpoint
from hf_longclip.testing_utils import spawn_distributed, tiny_clip, tiny_processor

CAPTIONS = [
    "a large red circle in the top left. it is next to a blue square.",
    "a small green triangle at the bottom. the sky is blue.",
    "a cat sitting on a chair near a table",
    "a white car in front of a house. a tree on the left. a dog.",
    "a purple square",
    "an orange circle and a yellow triangle in the middle of the image",
]
SHORT = [c.split(". ")[0] for c in CAPTIONS]


def _setup():
    """Identical model + global batch in every process (seeded)."""
    processor = tiny_processor()
    model = LongCLIPModel.from_clip(tiny_clip(seed=3, processor=processor))
    model.config.pca_components = 2  # below the global batch so the SVD path runs
    model.train().double()  # float64: the comparisons test the algebra, not float32 summation order
    torch.manual_seed(7)
    pixels = torch.randn(len(CAPTIONS), 3, 32, 32).double()
    long_ = processor(text=CAPTIONS, return_tensors="pt")
    short = processor(text=SHORT, return_tensors="pt")
    return model, pixels, long_, short


def _loss(model, pixels, long_, short, rows):
    out = model(
        pixel_values=pixels[rows],
        input_ids=long_["input_ids"][rows],
        attention_mask=long_["attention_mask"][rows],
        short_input_ids=short["input_ids"][rows],
        short_attention_mask=short["attention_mask"][rows],
        return_loss=True,
    )
    return out


def _two_process_worker(result_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2
    model, pixels, long_, short = _setup()
    # uneven shards (4 + 2 rows) exercise the variable-size gather
    rows = slice(0, 4) if rank == 0 else slice(4, 6)
    out = _loss(model, pixels, long_, short, rows)
    # PCA runs per process in the authors' code; compare only the parts that are batch-global by design
    out.loss_long.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads[name] = g / world  # what DDP's gradient averaging produces
    losses = out.loss_long.detach().reshape(1)
    gathered = accelerator.gather(losses)
    # the per-rank losses are means over local rows: weight by row count to get the global mean
    counts = torch.tensor([4.0, 2.0], dtype=torch.float64)
    if rank == 0:
        torch.save(
            {"loss": (gathered * counts).sum() / counts.sum(), "per_rank": gathered, "grads": grads}, result_path
        )


def test_two_processes_match_one_process(tmp_path):
    result = tmp_path / "dist.pt"
    spawn_distributed(_two_process_worker, args=(str(result),))
    dist = torch.load(result, weights_only=True)
    model, pixels, long_, short = _setup()
    out = _loss(model, pixels, long_, short, slice(0, 6))
    # Each rank averages its CE over its own rows; the global loss is the row-weighted mean.
    torch.testing.assert_close(dist["loss"], out.loss_long.detach(), rtol=1e-10, atol=1e-12)
    # Gradients: DDP averages per-rank gradients (equal weights), which equals the gradient of the mean of the
    # per-rank losses. Build that objective in one process to compare.
    from hf_longclip.models.losses_common import local_contrastive_loss

    img = model.encode_image(pixels)
    txt = model.encode_text(long_["input_ids"], long_["attention_mask"])
    scale = model.logit_scale.exp()
    targets = torch.arange(6)
    ls = model.config.label_smoothing

    def rank_loss(rows):
        a = F.cross_entropy(scale * img[rows] @ txt.t(), targets[rows], label_smoothing=ls)
        b = F.cross_entropy(scale * txt[rows] @ img.t(), targets[rows], label_smoothing=ls)
        return 0.5 * (a + b)

    model.zero_grad()
    objective = 0.5 * (rank_loss(slice(0, 4)) + rank_loss(slice(4, 6)))
    objective.backward()
    assert len(dist["grads"]) > 10
    for name, p in model.named_parameters():
        if name in dist["grads"]:
            torch.testing.assert_close(dist["grads"][name], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
    # and the per-rank losses are exactly the local-loss values
    torch.testing.assert_close(dist["per_rank"][0], rank_loss(slice(0, 4)).detach(), rtol=1e-10, atol=1e-12)
    assert local_contrastive_loss(img, txt, model.logit_scale).shape == ()


def _worker_equal_batches(result_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model, pixels, long_, short = _setup()
    model.config.pca_components = 32  # PCA is per process in Long-CLIP; with <= 32 rows it is the identity
    out = _loss(model, pixels, long_, short, slice(3 * rank, 3 * rank + 3))
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            grads[name] = g / 2
    total = accelerator.reduce(out.loss.detach().reshape(1), reduction="mean")
    if rank == 0:
        torch.save({"loss": total, "grads": grads}, result_path)


def test_two_processes_full_loss_and_grads_equal_batches(tmp_path):
    """Equal shards: mean of rank losses == 1-process loss, and DDP-averaged gradients == 1-process gradients."""
    result = tmp_path / "dist_eq.pt"
    spawn_distributed(_worker_equal_batches, args=(str(result),))
    dist = torch.load(result, weights_only=True)
    model, pixels, long_, short = _setup()
    model.config.pca_components = 32
    out = _loss(model, pixels, long_, short, slice(0, 6))
    out.loss.backward()
    torch.testing.assert_close(dist["loss"][0], out.loss.detach(), rtol=1e-10, atol=1e-12)
    checked = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(dist["grads"][name], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
            checked += 1
    assert checked > 10


# ---------------------------------------------------------------- original checkpoint conversion
def _to_openai_layout(model: LongCLIPModel, keep: int) -> dict:
    """Write a LongCLIPModel's weights in the authors' OpenAI-style layout with two position tables."""
    sd = model.state_dict()
    out = {}
    for tower, src, dst in (("text", "text_model.encoder.layers.", "transformer.resblocks."),
                            ("vision", "vision_model.encoder.layers.", "visual.transformer.resblocks.")):
        n = model.config.text_config.num_hidden_layers if tower == "text" else model.config.vision_config.num_hidden_layers
        for i in range(n):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for suffix in ("weight", "bias"):
                out[f"{d}attn.in_proj_{suffix}"] = torch.cat(
                    [sd[f"{s}self_attn.{x}_proj.{suffix}"] for x in ("q", "k", "v")]
                )
                out[f"{d}attn.out_proj.{suffix}"] = sd[f"{s}self_attn.out_proj.{suffix}"]
                out[f"{d}ln_1.{suffix}"] = sd[f"{s}layer_norm1.{suffix}"]
                out[f"{d}ln_2.{suffix}"] = sd[f"{s}layer_norm2.{suffix}"]
                out[f"{d}mlp.c_fc.{suffix}"] = sd[f"{s}mlp.fc1.{suffix}"]
                out[f"{d}mlp.c_proj.{suffix}"] = sd[f"{s}mlp.fc2.{suffix}"]
    table = sd["text_model.embeddings.position_embedding.weight"]
    res = table.clone()
    res[:keep] = 123.0  # dead rows of the trained table: must not leak into the merged table
    frozen = table.clone()
    frozen[keep:] = -55.0  # unused rows of the frozen table
    out.update(
        {
            "positional_embedding": frozen,
            "positional_embedding_res": res,
            "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "ln_final.weight": sd["text_model.final_layer_norm.weight"],
            "ln_final.bias": sd["text_model.final_layer_norm.bias"],
            "text_projection": sd["text_projection.weight"].t().contiguous(),
            "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
            "visual.proj": sd["visual_projection.weight"].t().contiguous(),
            "logit_scale": sd["logit_scale"],
            "mask1": torch.zeros(248, 1),
            "mask2": torch.ones(248, 1),
        }
    )
    return out


def _reference_text_features(state, ids, heads):
    """OpenAI-CLIP text forward written with torch's MultiheadAttention straight from the original layout."""
    x = state["token_embedding.weight"][ids]
    frozen, res = state["positional_embedding"], state["positional_embedding_res"]
    mask1 = torch.zeros(frozen.shape[0], 1)
    mask1[:20] = 1
    x = x + (frozen * mask1 + res * (1 - mask1))[: ids.shape[1]]
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"transformer.resblocks.{i}."
        width = x.shape[-1]
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.in_proj_weight.data = state[p + "attn.in_proj_weight"]
        attn.in_proj_bias.data = state[p + "attn.in_proj_bias"]
        attn.out_proj.weight.data = state[p + "attn.out_proj.weight"]
        attn.out_proj.bias.data = state[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x, (x.shape[-1],), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ state["text_projection"]


def test_convert_original_checkpoint(tmp_path):
    processor = tiny_processor()
    source = LongCLIPModel.from_clip(tiny_clip(seed=5, processor=processor))
    with torch.no_grad():  # make rows >= 20 differ from a plain stretch, as after training
        source.text_model.embeddings.position_embedding.weight[20:] += 0.05 * torch.randn(228, 32)
    state = _to_openai_layout(source, keep=20)
    path = tmp_path / "longclip-tiny.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="text_num_heads"):  # width 32: heads cannot be inferred as width // 64
        convert_original_checkpoint(path)
    model = convert_original_checkpoint(path, text_num_heads=4, vision_num_heads=4)
    assert model.config.text_config.max_position_embeddings == 248
    assert model.config.vision_config.image_size == 32 and model.config.vision_config.patch_size == 8
    merged = model.text_model.embeddings.position_embedding.weight
    assert torch.equal(merged[:20], state["positional_embedding"][:20])
    assert torch.equal(merged[20:], state["positional_embedding_res"][20:])
    ids = processor(text=["a large red circle next to a small blue square " * 8, "a cat"], return_tensors="pt")
    with torch.no_grad():
        ours = model.get_text_features(input_ids=ids["input_ids"]).pooler_output
        reference = _reference_text_features(state, ids["input_ids"], heads=4)
    # the reference pools with argmax(ids): EOT has the largest id in this vocabulary, as in CLIP's
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), source.encode_image(pixels), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").exists()


def test_convert_rejects_wrong_table_size(tmp_path):
    source = LongCLIPModel.from_clip(tiny_clip(seed=5))
    state = _to_openai_layout(source, keep=20)
    state["positional_embedding_res"] = state["positional_embedding_res"][:100]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="100"):
        convert_original_checkpoint(tmp_path / "bad.pt", text_num_heads=4, vision_num_heads=4)


def test_convert_refuses_pickled_code(tmp_path):
    """weights_only=True: a checkpoint carrying an arbitrary object is rejected, not executed."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception):
        convert_original_checkpoint(tmp_path / "evil.pt")
    assert stretch_position_embeddings(torch.randn(77, 2)).shape == (248, 2)
