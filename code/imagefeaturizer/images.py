"""Image decoding shared by every caller (resize job, featurizer, prediction).

One function turns raw file bytes into pixels, so that every stage sees exactly
the same image: EXIF orientation applied, first frame of multi-frame files,
alpha composited onto a fixed background, 16-bit and float data rescaled to
8 bits, and output as 8-bit RGB (or L). Spark's image struct
(``spark.read.format("image")``) is turned into the same kind of image by
:func:`from_spark_image`; :func:`decode_record` takes either. Anything that
cannot be decoded raises :class:`InvalidImageError` with a short reason; no
Pillow exception escapes.

Pure Pillow + numpy: no Spark or TensorFlow imports.
"""

from __future__ import annotations

import io
import os
import posixpath
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 50_000_000
"""Decompression-bomb guard: largest width*height (read from the header) accepted."""

MAX_PIXELS_SETTING = "maxImagePixels"
"""The setting a "too large" message tells users to raise (the featurizer's Param); callers
whose users set the limit under another name pass that name as ``limit_name``."""

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
    limit_name: str = MAX_PIXELS_SETTING,
) -> Image.Image:
    """Decode image bytes to a fully loaded Pillow image in ``mode`` ("RGB" or "L").

    The size in the header is checked against ``max_pixels`` and ``MIN_SIDE``
    before any pixel is decoded; a "too large" message tells users to raise
    ``limit_name``. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``) also
    applies; to accept images above it, raise it as well as ``max_pixels``.

    Raises:
        InvalidImageError: empty, truncated, corrupt, unrecognised, too large or
            too small input; ``origin`` is used in the message.
        ValueError: ``mode`` is not "RGB" or "L".
    """
    _check_mode(mode)
    with _bomb_warnings_as_errors(), _open(data, origin) as img:
        check_size(img.size, max_pixels, origin, limit_name=limit_name)
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
    limit_name: str = MAX_PIXELS_SETTING,
) -> np.ndarray:
    """Decode image bytes to a writable, C-contiguous uint8 array.

    Shape is (height, width, 3) for mode "RGB", (height, width) for "L".
    Same rules and errors as :func:`decode_to_pil`.
    """
    return np.array(
        decode_to_pil(data, max_pixels=max_pixels, origin=origin, mode=mode, limit_name=limit_name)
    )


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


SPARK_IMAGE_FIELDS = ("height", "width", "nChannels", "data")
"""Fields of Spark's image struct that :func:`from_spark_image` reads (``origin`` and ``mode`` too)."""

_SPARK_8BIT_MODES = {1: 0, 3: 16, 4: 24}
"""nChannels -> the OpenCV type Spark's image reader writes for it (CV_8UC1, CV_8UC3, CV_8UC4)."""

_SPARK_CHANNEL_ORDER = {1: "L", 3: "BGR", 4: "BGRA"}


def decode_record(
    record: bytes | bytearray | memoryview | Mapping | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    origin: str | None = None,
    mode: Mode = "RGB",
    limit_name: str = MAX_PIXELS_SETTING,
) -> Image.Image:
    """One cell of an image column to an image in ``mode``: file bytes (``binaryFile``'s
    ``content``), Spark's image struct as a mapping (``format("image")``), or None.

    Raises:
        InvalidImageError: None, or what :func:`decode_to_pil` / :func:`from_spark_image` reject.
    """
    if record is None:
        raise InvalidImageError("no image (null)", origin)
    options = dict(max_pixels=max_pixels, origin=origin, mode=mode, limit_name=limit_name)
    if isinstance(record, Mapping):
        return from_spark_image(record, **options)
    return decode_to_pil(bytes(record), **options)


def from_spark_image(
    record: Mapping,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    origin: str | None = None,
    mode: Mode = "RGB",
    limit_name: str = MAX_PIXELS_SETTING,
) -> Image.Image:
    """Spark's image struct (8-bit gray, BGR or BGRA bytes, row by row) as an image in ``mode``.

    Every field is checked first; the size rules of :func:`decode_to_pil` apply, and alpha is
    composited onto ``BACKGROUND`` the same way.

    Raises:
        InvalidImageError: the struct Spark writes for a file it could not read, or a field
            that is missing or does not fit the others (the reason names the field).
        ValueError: ``mode`` is not "RGB" or "L".
    """
    _check_mode(mode)
    height, width, channels = _spark_image_shape(record, origin)
    check_size((width, height), max_pixels, origin, limit_name=limit_name)
    pixels = _spark_image_pixels(record.get("data"), (height, width, channels), origin)
    if channels == 1:
        image = Image.fromarray(pixels[:, :, 0], "L")
    else:
        order = [2, 1, 0] if channels == 3 else [2, 1, 0, 3]  # BGR(A) -> RGB(A)
        image = Image.fromarray(np.ascontiguousarray(pixels[:, :, order]), "RGB" if channels == 3 else "RGBA")
    return to_mode(image, mode, origin)


def _spark_image_shape(record: Mapping, origin: str | None) -> tuple[int, int, int]:
    """(height, width, nChannels) of an image struct, or InvalidImageError naming the bad field."""
    missing = [name for name in SPARK_IMAGE_FIELDS if _is_null(record.get(name))]
    if len(missing) == len(SPARK_IMAGE_FIELDS):
        raise InvalidImageError("no image (null)", origin)
    if missing:
        raise InvalidImageError(f"image struct without {', '.join(missing)}", origin)
    height, width, channels = (record[name] for name in SPARK_IMAGE_FIELDS[:3])
    if (height, width, channels) == (-1, -1, -1):
        raise InvalidImageError(
            "Spark's image reader could not decode this file (read it with format 'binaryFile' "
            "to get the reason)",
            origin,
        )
    for name, value in (("height", height), ("width", width)):
        if _whole_number(value) is None or value < 1:
            raise InvalidImageError(
                f"image struct has {name}={value!r}: expected a positive number of pixels", origin
            )
    if _whole_number(channels) not in _SPARK_8BIT_MODES:
        raise InvalidImageError(f"image struct has nChannels={channels!r}: expected 1, 3 or 4", origin)
    channels = _whole_number(channels)
    cv_type = record.get("mode")
    if not _is_null(cv_type) and cv_type != _SPARK_8BIT_MODES[channels]:
        raise InvalidImageError(
            f"image struct has mode={cv_type!r}: expected {_SPARK_8BIT_MODES[channels]} (OpenCV's "
            f"8-bit type for {channels} channels)",
            origin,
        )
    return _whole_number(height), _whole_number(width), channels


def _is_null(value) -> bool:
    """None, or NaN (pandas' null in a numeric column)."""
    return value is None or (isinstance(value, float) and value != value)


def _whole_number(value) -> int | None:
    """``value`` as an int if it is a whole number (pandas may hand ints over as floats), else None."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return int(value) if float(value).is_integer() else None


def _spark_image_pixels(data, shape: tuple[int, int, int], origin: str | None) -> np.ndarray:
    """The struct's bytes as a (height, width, nChannels) uint8 array, if their number fits."""
    buffer = bytes(data)
    height, width, channels = shape
    expected = height * width * channels
    if len(buffer) != expected:
        raise InvalidImageError(
            f"image struct data has {len(buffer)} bytes, but height x width x nChannels = "
            f"{height}x{width}x{channels} = {expected} ({_SPARK_CHANNEL_ORDER[channels]})",
            origin,
        )
    return np.frombuffer(buffer, dtype=np.uint8).reshape(shape)


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


def check_size(
    size: tuple[int, int],
    max_pixels: int,
    origin: str | None = None,
    *,
    limit_name: str = MAX_PIXELS_SETTING,
) -> None:
    """Reject a (width, height) above ``max_pixels`` pixels or with a side below ``MIN_SIDE``.

    The "too large" message names ``limit_name``: the setting users raise to accept the image.
    """
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise InvalidImageError(
            f"image too large: {width}x{height} = {pixels} pixels > limit {max_pixels} "
            f"(raise {limit_name})",
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
