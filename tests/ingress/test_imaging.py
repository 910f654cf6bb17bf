from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_app.common.errors import InvalidRequestError
from serve_app.ingress import imaging
from serve_app.ingress.imaging import decode_image, encode_image
from serve_app.ingress.png import encode_png


def _bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_allowed_formats(fmt: str) -> None:
    arr = decode_image(
        _bytes(Image.new("RGB", (33, 17), (10, 200, 30)), fmt), param="image", max_pixels=10**6
    )
    assert arr.shape == (17, 33, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_rejects_other_formats_by_content(fmt: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_image(_bytes(Image.new("RGB", (8, 8)), fmt), param="image[]", max_pixels=10**6)
    assert info.value.param == "image[]" and info.value.code == "invalid_image_format"


def test_pixel_limit_checked_before_decoding() -> None:
    data = _bytes(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(InvalidRequestError) as info:
        decode_image(data, param="image", max_pixels=1000 * 1000)
    assert info.value.code == "image_too_large"


def test_sixteen_bit_grayscale_scales() -> None:
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    arr = decode_image(_bytes(img, "PNG"), param="image", max_pixels=100)
    assert arr[0, 0].tolist() == [255, 255, 255]


def _raw_png(rows: np.ndarray, *, depth: int, colour_type: int) -> bytes:
    """A minimal PNG (filter 0 on every row) of any bit depth, which Pillow cannot write."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    height, width = rows.shape[:2]
    raw = b"".join(b"\0" + row.astype(">u2" if depth == 16 else "u1").tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + (chunk(b"IEND", b""))
    )


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The uploads imagecodecs decoded (the fast path) in this test."""
    calls: list[bytes] = []
    load: Callable[..., Any] = imaging.imagecodecs.png_decode

    def spy(data: bytes, *args: Any, **kwargs: Any) -> Any:
        calls.append(data)
        return load(data, *args, **kwargs)

    monkeypatch.setattr(imaging.imagecodecs, "png_decode", spy)
    return calls


def _photo(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return (smooth + rng.integers(-12, 13, smooth.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _photo(37, 53),  # Pillow's adaptive filtering: every PNG row filter occurs
        lambda: np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8),
        lambda: np.full((5, 7, 3), 200, dtype=np.uint8),
    ],
    ids=["photo", "noise", "flat"],
)
def test_rgb_png_takes_imagecodecs_with_pillows_pixels(
    make: Callable[[], np.ndarray], fast_calls: list[bytes]
) -> None:
    data = _bytes(Image.fromarray(make()), "PNG")
    arr = decode_image(data, param="image", max_pixels=10**6)
    assert fast_calls == [data]
    assert arr.flags.c_contiguous and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, _pillow_rgb(data))


def test_other_png_kinds_are_pillows(fast_calls: list[bytes]) -> None:
    rgb = _photo(9, 11)
    rgba = _bytes(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), "PNG")
    palette = _bytes(Image.fromarray(rgb).convert("P"), "PNG")
    wide = (rgb.astype(np.uint16) * 257 + 3).astype(np.uint16)
    sixteen = _raw_png(wide, depth=16, colour_type=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", exif=exif)
    for data in (rgba, palette, sixteen, buf.getvalue()):
        decode_image(data, param="image", max_pixels=10**6)
    assert fast_calls == []
    # Pillow's readings: 16 bits keep their high byte; eXIf rotates.
    np.testing.assert_array_equal(decode_image(sixteen, param="image", max_pixels=100), rgb)
    assert decode_image(buf.getvalue(), param="image", max_pixels=100).shape == (11, 9, 3)


def test_a_png_libpng_refuses_is_left_to_pillow(fast_calls: list[bytes]) -> None:
    data = bytearray(_raw_png(_photo(6, 4), depth=8, colour_type=2))
    idat_crc = data.index(b"IEND") - 8  # the 4 bytes before IEND's length
    data[idat_crc] ^= 0xFF  # libpng refuses a bad CRC; Pillow does not check IDAT's
    arr = decode_image(bytes(data), param="image", max_pixels=100)
    assert len(fast_calls) == 1
    np.testing.assert_array_equal(arr, _photo(6, 4))


def test_a_broken_rgb_png_is_a_400(fast_calls: list[bytes]) -> None:
    data = bytearray(_raw_png(_photo(8, 8), depth=8, colour_type=2))
    data[-20] ^= 0xFF  # the zlib stream's checksum: every decoder refuses it
    with pytest.raises(InvalidRequestError) as info:
        decode_image(bytes(data), param="image[]", max_pixels=100)
    assert info.value.code == "invalid_image" and info.value.param == "image[]"
    assert len(fast_calls) == 1  # imagecodecs saw it first


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), param="image", max_pixels=10**6).shape == (40, 20, 3)


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_roundtrip(fmt: str, pil: str) -> None:
    arr = np.zeros((24, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255
    for compression in (None, 0, 50, 100):
        out = Image.open(io.BytesIO(encode_image(arr, output_format=fmt, compression=compression)))
        assert out.format == pil and out.size == (40, 24)


def test_png_is_lossless() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = np.asarray(
        Image.open(io.BytesIO(encode_image(arr, output_format="png", compression=80)))
    )
    assert np.array_equal(arr, back)


def test_default_png_takes_the_fast_writer_and_explicit_compression_pillow() -> None:
    arr = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    fast = encode_image(arr, output_format="png", compression=None)
    assert fast == encode_png(arr)
    for compression in (None, 0, 100):
        data = encode_image(arr, output_format="png", compression=compression)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
    # An explicit level goes to Pillow (its own per-row filters: other bytes, same pixels).
    assert encode_image(arr, output_format="png", compression=100) != fast
