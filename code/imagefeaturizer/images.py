"""Image decoding shared by every caller (resize job, featurizer, prediction).

One function turns raw file bytes into pixels, so that every stage sees exactly
the same image: EXIF orientation applied, first frame of multi-frame files,
alpha composited onto a fixed background, 16-bit and float data rescaled to
8 bits, and output as 8-bit RGB (or L). Anything that cannot be decoded raises
:class:`InvalidImageError` with a short reason; no Pillow exception escapes.

Pure Pillow + numpy: no Spark or TensorFlow imports.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 50_000_000
"""Decompression-bomb guard: largest width*height (read from the header) accepted."""

MIN_SIDE = 2
"""Images with a side shorter than this (e.g. 1x1 placeholders) are invalid."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

BACKGROUND = (0, 0, 0)
"""Colour that transparent pixels are composited onto.

Black, because the background of a radiograph (air, no attenuation) is black:
a transparent margin or mask then looks like the rest of the film, instead of
showing whatever RGB values happen to be stored under alpha 0.
"""

Mode = Literal["RGB", "L"]
_OUTPUT_MODES = frozenset({"RGB", "L"})


class InvalidImageError(ValueError):
    """Bytes that cannot be decoded to a usable image.

    ``reason`` is a short human explanation (e.g. ``"truncated image data"``),
    ``origin`` the file or record it came from, if known.
    ``str()`` is ``"<origin>: <reason>"``, or just the reason without origin.
    """

    def __init__(self, reason: str, origin: str | None = None) -> None:
        super().__init__(f"{origin}: {reason}" if origin else reason)
        self.reason = reason
        self.origin = origin


def decode_to_pil(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    origin: str | None = None,
    mode: Mode = "RGB",
) -> Image.Image:
    """Decode image bytes to a fully loaded Pillow image in ``mode`` ("RGB" or "L").

    The size in the header is checked against ``max_pixels`` and ``MIN_SIDE``
    before any pixel is decoded. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``)
    also applies; to accept images above it, raise it as well as ``max_pixels``.

    Raises:
        InvalidImageError: empty, truncated, corrupt, unrecognised, too large or
            too small input; ``origin`` is used in the message.
        ValueError: ``mode`` is not "RGB" or "L".
    """
    _check_mode(mode)
    with _bomb_warnings_as_errors(), _open(data, origin) as img:
        check_size(img.size, max_pixels, origin)
        try:
            img.load()
            oriented = ImageOps.exif_transpose(img)
        except MemoryError:
            raise
        except Exception as exc:
            raise _decode_error(exc, origin) from exc
    return to_mode(oriented, mode, origin)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    origin: str | None = None,
    mode: Mode = "RGB",
) -> np.ndarray:
    """Decode image bytes to a writable, C-contiguous uint8 array.

    Shape is (height, width, 3) for mode "RGB", (height, width) for "L".
    Same rules and errors as :func:`decode_to_pil`.
    """
    return np.array(decode_to_pil(data, max_pixels=max_pixels, origin=origin, mode=mode))


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mode: Mode = "RGB",
) -> np.ndarray:
    """Read an image file and decode it with :func:`decode_image` (origin = path).

    A missing or unreadable file also raises :class:`InvalidImageError`.
    """
    origin = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read file: {exc.strerror or exc}", origin) from exc
    return decode_image(data, max_pixels=max_pixels, origin=origin, mode=mode)


def resize_pil(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` = (width, height) with bilinear filtering, ignoring aspect ratio.

    Identical to ``keras.utils.load_img(target_size=(height, width),
    interpolation="bilinear")``, which calls ``img.resize((width, height),
    Image.BILINEAR)``. Returns a new image.
    """
    return img.resize(size, Image.Resampling.BILINEAR)


def image_info(data: bytes, *, origin: str | None = None) -> dict[str, str | int]:
    """Read format, mode, width and height from the header only, for data audits.

    Pixels are not decoded, so truncated data or a size that
    :func:`decode_to_pil` would reject is not detected here.

    Returns:
        e.g. ``{"format": "PNG", "mode": "L", "width": 2048, "height": 2500}``.

    Raises:
        InvalidImageError: empty input, unrecognised format or unreadable header.
    """
    with _bomb_warnings_as_errors(), _open(data, origin) as img:
        width, height = img.size
        return {"format": img.format or "", "mode": img.mode, "width": width, "height": height}


def is_image_file(name: str) -> bool:
    """True if ``name`` (a path or URI) has an image extension and is not hidden."""
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def check_size(size: tuple[int, int], max_pixels: int, origin: str | None = None) -> None:
    """Reject a (width, height) above ``max_pixels`` pixels or with a side below ``MIN_SIDE``."""
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise InvalidImageError(
            f"image too large: {width}x{height} = {pixels} pixels > limit {max_pixels} "
            "(raise max_pixels)",
            origin,
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidImageError(
            f"image too small: {width}x{height} (min side {MIN_SIDE} px)", origin
        )


def to_mode(img: Image.Image, mode: Mode, origin: str | None = None) -> Image.Image:
    """Bring a loaded image of any Pillow mode to 8-bit ``mode`` ("RGB" or "L").

    16-bit, 32-bit and float data are rescaled over their real range; alpha and
    palette transparency are composited onto ``BACKGROUND``; grayscale is
    replicated to RGB. May return ``img`` itself when it is already in ``mode``.
    """
    _check_mode(mode)
    source_mode = img.mode
    if source_mode in ("I", "F") or source_mode.startswith("I;16"):
        img = Image.fromarray(_rescale_to_uint8(np.asarray(img)))
    try:
        if img.has_transparency_data:
            opaque = Image.new("RGBA", img.size, (*BACKGROUND, 255))
            img = Image.alpha_composite(opaque, img.convert("RGBA"))
        return img if img.mode == mode else img.convert(mode)
    except ValueError as exc:
        raise InvalidImageError(f"unsupported pixel mode {source_mode}", origin) from exc


def _check_mode(mode: str) -> None:
    if mode not in _OUTPUT_MODES:
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")


@contextmanager
def _bomb_warnings_as_errors() -> Iterator[None]:
    """Turn Pillow's DecompressionBombWarning into an exception, only inside the block.

    The filter is restored on exit; like any ``catch_warnings`` it is not thread-safe,
    which is fine for Spark's one-task-per-process Python workers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _open(data: bytes, origin: str | None) -> Image.Image:
    """Open (header only) or raise InvalidImageError."""
    if not data:
        raise InvalidImageError("empty file (0 bytes)", origin)
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError("not an image (unrecognised format)", origin) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_error(exc, origin) from exc


def _decode_error(exc: Exception, origin: str | None) -> InvalidImageError:
    """Map an exception raised by Pillow while opening or decoding to a short reason."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return InvalidImageError(
            f"image too large for Pillow's decompression-bomb guard: {exc}", origin
        )
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return InvalidImageError("truncated image data", origin)
    return InvalidImageError(f"corrupt image data ({type(exc).__name__}: {exc})", origin)


def _rescale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map the real min..max of the finite values linearly onto 0..255.

    A constant image becomes all zeros; non-finite values (float images) become 0.
    """
    values = pixels.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low = values[finite].min()
    high = values[finite].max()
    if high == low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)
