"""Robust image loading for training data: any common file, bytes or PIL image in, an RGB PIL image out.

Web-scale caption sets always contain some broken files. `load_image` turns every way an image can be unusable
into a `BadImageError` with a short machine-readable ``reason``, so a dataset can skip and count bad samples
instead of crashing a training run hours in.
"""

from __future__ import annotations

import io
import os
import re
import stat
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

#: Default pixel limit: 8192 x 8192 (~67M pixels). Below PIL's own warning threshold (~89M), so PIL never warns
#: for an image we accept; a 67M-pixel RGB image already decodes to ~200 MB.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

#: Default byte limit of an encoded image (256 MiB), checked before anything is decoded. Far above any real photo
#: (a 100-megapixel JPEG is ~30 MB); it bounds what one bad path (a huge file, a device) can make a worker read.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024

#: Images with a side shorter than this are rejected: a 1-pixel side cannot be resized meaningfully.
MIN_IMAGE_SIDE = 2

#: Every ``reason`` a `BadImageError` can carry.
BAD_IMAGE_REASONS = ("missing", "not_a_file", "empty", "corrupt", "too_large", "too_small")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Mapping[str, Any], Image.Image]


_OBJECT_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


class BadImageError(ValueError):
    """An image that cannot be used for training.

    Args:
        reason (`str`): one of `BAD_IMAGE_REASONS` (``missing``, ``not_a_file``, ``empty``, ``corrupt``,
            ``too_large``, ``too_small``); stable, for counting skipped samples per reason.
        detail (`str`, *optional*): a human-readable explanation (the file, the decoder's message).
    """

    def __init__(self, reason: str, detail: str = ""):
        # Decoder messages name in-memory buffers by address ("<_io.BytesIO object at 0x7f...>"): drop the address
        # so the same bad sample always gives the same message.
        detail = _OBJECT_ADDRESS.sub(r"<\1>", detail)
        if reason not in BAD_IMAGE_REASONS:
            raise ValueError(f"unknown bad-image reason {reason!r}; expected one of {BAD_IMAGE_REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):
        # Keep (reason, detail) when the error crosses a DataLoader worker boundary (pickling).
        return (type(self), (self.reason, self.detail))


def describe_image_source(source: Any) -> str:
    """A short description of an image source for error messages (a path, or the size of in-memory bytes)."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Mapping):
        if source.get("path"):
            return str(source["path"])
        data = source.get("bytes")
        return f"<{len(data)} bytes>" if data is not None else "<empty image dict>"
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def _byte_length(data: bytes | bytearray | memoryview) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


def _check_byte_count(count: int, max_image_bytes: int | None, where: str) -> None:
    if max_image_bytes is not None and count > max_image_bytes:
        raise BadImageError("too_large", f"{where} has more than max_image_bytes={max_image_bytes} bytes ({count})")


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words, for error messages."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _stat_regular_file(path: str) -> os.stat_result:
    """``os.stat`` of `path` (following links), raising `BadImageError` unless it is a regular file.

    Nothing is opened: opening a FIFO blocks until a writer appears, and a device such as ``/dev/zero`` never ends.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BadImageError("missing", f"no such file: {path}") from None
    except (OSError, ValueError) as error:  # ENOTDIR, ENAMETOOLONG, EACCES on a parent, a NUL in the path
        raise BadImageError("missing", f"cannot read {path}: {error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BadImageError("not_a_file", f"{path} is {_file_kind(info.st_mode)}, not a regular file")
    return info


def _read_file(path: str, max_image_bytes: int | None) -> bytes:
    """The bytes of a regular file, at most ``max_image_bytes + 1`` of them ever read."""
    info = _stat_regular_file(path)
    _check_byte_count(info.st_size, max_image_bytes, path)
    # O_NONBLOCK: should the path have become a FIFO since the stat, opening it still returns at once (the fstat
    # below then rejects it). It has no effect on regular files.
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise BadImageError("missing", f"no such file: {path}") from None
    except OSError as error:
        raise BadImageError("missing", f"cannot read {path}: {error}") from None
    try:
        with open(descriptor, "rb", closefd=True) as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise BadImageError("not_a_file", f"{path} is {_file_kind(mode)}, not a regular file")
            # Reading the bytes ourselves means no file handle stays open inside PIL (multi-frame formats keep
            # theirs open until the image is closed) and a 0-byte file is recognised without a decoder. The read is
            # bounded: a file that grew after the stat cannot make us hold more than the limit (plus one byte).
            data = handle.read() if max_image_bytes is None else handle.read(max_image_bytes + 1)
    except OSError as error:
        raise BadImageError("missing", f"cannot read {path}: {error}") from None
    _check_byte_count(len(data), max_image_bytes, path)
    return data


def _read_source(
    source: ImageSource, max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[bytes | None, str | None, Image.Image | None]:
    """Resolve `source` into (encoded bytes, path they came from, or an in-memory PIL image)."""
    if isinstance(source, Image.Image):
        return None, None, source
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_byte_count(_byte_length(source), max_image_bytes, describe_image_source(source))
        return bytes(source), None, None
    if isinstance(source, Mapping):
        # `datasets.Image(decode=False)` gives {"bytes": ..., "path": ...}; bytes win when both are set (the path
        # is then often just a file name inside an archive).
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise BadImageError("missing", f"image dict holds {type(data).__name__} under 'bytes', not bytes")
            where = str(path) if path else f"<{_byte_length(data)} bytes>"
            _check_byte_count(_byte_length(data), max_image_bytes, where)
            return bytes(data), path, None
        if path:
            return _read_source(path, max_image_bytes)
        raise BadImageError("missing", "image dict has neither bytes nor path")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return _read_file(path, max_image_bytes), path, None
    if source is None:
        raise BadImageError("missing", "no image given (None)")
    # A number or list in the image column is bad data like any other, not a programming error: skip it.
    raise BadImageError("missing", f"unsupported image value of type {type(source).__name__}")


def _check_size(width: int, height: int, max_image_pixels: int | None, where: str) -> None:
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise BadImageError("too_large", f"{where} is {width}x{height} = {width * height} pixels > {max_image_pixels}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImageError("too_small", f"{where} is {width}x{height}; a side is under {MIN_IMAGE_SIDE} px")


def _to_uint8_gray(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth single-channel image (I;16*, I, F) onto 8 bits by scaling, never by clipping.

    PIL's own ``convert("L")`` clips these modes at 255, which turns almost every 16-bit photo white.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0  # 65535 -> 255 exactly, 32768 -> 127.5 -> 128
    elif image.mode == "I":
        # 32-bit integer images come from 16-bit PNG/TIFF files in most readers: assume the 16-bit range when the
        # values fit it, otherwise stretch the observed range.
        if values.size and values.min() >= 0 and values.max() <= 65535:
            scaled = values.astype(np.float64) / 257.0
        else:
            scaled = _stretch(values.astype(np.float64))
    else:  # "F": floats, usually in [0, 1]; anything else is stretched
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            scaled = values * 255.0
        else:
            scaled = _stretch(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha onto a white background (transparent areas of logos, stickers, PNG icons
    would otherwise become black, or whatever colour the invisible pixels happen to hold)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB.

    Grayscale stays gray (replicated channels), 16-bit and float grayscale are scaled to 8 bits, anything with
    transparency (RGBA, LA, PA, palette with a transparent index) is composited onto white, and CMYK / YCbCr / LAB /
    HSV / palette images go through PIL's conversion.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _to_uint8_gray(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(image)
    if mode == "P":
        if "transparency" in image.info:
            return _on_white(image)
        return image.convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    reference_decode: bool = False,
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES,
) -> Image.Image:
    """Load an image as an RGB PIL image, raising `BadImageError` for anything unusable.

    Args:
        source: a file path (`str` / `os.PathLike`), encoded bytes, a ``{"bytes": ..., "path": ...}`` dict (what a
            `datasets.Image(decode=False)` column holds), or a PIL image.
        max_image_pixels (`int`, *optional*, defaults to 8192 * 8192):
            reject images with more pixels than this, checked from the file header before anything is decoded.
            `None` disables the check (PIL's own decompression-bomb limit, twice `PIL.Image.MAX_IMAGE_PIXELS`,
            still applies and is reported as ``too_large``).
        reference_decode (`bool`, *optional*, defaults to `False`, keyword-only):
            read the stored frame as the authors' evaluation code does: no EXIF orientation correction. Modes are
            converted as in training (`to_rgb`), so an 8-bit RGB or grayscale JPEG, what the benchmarks hold, gives
            exactly the authors' ``Image.open(path).convert("RGB")``. Every check and `BadImageError` reason stays
            the same. Evaluation uses it; training keeps the default.
        max_image_bytes (`int`, *optional*, defaults to 256 MiB, keyword-only):
            reject encoded images larger than this (``too_large``) before decoding. A file's size is checked with
            ``os.stat`` first and at most ``max_image_bytes + 1`` bytes are ever read; bytes already in memory are
            checked by length. `None` disables the check (non-regular files are still refused).

    Returns:
        `PIL.Image.Image`: a fully decoded RGB image that holds no open file; EXIF-orientation-corrected unless
        `reference_decode` is set.

    Raises:
        `BadImageError` with ``reason`` ``missing`` (no such file / no data), ``not_a_file`` (a directory, FIFO,
        device or socket: never opened), ``empty`` (0 bytes), ``corrupt`` (unidentifiable, undecodable or
        truncated), ``too_large`` (too many bytes or pixels) or ``too_small`` (a side under 2 px).

    Example:

    ```python
    >>> from hf_longclip.data.images import BadImageError, load_image
    >>> try:
    ...     load_image(b"not an image")
    ... except BadImageError as error:
    ...     error.reason
    'corrupt'
    ```
    """
    data, path, image = _read_source(source, max_image_bytes)
    where = path or describe_image_source(source)
    if image is not None:
        _check_size(image.width, image.height, max_image_pixels, where)
        try:
            image.load()
            # Both paths return a new image, so the caller's object is never handed back or changed.
            return _decode(image, reference_decode)
        except BadImageError:
            raise
        except Exception as error:  # a lazily opened PIL image can still fail to decode here
            raise BadImageError("corrupt", f"{where}: {type(error).__name__}: {error}") from None

    if not data:
        raise BadImageError("empty", f"{where} has 0 bytes")
    try:
        # Opening reads only the header; the pixel check below runs before any decoding.
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadImageError("too_large", f"{where}: {error}") from None
    except Exception as error:  # UnidentifiedImageError, or a header parser's own error
        raise BadImageError("corrupt", f"{where}: {type(error).__name__}: {error}") from None
    with opened:
        _check_size(opened.width, opened.height, max_image_pixels, where)
        try:
            # Decode here, inside the try: PIL decodes lazily, and a truncated file only fails at load time.
            # ImageFile.LOAD_TRUNCATED_IMAGES stays False (a global, and it would hide truncation as grey pixels).
            opened.load()
            return _decode(opened, reference_decode)  # always a new image, so closing `opened` is safe
        except Image.DecompressionBombError as error:
            raise BadImageError("too_large", f"{where}: {error}") from None
        except BadImageError:
            raise
        except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
            raise BadImageError("corrupt", f"{where}: {type(error).__name__}: {error}") from None


def _decode(image: Image.Image, reference_decode: bool) -> Image.Image:
    """A new RGB image from a loaded one: the training conversion (EXIF orientation, `to_rgb`) or, with
    `reference_decode`, PIL's plain ``convert("RGB")`` (a copy for RGB images)."""
    if reference_decode:
        return to_rgb(image if image.mode != "RGB" else image.copy())
    return to_rgb(_exif_transpose(image))


def _exif_transpose(image: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose` (returns a new image), ignoring broken EXIF blocks: orientation is a nicety, and a
    photo that decodes should not be dropped because its metadata is malformed."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image.copy()


def image_source_exists(source: Any, max_image_bytes: int | None = None) -> str | None:
    """Cheap pre-flight check of an image source without decoding or opening anything: the `BadImageError` reason
    it will certainly fail with (``missing``, ``not_a_file``, ``empty``, or ``too_large`` when `max_image_bytes` is
    given and the size exceeds it), or `None` if it may be fine. A path costs one ``os.stat``; a FIFO or device is
    recognised from it and never opened, so this cannot block."""
    if source is None:
        return "missing"
    if isinstance(source, Image.Image):
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _bytes_reason(_byte_length(source), max_image_bytes)
    if isinstance(source, Mapping):
        data = source.get("bytes")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                return "missing"
            return _bytes_reason(_byte_length(data), max_image_bytes)
        if source.get("path"):
            return image_source_exists(source["path"], max_image_bytes)
        return "missing"
    if isinstance(source, (str, os.PathLike)):
        try:
            info = os.stat(source)
        except (OSError, ValueError):
            return "missing"
        if not stat.S_ISREG(info.st_mode):
            return "not_a_file"
        return _bytes_reason(info.st_size, max_image_bytes)
    return "missing"


def _bytes_reason(count: int, max_image_bytes: int | None) -> str | None:
    if count == 0:
        return "empty"
    if max_image_bytes is not None and count > max_image_bytes:
        return "too_large"
    return None


__all__ = [
    "BAD_IMAGE_REASONS",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "BadImageError",
    "describe_image_source",
    "image_source_exists",
    "load_image",
    "to_rgb",
]
