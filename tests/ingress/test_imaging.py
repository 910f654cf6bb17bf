from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serve_app.common.errors import InvalidRequestError
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
