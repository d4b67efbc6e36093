"""Where one training step's time and memory go, per part: image tower, text tower, heads, loss (and the rest of the
forward/backward glue), optimiser.

Used by ``bench_training.py``. Parts are found from the model: the encoder layers of ``vision_model`` and
``text_model`` are the towers, the variant's ``head_modules`` (the registry's model class) are the heads, everything
else run inside the forward and backward (embeddings, projections, normalisation, the loss) is "loss & glue".

* **Time** comes from module hooks (forward pre/post, backward pre/post) that switch the part the clock is charged
  to, so nested or interleaved calls are never counted twice. On CUDA each switch synchronises (slower, but exact).
* **Memory** is what autograd saves for the backward pass (the activations that set a step's peak), charged to the
  part running when each tensor is saved; each storage is counted once and parameters are not counted.

Only a direct step (``model(**batch, return_loss=True).loss.backward()`` and ``optimizer.step()``) is profiled, not
data loading.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

PARTS = ("image tower", "text tower", "heads", "loss & glue", "optimiser")


def model_parts(model: nn.Module) -> dict[nn.Module, str]:
    """Module -> part name for every module whose time is charged to a part of its own."""
    parts: dict[nn.Module, str] = {}
    for tower, name in (("vision_model", "image tower"), ("text_model", "text tower")):
        module = getattr(model, tower, None)
        if module is not None:
            for layer in module.encoder.layers:
                parts[layer] = name
    for head in getattr(model, "head_modules", ()):
        module = getattr(model, head, None)
        if isinstance(module, nn.Module):
            parts[module] = "heads"
    return parts


class StepProfiler:
    """Accumulates per-part seconds (``times``) and saved-activation bytes (``saved_bytes``) over profiled steps."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu"):
        self.model = model
        self.cuda = str(device).startswith("cuda")
        self.parts = model_parts(model)
        self.times: dict[str, float] = defaultdict(float)
        self.saved_bytes: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._last = 0.0
        self._seen: set[int] = set()
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    # -- clock
    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _switch(self, push: str | None = None, pop: bool = False) -> None:
        now = self._now()
        self.times[self._stack[-1] if self._stack else "loss & glue"] += now - self._last
        self._last = now
        if pop and self._stack:
            self._stack.pop()
        if push is not None:
            self._stack.append(push)

    # -- saved tensors
    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._params and key not in self._seen:
            self._seen.add(key)
            self.saved_bytes[self._stack[-1] if self._stack else "loss & glue"] += storage.nbytes()
        return tensor

    @contextmanager
    def _hooks(self):
        handles = []
        for module, part in self.parts.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, part=part: self._switch(push=part)))
            handles.append(module.register_forward_hook(lambda m, a, o: self._switch(pop=True)))
            handles.append(module.register_full_backward_pre_hook(lambda m, g, part=part: self._switch(push=part)))
            handles.append(module.register_full_backward_hook(lambda m, gi, go: self._switch(pop=True)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def step(self, batch: dict, optimizer: torch.optim.Optimizer, after_step=None) -> torch.Tensor:
        """One profiled training step; returns the loss."""
        self._seen.clear()
        optimizer.zero_grad(set_to_none=True)
        with self._hooks(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            self._stack.clear()
            self._last = self._now()
            loss = self.model(**batch, return_loss=True).loss
            loss.backward()
            self._switch()
        start = self._now()
        optimizer.step()
        if after_step is not None:
            after_step()
        self.times["optimiser"] += self._now() - start
        return loss.detach()

    def report(self, steps: int = 1) -> dict[str, dict[str, float]]:
        """Per part: seconds per step and saved MiB per step."""
        return {
            part: {"s": self.times.get(part, 0.0) / steps, "saved_mib": self.saved_bytes.get(part, 0) / 2**20 / steps}
            for part in PARTS
        }


def format_breakdown(name: str, report: dict[str, dict[str, float]]) -> str:
    """One line per variant: each part's share of the step time and its saved activations."""
    total = sum(r["s"] for r in report.values()) or 1.0
    cells = [f"{part} {r['s']:.2f}s ({100 * r['s'] / total:.0f}%) {r['saved_mib']:.0f} MiB" for part, r in report.items()]
    return f"{name:14s} " + " | ".join(cells)


__all__ = ["PARTS", "StepProfiler", "format_breakdown", "model_parts"]
