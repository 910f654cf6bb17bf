"""Image codecs: uploads -> uint8 RGB arrays (Pillow; imagecodecs for 8-bit RGB PNGs), arrays ->
png/jpeg/webp bytes (Pillow, and `serve_app.ingress.png` for the default PNG)."""

from __future__ import annotations

import io
import warnings

import imagecodecs
import numpy as np
from PIL import Image, ImageOps

from serve_app.common.errors import InvalidRequestError
from serve_app.ingress.png import encode_png

# Accepted by content, not by file name or declared type.
_ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_PIL_SAVE_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def _sniff(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(
    data: bytes, *, param: str, max_pixels: int, max_aspect_ratio: float | None = None
) -> np.ndarray:
    """Decode one upload into a (H, W, 3) uint8 RGB array, or raise a 400 naming `param`.
    Its size is checked from the header, before any pixel is decoded."""
    if not data:
        raise InvalidRequestError(
            f"The file in '{param}' is empty.", param=param, code="empty_file"
        )
    kind = _sniff(data)
    if kind is None:
        raise InvalidRequestError(
            f"The file in '{param}' is not a PNG, JPEG or WebP image.",
            param=param,
            code="invalid_image_format",
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, above MAX_IMAGE_PIXELS; we check the size ourselves
            # before decoding any pixels, so a bomb never gets that far.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise InvalidRequestError(
                        f"The image in '{param}' is {width}x{height} ({width * height} pixels);"
                        f" the limit is {max_pixels} pixels.",
                        param=param,
                        code="image_too_large",
                    )
                if max_aspect_ratio is not None:
                    _check_aspect(width, height, param=param, max_ratio=max_aspect_ratio)
                if kind == "PNG" and (fast := _decode_rgb_png(data, width, height)) is not None:
                    return fast
                img.load()
                # In place: a 1 MP image is not copied (and its pages not faulted in) again.
                ImageOps.exif_transpose(img, in_place=True)
                return _to_rgb_array(img)
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(
            f"The image in '{param}' is too large to decode.", param=param, code="image_too_large"
        ) from None
    except Exception:
        raise InvalidRequestError(
            f"The file in '{param}' could not be decoded as an image.",
            param=param,
            code="invalid_image",
        ) from None


def _decode_rgb_png(data: bytes, width: int, height: int) -> np.ndarray | None:
    """An 8-bit RGB PNG without EXIF decoded by imagecodecs (libpng with zlib-ng, faster than
    Pillow: docs/gpu.md; this decode is on every edit's critical path), or None: Pillow decodes it.
    Same pixels as Pillow's (tests/ingress/test_imaging.py). libpng checks every checksum, where
    Pillow lets a bad IDAT CRC pass: what libpng refuses goes to Pillow, so this path never
    rejects what Pillow accepts."""
    # IHDR is the first chunk: bit depth at byte 24, colour type at 25 (2: truecolour RGB).
    # (With a tRNS chunk libpng may add alpha: the shape check below sends that to Pillow.)
    # An eXIf chunk may rotate the image (Pillow applies it); a false match only costs speed.
    if len(data) < 33 or data[24] != 8 or data[25] != 2 or b"eXIf" in data:
        return None
    try:
        array = imagecodecs.png_decode(data)
    except Exception:
        return None
    if array.shape != (height, width, 3) or array.dtype != np.uint8:
        return None
    return np.ascontiguousarray(array)


def _check_aspect(width: int, height: int, *, param: str, max_ratio: float) -> None:
    # EXIF rotation swaps the sides, never their ratio: checking before the transpose holds.
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > max_ratio:
        raise InvalidRequestError(
            f"The image in '{param}' is {width}x{height}, an aspect ratio of {ratio:.0f}:1;"
            f" the limit is {max_ratio:g}:1 (long side / short side).",
            param=param,
            code="invalid_image_dimensions",
        )


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white rather than exposing whatever colour
        # the transparent pixels happen to hold.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of clipping.
        arr16 = np.asarray(img, dtype=np.float64)
        peak = max(float(arr16.max()), 1.0)
        scale = 65535.0 if peak > 255 else 255.0
        img = Image.fromarray((arr16 / scale * 255.0).round().clip(0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def encode_image(array: np.ndarray, *, output_format: str, compression: int | None) -> bytes:
    """Encode a (H, W, 3) uint8 array. `compression` is OpenAI's 0-100 output_compression."""
    fmt = _PIL_SAVE_FORMAT[output_format]
    if fmt == "PNG" and compression is None:
        # The default: faster than Pillow at zlib level 1 (per-row filter search), and smaller;
        # see serve_app.ingress.png.
        return encode_png(array)
    img = Image.fromarray(array, mode="RGB") if array.ndim == 3 else Image.fromarray(array)
    buf = io.BytesIO()
    if fmt == "PNG":
        # PNG is lossless; an explicit compression picks Pillow's zlib level (100 -> 9).
        img.save(buf, format="PNG", compress_level=round((compression or 0) * 9 / 100))
    else:
        # OpenAI defaults output_compression to 100 for jpeg/webp, i.e. best quality.
        quality = 100 if compression is None else max(1, compression)
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()
