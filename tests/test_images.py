"""Tests for imagefeaturizer.images. Every image is generated here, in memory or in tmp_path."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagefeaturizer.images import (
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    InvalidImageError,
    check_size,
    decode_image,
    decode_record,
    decode_to_pil,
    from_spark_image,
    image_info,
    is_image_file,
    load_image,
    resize_pil,
    to_mode,
)

ORIGIN = "s3a://bucket/patient-17/view1.png"


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth, asymmetric RGB test image."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        x * 255 / (width - 1),
        y * 255 / (height - 1),
        128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0),
    ]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def few_colours() -> np.ndarray:
    """The gradient reduced to multiples of 51 (< 256 colours), so GIF stores it exactly."""
    return (np.rint(gradient() / 51) * 51).astype(np.uint8)


def quadrants() -> np.ndarray:
    """32x64 image with four differently coloured quadrants, to check rotations."""
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:16, :32] = (255, 0, 0)
    img[:16, 32:] = (0, 255, 0)
    img[16:, :32] = (0, 0, 255)
    img[16:, 32:] = (255, 255, 255)
    return img


def png_with_header_size(width: int, height: int) -> bytes:
    """Grayscale PNG whose header claims width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_rgb_uint8(arr: np.ndarray, height: int, width: int) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (height, width, 3)
    assert arr.flags.c_contiguous


# --- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True}), ("GIF", {})],
)
def test_lossless_formats_decode_identically(fmt: str, params: dict[str, object]) -> None:
    expected = few_colours()
    decoded = decode_image(encode(Image.fromarray(expected), fmt, **params))
    assert_rgb_uint8(decoded, *expected.shape[:2])
    np.testing.assert_array_equal(decoded, expected)


def test_jpeg_matches_png_within_jpeg_loss() -> None:
    img = Image.fromarray(gradient())
    from_png = decode_image(encode(img, "PNG"))
    from_jpeg = decode_image(encode(img, "JPEG", quality=95))
    assert_rgb_uint8(from_jpeg, *from_png.shape[:2])
    assert mean_abs_diff(from_jpeg, from_png) < 3


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    expected = gradient()
    data = encode(Image.fromarray(expected).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert_rgb_uint8(decoded, *expected.shape[:2])
    assert mean_abs_diff(decoded, expected) < 3


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_multi_frame_file_uses_first_frame(fmt: str) -> None:
    red, blue = (Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 0, 255)])
    data = encode(red, fmt, save_all=True, append_images=[blue], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data)
    assert_rgb_uint8(decoded, 6, 8)
    assert (decoded == (255, 0, 0)).all()


# --- pixel modes -----------------------------------------------------------------------------


def test_grayscale_is_replicated_to_three_channels() -> None:
    gray = gradient()[..., 0]
    decoded = decode_image(encode(Image.fromarray(gray), "PNG"))
    assert_rgb_uint8(decoded, *gray.shape)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)


def test_one_bit_image() -> None:
    bits = np.zeros((6, 8), dtype=bool)
    bits[:, :3] = True
    decoded = decode_image(encode(Image.fromarray(bits), "PNG"))
    assert_rgb_uint8(decoded, 6, 8)
    np.testing.assert_array_equal(decoded, np.repeat(np.where(bits, 255, 0)[..., None], 3, axis=2))


def test_rgba_alpha_is_composited_onto_background() -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = [[255, 0, 128], [255, 255, 0]]
    decoded = decode_image(encode(Image.fromarray(rgba), "PNG"))
    assert_rgb_uint8(decoded, 2, 3)
    assert tuple(decoded[0, 0]) == (200, 100, 50)
    assert tuple(decoded[0, 1]) == BACKGROUND
    assert tuple(decoded[1, 2]) == BACKGROUND
    expected_half = np.array(BACKGROUND) + (np.array([200, 100, 50]) - BACKGROUND) * 128 / 255
    np.testing.assert_allclose(decoded[0, 2], expected_half, atol=1)


def test_la_alpha_is_composited() -> None:
    la = Image.merge("LA", [Image.new("L", (4, 2), 180), Image.new("L", (4, 2), 255)])
    la.putpixel((0, 0), (180, 0))
    decoded = decode_image(encode(la, "PNG"))
    assert tuple(decoded[0, 0]) == BACKGROUND
    assert (decoded[1] == 180).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt: str) -> None:
    palette_img = Image.fromarray(few_colours()).quantize(colors=8)
    palette = palette_img.getpalette()
    assert palette is not None
    index = np.asarray(palette_img)
    transparent = int(index[0, 0])
    palette_img.info["transparency"] = transparent
    data = encode(palette_img, fmt)
    assert Image.open(io.BytesIO(data)).mode == "P"

    decoded = decode_image(data)
    colours = np.array(palette[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
    expected = colours[index]
    expected[index == transparent] = BACKGROUND
    assert tuple(colours[transparent]) != BACKGROUND
    np.testing.assert_array_equal(decoded, expected)


def test_palette_without_transparency() -> None:
    palette_img = Image.fromarray(few_colours()).quantize(colors=8)
    colours = np.array(palette_img.getpalette(), dtype=np.uint8).reshape(-1, 3)
    decoded = decode_image(encode(palette_img, "PNG"))
    np.testing.assert_array_equal(decoded, colours[np.asarray(palette_img)])


def sixteen_bit(values: np.ndarray, mode: str) -> Image.Image:
    big_endian = mode == "I;16B"
    raw = values.astype(">u2" if big_endian else "<u2").tobytes()
    return Image.frombytes(mode, (values.shape[1], values.shape[0]), raw)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_16_bit_is_scaled_over_its_real_range(mode: str, fmt: str) -> None:
    values = np.linspace(1000, 3000, 32 * 64).reshape(32, 64).astype(np.uint16)
    data = encode(sixteen_bit(values, mode), fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    decoded = decode_image(data)
    assert_rgb_uint8(decoded, 32, 64)
    gray = decoded[..., 0]
    assert gray.min() == 0
    assert gray.max() == 255
    expected = np.rint((values.astype(float) - 1000) * 255 / 2000)
    np.testing.assert_array_equal(gray, expected)
    np.testing.assert_array_equal(decoded[..., 1], gray)


@pytest.mark.filterwarnings("error")
def test_constant_16_bit_image_becomes_zeros() -> None:
    values = np.full((4, 5), 2500, dtype=np.uint16)
    decoded = decode_image(encode(sixteen_bit(values, "I;16"), "PNG"))
    assert_rgb_uint8(decoded, 4, 5)
    assert not decoded.any()


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_32_bit_int_and_float_are_scaled_over_range(dtype: type) -> None:
    values = np.linspace(-5.0, 70000.0, 8 * 10).reshape(8, 10).astype(dtype)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == ("I" if dtype is np.int32 else "F")

    gray = decode_image(data, mode="L")
    expected = np.rint((values.astype(float) - values.min()) * 255 / np.ptp(values))
    np.testing.assert_array_equal(gray, expected)


@pytest.mark.filterwarnings("error")
def test_non_finite_float_pixels_become_zero() -> None:
    values = np.array([[0.0, 0.5, 1.0], [np.nan, np.inf, 0.25]], dtype=np.float32)
    gray = decode_image(encode(Image.fromarray(values), "TIFF"), mode="L")
    np.testing.assert_array_equal(gray, [[0, 128, 255], [0, 0, 64]])


def test_mode_l_output() -> None:
    rgb = Image.fromarray(gradient())
    gray = decode_image(encode(rgb, "PNG"), mode="L")
    assert gray.dtype == np.uint8
    assert gray.flags.c_contiguous
    np.testing.assert_array_equal(gray, np.asarray(rgb.convert("L")))


def test_to_mode_on_in_memory_images() -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = 90
    rgba[0, 0, 3] = 255
    rgb = to_mode(Image.fromarray(rgba), "RGB")
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[..., 0], [[90, 0], [0, 0]])

    wide = Image.frombytes("I;16", (3, 1), np.array([0, 500, 1000], "<u2").tobytes())
    np.testing.assert_array_equal(np.asarray(to_mode(wide, "L")), [[0, 128, 255]])


def test_unknown_output_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), mode="RGBA")  # type: ignore[arg-type]


def test_decode_to_pil_returns_loaded_detached_image() -> None:
    img = decode_to_pil(encode(Image.fromarray(gradient()), "PNG"), mode="RGB")
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(img), gradient())


def test_decoded_array_is_writable() -> None:
    decoded = decode_image(encode(Image.new("RGB", (4, 4)), "PNG"))
    decoded[0, 0] = 1
    assert decoded[0, 0, 0] == 1


# --- EXIF orientation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "quarter_turns_ccw"),
    [(1, 0), (3, 2), (6, -1), (8, 1)],
)
def test_jpeg_exif_orientation_is_applied(orientation: int, quarter_turns_ccw: int) -> None:
    stored = quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif))

    expected = np.rot90(stored, quarter_turns_ccw)
    assert decoded.shape == expected.shape
    assert mean_abs_diff(decoded, expected) < 10
    wrong = np.rot90(stored, quarter_turns_ccw + 2)
    assert mean_abs_diff(decoded, wrong) > 100


# --- invalid input -----------------------------------------------------------------------------


def half(fmt: str) -> bytes:
    data = encode(Image.fromarray(gradient()), fmt)
    return data[: len(data) // 2]


def corrupt_png() -> bytes:
    data = bytearray(encode(Image.fromarray(gradient()), "PNG"))
    data[60] ^= 0xFF  # inside the compressed pixel data
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty file (0 bytes)", id="empty"),
        pytest.param(b"patient,label\n17,effusion\n" * 4, "not an image", id="text"),
        pytest.param(half("PNG"), "truncated image data", id="truncated-png"),
        pytest.param(half("JPEG"), "truncated image data", id="truncated-jpeg"),
        pytest.param(half("BMP"), "truncated image data", id="truncated-bmp"),
        pytest.param(half("TIFF"), "truncated image data", id="truncated-tiff"),
        pytest.param(half("GIF"), "truncated image data", id="truncated-gif"),
        pytest.param(half("WEBP"), "corrupt image data", id="truncated-webp"),
        pytest.param(corrupt_png(), "corrupt image data", id="corrupt-png"),
        pytest.param(
            png_with_header_size(8000, 8000),
            "image too large: 8000x8000 = 64000000 pixels > limit 50000000 (raise maxImagePixels)",
            id="too-large",
        ),
        pytest.param(
            png_with_header_size(20000, 20000), "image too large", id="too-large-for-pillow"
        ),
        pytest.param(
            encode(Image.new("L", (1, 1)), "PNG"), "image too small: 1x1 (min side 2 px)", id="1x1"
        ),
        pytest.param(
            encode(Image.new("RGB", (5, 1)), "PNG"), "image too small: 5x1", id="one-pixel-high"
        ),
    ],
)
def test_invalid_input_raises_with_reason_and_origin(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, origin=ORIGIN)
    error = caught.value
    assert reason in error.reason
    assert error.origin == ORIGIN
    assert str(error) == f"{ORIGIN}: {error.reason}"


def test_error_without_origin_is_just_the_reason() -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_to_pil(b"")
    assert str(caught.value) == "empty file (0 bytes)"
    assert caught.value.origin is None


def test_max_pixels_boundary() -> None:
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert decode_image(data, max_pixels=200).shape == (10, 20, 3)
    with pytest.raises(InvalidImageError, match="20x10 = 200 pixels > limit 199"):
        decode_image(data, max_pixels=199)


def test_too_large_names_the_setting_the_caller_gives() -> None:
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    with pytest.raises(InvalidImageError, match=r"> limit 199 \(raise max_image_pixels\)$"):
        decode_to_pil(data, max_pixels=199, limit_name="max_image_pixels")


def test_check_size_limits() -> None:
    check_size((MIN_SIDE, 100), max_pixels=2 * 100)
    with pytest.raises(InvalidImageError, match="too large"):
        check_size((MIN_SIDE, 100), max_pixels=2 * 100 - 1)
    with pytest.raises(InvalidImageError, match="too small") as caught:
        check_size((MIN_SIDE - 1, 100), max_pixels=DEFAULT_MAX_PIXELS, origin=ORIGIN)
    assert caught.value.origin == ORIGIN


def test_smallest_accepted_image() -> None:
    data = encode(Image.new("RGB", (MIN_SIDE, MIN_SIDE), (1, 2, 3)), "PNG")
    assert (decode_image(data) == (1, 2, 3)).all()


def test_large_header_is_rejected_before_decoding() -> None:
    # The pixel data is only a few bytes: decoding would fail as truncated, not as too large.
    data = png_with_header_size(8000, 8000)
    with pytest.raises(InvalidImageError, match="too large"):
        decode_image(data)
    with pytest.raises(InvalidImageError, match="truncated"):
        decode_image(data, max_pixels=8000 * 8000)


def test_global_pil_and_warning_state_is_untouched() -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    for data in (png_with_header_size(20000, 20000), png_with_header_size(10000, 10000)):
        with pytest.raises(InvalidImageError, match="too large"):
            decode_image(data, max_pixels=10**9)
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert warnings.filters == filters_before


def test_invalid_image_error_survives_pickling() -> None:
    error = InvalidImageError("truncated image data", ORIGIN)
    restored = pickle.loads(pickle.dumps(error))
    assert isinstance(restored, InvalidImageError)
    assert (restored.reason, restored.origin, str(restored)) == (
        error.reason,
        error.origin,
        str(error),
    )


# --- files -------------------------------------------------------------------------------------


def test_load_image_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(encode(Image.fromarray(gradient()), "PNG"))
    np.testing.assert_array_equal(load_image(path), gradient())
    gray = decode_image(path.read_bytes(), mode="L")
    np.testing.assert_array_equal(load_image(str(path), mode="L"), gray)


def test_load_image_bad_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(half("JPEG"))
    with pytest.raises(InvalidImageError) as caught:
        load_image(path)
    assert caught.value.reason == "truncated image data"
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("name", ["missing.png", "."])
def test_load_image_unreadable_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(InvalidImageError) as caught:
        load_image(path)
    assert caught.value.reason.startswith("cannot read file")
    assert caught.value.origin == str(path)


def test_image_info_reads_header() -> None:
    data = encode(Image.new("L", (30, 20)), "PNG")
    assert image_info(data) == {"format": "PNG", "mode": "L", "width": 30, "height": 20}
    jpeg = encode(Image.new("RGB", (7, 9)), "JPEG")
    assert image_info(jpeg) == {"format": "JPEG", "mode": "RGB", "width": 7, "height": 9}


def test_image_info_does_not_decode_pixels() -> None:
    info = image_info(png_with_header_size(8000, 8000))
    assert (info["width"], info["height"]) == (8000, 8000)
    assert 8000 * 8000 > DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("data", [b"", b"not an image at all"])
def test_image_info_rejects_non_images(data: bytes) -> None:
    with pytest.raises(InvalidImageError):
        image_info(data, origin=ORIGIN)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scan.png", True),
        ("SCAN.JPG", True),
        ("a/b/c.jpeg", True),
        ("s3a://bucket/x/y.TIFF", True),
        ("file:/data/img.tif", True),
        ("x.bmp", True),
        ("x.webp", True),
        ("x.gif", True),
        ("labels.csv", False),
        ("png", False),
        ("noext", False),
        ("dir.png/readme.txt", False),
        (".hidden.png", False),
        ("a/b/._scan.jpg", False),
        ("", False),
    ],
)
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(name) is expected


# --- Spark's image struct ---------------------------------------------------------------------


def spark_struct(pixels: np.ndarray, **fields: object) -> dict[str, object]:
    """What spark.read.format("image") stores for an RGB(A) or gray uint8 array: BGR(A) bytes."""
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    stored = pixels if channels == 1 else pixels[:, :, [2, 1, 0, 3][:channels]]
    record = {
        "origin": ORIGIN,
        "height": pixels.shape[0],
        "width": pixels.shape[1],
        "nChannels": channels,
        "mode": {1: 0, 3: 16, 4: 24}[channels],
        "data": bytearray(np.ascontiguousarray(stored).tobytes()),
    }
    return {**record, **fields}


def test_spark_struct_bgr_becomes_the_same_rgb_image() -> None:
    pixels = gradient()
    image = from_spark_image(spark_struct(pixels))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)
    gray = from_spark_image(spark_struct(pixels), mode="L")
    np.testing.assert_array_equal(np.asarray(gray), np.asarray(Image.fromarray(pixels).convert("L")))


def test_spark_struct_gray_and_bgra_decode_like_the_file() -> None:
    gray = gradient()[:, :, 0]
    np.testing.assert_array_equal(
        np.asarray(from_spark_image(spark_struct(gray))), decode_image(encode(Image.fromarray(gray), "PNG"))
    )
    rgba = np.dstack([gradient(), np.tile(np.array([0, 255], np.uint8), (48, 32))])
    np.testing.assert_array_equal(  # alpha composited onto BACKGROUND, as for a PNG file
        np.asarray(from_spark_image(spark_struct(rgba))),
        decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")),
    )


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param(
            dict(height=-1, width=-1, nChannels=-1, mode=-1, data=b""),
            "Spark's image reader could not decode this file",
            id="spark-invalid-row",
        ),
        pytest.param(dict(data=None), "image struct without data", id="no-data"),
        pytest.param(dict(height=None, width=float("nan")), "image struct without height, width", id="null-size"),
        pytest.param(dict(height=0), "image struct has height=0: expected a positive number", id="zero-height"),
        pytest.param(dict(width=-3), "image struct has width=-3", id="negative-width"),
        pytest.param(dict(width=12.5), "image struct has width=12.5", id="fractional-width"),
        pytest.param(dict(height="48"), "image struct has height='48'", id="text-height"),
        pytest.param(dict(nChannels=2), "image struct has nChannels=2: expected 1, 3 or 4", id="two-channels"),
        pytest.param(dict(mode=21), "image struct has mode=21: expected 16", id="16-bit-mode"),
        pytest.param(
            dict(width=63),
            "image struct data has 9216 bytes, but height x width x nChannels = 48x63x3",
            id="short",
        ),
        pytest.param(dict(nChannels=4, mode=24), "data has 9216 bytes", id="channels-do-not-fit"),
        pytest.param(dict(height=8000, width=8000), "image too large: 8000x8000", id="too-large"),
        pytest.param(dict(height=1), "image too small", id="too-small"),
    ],
)
def test_invalid_spark_struct_raises_with_the_field_and_origin(fields: dict, reason: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        from_spark_image(spark_struct(gradient(), **fields), origin=ORIGIN)
    assert reason in caught.value.reason and caught.value.origin == ORIGIN


def test_spark_struct_fields_handed_over_as_floats_are_accepted() -> None:
    """pandas turns an int column holding a null into floats; whole numbers still count."""
    pixels = gradient()
    record = spark_struct(pixels, height=48.0, width=np.float64(64), nChannels=3.0, mode=16.0)
    np.testing.assert_array_equal(np.asarray(from_spark_image(record)), pixels)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_record_takes_bytes_structs_and_null(kind: type) -> None:
    pixels = gradient()
    np.testing.assert_array_equal(np.asarray(decode_record(kind(encode(Image.fromarray(pixels), "PNG")))), pixels)
    np.testing.assert_array_equal(np.asarray(decode_record(spark_struct(pixels))), pixels)
    with pytest.raises(InvalidImageError, match=f"^{ORIGIN}: no image \\(null\\)$"):
        decode_record(None, origin=ORIGIN)
    with pytest.raises(InvalidImageError, match="no image"):
        decode_record({"origin": ORIGIN, "height": None, "width": None, "nChannels": None, "data": None})


# --- resizing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source_mode", ["RGB", "L"])
@pytest.mark.parametrize("target_hw", [(24, 40), (100, 70), (48, 64)])
def test_resize_matches_keras_load_img(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source_mode: str, target_hw: tuple[int, int]
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    from keras.utils import load_img

    noise = np.random.default_rng(7).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(noise).convert(source_mode).save(path)

    height, width = target_hw
    ours = resize_pil(decode_to_pil(path.read_bytes()), (width, height))
    theirs = load_img(path, target_size=(height, width), interpolation="bilinear")
    assert ours.size == (width, height)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
