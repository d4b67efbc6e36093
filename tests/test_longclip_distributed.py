"""Long-CLIP across 2 CPU processes: gathered losses and gradients equal to one process."""

import torch
import torch.nn.functional as F

from hf_longclip import LongCLIPModel
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
