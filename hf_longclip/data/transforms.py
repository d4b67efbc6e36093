"""Training and evaluation image transforms on PIL + torch, without torchvision.

``"eval"`` (OpenAI CLIP's eval transform) and ``"random_resized_crop"`` (beta-CLIP's training augmentation).
See docs/data.md (Transforms per recipe).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

#: Names accepted by `build_transform`.
TRANSFORM_NAMES = ("eval", "random_resized_crop")


def _resample(interpolation: str | int | Image.Resampling) -> Image.Resampling:
    if isinstance(interpolation, str):
        try:
            return _RESAMPLE[interpolation.lower()]
        except KeyError:
            raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {sorted(_RESAMPLE)}") from None
    return Image.Resampling(int(interpolation))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def to_normalized_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` float32 tensor: scaled to [0, 1], then ``(x - mean) / std`` per channel."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


class EvalTransform:
    r"""
    OpenAI CLIP's evaluation transform: resize the shortest side to `size` (bicubic, the long side to
    ``int(size * long / short)``), centre-crop `crop_size`, scale to [0, 1] and normalise.

    It reproduces transformers' `CLIPImageProcessorPil` (same PIL resize on 8-bit pixels, same crop offsets
    ``(H - h) // 2``), so training and evaluation see the same pixels. torchvision's ``CenterCrop`` rounds the offset
    instead, which can shift the crop by one pixel when the margin is odd; we follow the processor.

    Args:
        size (`int` or `(height, width)`, defaults to 224): shortest-edge length, or an exact output size to resize
            to (then no aspect ratio is kept).
        crop_size (`int` or `(height, width)`, *optional*): centre-crop size; defaults to `size` when `size` is an
            int. `None` with a pair `size` means no crop (the resize already gives the exact size).
        mean / std (`Sequence[float]`, defaults to OpenAI CLIP's): per-channel normalisation.
        interpolation (`str` or `int`, defaults to ``"bicubic"``): PIL resampling filter.
        center_crop (`bool`, defaults to `True`): `False` keeps the resized image uncropped (a processor with
            ``do_center_crop=False``).

    Example:

    ```python
    >>> from PIL import Image
    >>> from hf_longclip.data.transforms import EvalTransform
    >>> EvalTransform(224)(Image.new("RGB", (640, 480))).shape
    torch.Size([3, 224, 224])
    ```
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        crop_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | int = "bicubic",
        center_crop: bool = True,
    ):
        self.size = size if isinstance(size, int) else _pair(size)
        if crop_size is None and isinstance(size, int):
            crop_size = size
        self.crop_size = None if crop_size is None or not center_crop else _pair(crop_size)
        self.mean = tuple(OPENAI_CLIP_MEAN if mean is None else mean)
        self.std = tuple(OPENAI_CLIP_STD if std is None else std)
        self.resample = _resample(interpolation)

    def resize_shape(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the image is resized to before cropping."""
        if not isinstance(self.size, int):
            return self.size[1], self.size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        # `rng` is accepted (and unused) so every transform has the same call signature as `TrainTransform`.
        if image.mode != "RGB":
            image = image.convert("RGB")
        new_size = self.resize_shape(*image.size)
        if new_size != image.size:
            image = image.resize(new_size, resample=self.resample)
        if self.crop_size is not None:
            image = center_crop(image, self.crop_size)
        return to_normalized_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, crop_size={self.crop_size}, resample={self.resample.name})"


def center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centre ``(height, width)`` of `image`, zero-padding first if it is smaller (as the processor does)."""
    crop_h, crop_w = size
    width, height = image.size
    if width < crop_w or height < crop_h:
        # Only reachable with a custom crop larger than the resized image; pad like transformers' center_crop.
        padded = Image.new("RGB", (max(width, crop_w), max(height, crop_h)))
        padded.paste(image, (math.ceil((padded.width - width) / 2), math.ceil((padded.height - height) / 2)))
        image, (width, height) = padded, padded.size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random | Any = random,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Sample a ``RandomResizedCrop`` box ``(top, left, height, width)`` the way torchvision defines it.

    Up to `attempts` times: draw an area fraction uniformly from `scale` and an aspect ratio log-uniformly from
    `ratio`; accept the first box that fits in the image, at a uniformly random position. If none fits, fall back to
    the largest centred box whose aspect ratio is clamped into `ratio`.

    Args:
        width / height (`int`): image size.
        scale (`(float, float)`): bounds of the crop area as a fraction of the image area.
        ratio (`(float, float)`): bounds of the crop's width / height.
        rng: a `random.Random` (or the `random` module, the default) supplying ``uniform`` and ``randint``.
        attempts (`int`, defaults to 10): torchvision's number of tries.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TrainTransform:
    r"""
    ``RandomResizedCrop`` then normalise, as torchvision defines the crop (see `sample_crop_box`), with no flip.

    Randomness comes from `generator` if one is given, else from Python's global `random` module. The default is
    what makes DataLoader workers differ: each worker's `random` is seeded separately (see `make_dataloader`),
    whereas a `random.Random` held here would be copied into every worker in the same state and give every worker
    the same crops. Pass `rng=` to a single call for fully explicit control.

    Args:
        size (`int` or `(height, width)`, defaults to 224): output size.
        scale (`(float, float)`, defaults to (0.5, 1.0)): crop area bounds (beta-CLIP's; torchvision's default is
            (0.08, 1.0)).
        ratio (`(float, float)`, defaults to (3/4, 4/3)): crop aspect-ratio bounds.
        interpolation (`str` or `int`, defaults to ``"bilinear"``): PIL filter for the resize (torchvision's default).
        mean / std (`Sequence[float]`, defaults to OpenAI CLIP's): per-channel normalisation.
        generator (`random.Random`, *optional*): a dedicated RNG (single-process use, tests).

    Example:

    ```python
    >>> import random
    >>> from PIL import Image
    >>> from hf_longclip.data.transforms import TrainTransform
    >>> transform = TrainTransform(224)
    >>> image = Image.new("RGB", (640, 480))
    >>> bool((transform(image, rng=random.Random(0)) == transform(image, rng=random.Random(0))).all())
    True
    ```
    """

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str | int = "bilinear",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        generator: random.Random | None = None,
    ):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.resample = _resample(interpolation)
        self.mean = tuple(OPENAI_CLIP_MEAN if mean is None else mean)
        self.std = tuple(OPENAI_CLIP_STD if std is None else std)
        self.generator = generator

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        rng = rng or self.generator or random
        top, left, crop_h, crop_w = sample_crop_box(image.width, image.height, self.scale, self.ratio, rng)
        # resize(box=...) crops and resizes in one pass, without materialising the crop.
        out_h, out_w = self.size
        image = image.resize((out_w, out_h), resample=self.resample, box=(left, top, left + crop_w, top + crop_h))
        return to_normalized_tensor(image, self.mean, self.std)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(size={self.size}, scale={self.scale}, ratio={self.ratio}, resample={self.resample.name})"


def build_transform(
    name: str,
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> EvalTransform | TrainTransform:
    """Build a transform by name.

    Args:
        name (`str`): ``"eval"`` (the CLIP eval transform; Long-CLIP / FineLIP train with it) or
            ``"random_resized_crop"`` (beta-CLIP: scale (0.5, 1), bilinear, no flip).
        size (`int`, defaults to 224): output side.
        mean / std (`Sequence[float]`, *optional*): normalisation; OpenAI CLIP's by default.
        **kwargs: passed to the transform (e.g. ``scale=`` or ``crop_size=``).
    """
    if name == "eval":
        return EvalTransform(size, mean=mean, std=std, **kwargs)
    if name == "random_resized_crop":
        return TrainTransform(size, mean=mean, std=std, **kwargs)
    raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORM_NAMES}")


def _size_from_dict(size: Any) -> int | tuple[int, int] | None:
    """Read a transformers size setting (a dict, a `SizeDict`, or an int)."""
    if size is None or isinstance(size, int):
        return size
    get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
    if get("shortest_edge"):
        return int(get("shortest_edge"))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    raise ValueError(f"cannot read an image size from {size!r}")


def transform_from_processor(processor: Any, name: str = "eval", **kwargs: Any) -> EvalTransform | TrainTransform:
    """Build the transform `name` with the size, crop, mean, std and (for ``"eval"``) resampling of a processor's
    image processor, so a model trained at another resolution (e.g. 336) gets matching pixels.

    Args:
        processor: a `LongCLIPProcessor` (or anything with an ``image_processor``), or an image processor itself.
        name (`str`, defaults to ``"eval"``): as in `build_transform`.
        **kwargs: overrides passed to the transform.
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = _size_from_dict(getattr(image_processor, "size", None)) or 224
    crop = _size_from_dict(getattr(image_processor, "crop_size", None))
    if not getattr(image_processor, "do_center_crop", True):
        crop = None
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if name == "eval":
        kwargs.setdefault("crop_size", crop)
        kwargs.setdefault("center_crop", crop is not None)
        resample = getattr(image_processor, "resample", None)
        if resample is not None:
            kwargs.setdefault("interpolation", int(resample))
        return EvalTransform(size, mean=mean, std=std, **kwargs)
    # A random crop's output is the model input: the processor's crop size (or its resize size).
    out = crop if crop is not None else size
    return build_transform(name, out, mean=mean, std=std, **kwargs)


__all__ = [
    "TRANSFORM_NAMES",
    "EvalTransform",
    "TrainTransform",
    "build_transform",
    "center_crop",
    "sample_crop_box",
    "to_normalized_tensor",
    "transform_from_processor",
]
