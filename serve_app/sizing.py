"""Output size rules: `size` is "auto" or "WxH", rounded to what the pipeline needs.

The answer is the exact size of the returned images, so the response never lies about it.
"""

from __future__ import annotations

import math
import re

from serve_app.config import LimitsConfig
from serve_app.errors import InvalidRequestError

_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")


def parse_size(size: str) -> tuple[int, int] | None:
    """None for "auto", else (width, height). Raises a 400 naming `size`."""
    if size.strip().lower() == "auto":
        return None
    match = _SIZE_RE.match(size)
    if not match:
        raise InvalidRequestError(
            f"Invalid size {size!r}: use 'auto' or 'WIDTHxHEIGHT', e.g. '1024x1024'.",
            param="size",
            code="invalid_value",
        )
    return int(match.group(1)), int(match.group(2))


def _round_to(value: float, multiple: int) -> int:
    # Half up, not Python's banker's rounding: 1000 -> 1008 at multiple 16.
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def _clamp_side(value: int, *, multiple: int, limits: LimitsConfig) -> int:
    low = math.ceil(limits.min_output_side / multiple) * multiple
    high = max(low, limits.max_output_side // multiple * multiple)
    return min(max(value, low), high)


def resolve_size(
    requested: tuple[int, int] | None,
    *,
    first_image_wh: tuple[int, int],
    multiple: int,
    auto_pixels: int,
    limits: LimitsConfig,
) -> tuple[int, int]:
    """The (width, height) the pipeline will produce."""
    if requested is None:
        # As diffusers' calculate_dimensions: keep the aspect ratio at ~auto_pixels.
        w, h = first_image_wh
        ratio = w / h
        width = math.sqrt(auto_pixels * ratio)
        height = width / ratio
        rw = _clamp_side(_round_to(width, multiple), multiple=multiple, limits=limits)
        rh = _clamp_side(_round_to(height, multiple), multiple=multiple, limits=limits)
        return rw, rh
    width, height = requested
    lo, hi = limits.min_output_side, limits.max_output_side
    if not (lo <= width <= hi and lo <= height <= hi):
        raise InvalidRequestError(
            f"size {width}x{height} is out of range: each side must be between {lo} and {hi}.",
            param="size",
            code="invalid_value",
        )
    if width * height > limits.max_output_pixels:
        raise InvalidRequestError(
            f"size {width}x{height} has {width * height} pixels; "
            f"the limit is {limits.max_output_pixels}.",
            param="size",
            code="invalid_value",
        )
    return _round_to(width, multiple), _round_to(height, multiple)
