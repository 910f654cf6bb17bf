"""OpenAI `mask` uploads -> the repaint mask the pipeline takes.

OpenAI: a PNG with an alpha channel, the size of the first image; fully transparent pixels
(alpha 0) mark where to edit. diffusers' inpaint pipeline wants the opposite convention, white
(255) = repaint, black = keep, so the alpha channel is turned into exactly that here.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from serve_app.common.errors import InvalidRequestError

PARAM = "mask"
# Formats that can carry alpha (JPEG cannot); judged by content, as input images are.
_FORMATS = ["PNG", "WEBP"]


def _bad(message: str, code: str = "invalid_mask") -> InvalidRequestError:
    return InvalidRequestError(message, param=PARAM, code=code)


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    if not data:
        raise _bad("The file in 'mask' is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_FORMATS)
            if img.width * img.height > max_pixels:
                raise _bad(
                    f"The mask is {img.width}x{img.height}; the limit is {max_pixels} pixels.",
                    "image_too_large",
                )
            img.load()
            return ImageOps.exif_transpose(img)
    except InvalidRequestError:
        raise
    except Exception:
        raise _bad(
            "The file in 'mask' is not a readable PNG or WebP image.", "invalid_image_format"
        ) from None


def decode_mask(data: bytes, *, image_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """(H, W) uint8 with 255 where the image is to be edited (alpha == 0), 0 elsewhere.

    `image_size` is the first image's (width, height); the mask must match it exactly.
    """
    img = _open(data, max_pixels=max_pixels)
    if not img.has_transparency_data:
        raise _bad(
            "The mask must have an alpha channel: its fully transparent pixels mark the area"
            " to edit.",
            "mask_without_alpha",
        )
    if img.size != image_size:
        raise _bad(
            f"The mask is {img.width}x{img.height} but the first image is"
            f" {image_size[0]}x{image_size[1]}; they must be the same size.",
            "mask_size_mismatch",
        )
    alpha = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)
