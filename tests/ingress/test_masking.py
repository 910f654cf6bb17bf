"""OpenAI masks (transparent = edit) -> the pipeline's repaint mask (255 = repaint)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from serve_app.common.errors import InvalidRequestError
from serve_app.ingress.masking import decode_mask
from tests.fakes import png_bytes
from tests.ingress.test_ingress import assert_error, make_client, post_edit


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def left_half_transparent(width: int = 40, height: int = 30, mode: str = "RGBA") -> bytes:
    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return encode(img.convert(mode) if mode != "RGBA" else img)


def test_fully_transparent_pixels_become_the_repaint_area() -> None:
    mask = decode_mask(left_half_transparent(), image_size=(40, 30), max_pixels=10**6)
    assert mask.shape == (30, 40) and mask.dtype == np.uint8
    assert (mask[:, :20] == 255).all() and (mask[:, 20:] == 0).all()


def test_partly_transparent_pixels_are_kept() -> None:
    # Only alpha == 0 marks an edit, as OpenAI documents ("fully transparent").
    img = Image.new("RGBA", (4, 4), (255, 255, 255, 1))
    assert (decode_mask(encode(img), image_size=(4, 4), max_pixels=100) == 0).all()


@pytest.mark.parametrize("mode,fmt", [("LA", "PNG"), ("RGBA", "WEBP")])
def test_other_alpha_carriers(mode: str, fmt: str) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 8, 4))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format=fmt, lossless=True)
    mask = decode_mask(buf.getvalue(), image_size=(8, 8), max_pixels=100)
    assert (mask[:4] == 255).all() and (mask[4:] == 0).all()


def test_palette_png_with_transparency() -> None:
    img = Image.new("P", (6, 6), 0)
    img.putpalette([0, 0, 0, 255, 255, 255])
    img.paste(1, (0, 0, 3, 6))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=1)
    mask = decode_mask(buf.getvalue(), image_size=(6, 6), max_pixels=100)
    assert (mask[:, :3] == 255).all() and (mask[:, 3:] == 0).all()


@pytest.mark.parametrize(
    "data,code",
    [
        (encode(Image.new("RGB", (40, 30))), "mask_without_alpha"),
        (encode(Image.new("L", (40, 30))), "mask_without_alpha"),
        (encode(Image.new("RGB", (40, 30)), "JPEG"), "invalid_image_format"),
        (b"not an image", "invalid_image_format"),
        (left_half_transparent(41, 30), "mask_size_mismatch"),
        (b"", "invalid_mask"),
    ],
)
def test_bad_masks_are_400_naming_mask(data: bytes, code: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_mask(data, image_size=(40, 30), max_pixels=10**6)
    assert info.value.param == "mask" and info.value.code == code


def test_mask_over_the_pixel_limit() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_mask(left_half_transparent(), image_size=(40, 30), max_pixels=100)
    assert info.value.code == "image_too_large"


# --- through the ingress -------------------------------------------------------------------


def post_with_mask(client: Any, mask: bytes, images: int = 1, **data: Any) -> Any:
    files = [("image[]" if images > 1 else "image", (f"{i}.png", png_bytes(), "image/png"))
             for i in range(images)]  # fmt: skip
    files.append(("mask", ("mask.png", mask, "image/png")))
    return post_edit(client, files=files, **data)


def test_mask_reaches_the_job_converted() -> None:
    client, handle = make_client()
    resp = post_with_mask(client, left_half_transparent(), size="64x64")
    assert resp.status_code == 200, resp.text
    mask = handle.jobs[0].mask
    assert mask is not None and mask.shape == (30, 40)
    assert (mask[:, :20] == 255).all() and (mask[:, 20:] == 0).all()


def test_mask_errors_over_http() -> None:
    client, handle = make_client()
    assert_error(post_with_mask(client, left_half_transparent(20, 20)), 400, "mask")
    assert_error(post_with_mask(client, encode(Image.new("RGB", (40, 30)))), 400, "mask")
    # The mask applies to the first image; the inpaint pipeline takes exactly one.
    err = assert_error(post_with_mask(client, left_half_transparent(), images=2), 400, "mask")
    assert err["code"] == "unsupported_value"
    assert handle.jobs == []


def test_no_mask_means_no_mask() -> None:
    client, handle = make_client()
    assert post_edit(client, size="64x64").status_code == 200
    assert handle.jobs[0].mask is None
