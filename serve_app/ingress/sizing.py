"""Output size rules: `size` is "auto" or "WxH", rounded to what the pipeline needs.

Grammar (docs/api.md): `auto` (any case), or WIDTH `x` HEIGHT with 1-5 ASCII digits each; the
separator may be `x`, `X` or `×`; ASCII whitespace around the parts is ignored. Other digits
(full-width `１０２４`, Arabic-Indic, ...) are refused: a size should read the same in a log.
The resolved size is the exact size of the returned images, so the response never lies about it.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from serve_app.common.config import LimitsConfig
from serve_app.common.errors import InvalidRequestError

# re.ASCII: \d is [0-9] and \s ASCII whitespace only.
_SIZE_RE = re.compile(r"\s*([0-9]{1,5})\s*[xX×]\s*([0-9]{1,5})\s*", re.ASCII)
_AUTO_RE = re.compile(r"\s*auto\s*", re.ASCII | re.IGNORECASE)


class Size(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size(size: str) -> Size | None:
    """None for "auto", else the requested Size. Raises a 400 naming `size`."""
    if _AUTO_RE.fullmatch(size):
        return None
    match = _SIZE_RE.fullmatch(size)
    if not match:
        raise InvalidRequestError(
            f"Invalid size {size[:32]!r}: use 'auto' or 'WIDTHxHEIGHT' in ASCII digits,"
            " e.g. '1024x1024'.",
            param="size",
            code="invalid_value",
        )
    return Size(int(match.group(1)), int(match.group(2)))


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
) -> Size:
    """The size the pipeline will produce."""
    if requested is None:
        # As diffusers' calculate_dimensions: keep the aspect ratio at ~auto_pixels.
        w, h = first_image_wh
        ratio = w / h
        width = math.sqrt(auto_pixels * ratio)
        height = width / ratio
        rw = _clamp_side(_round_to(width, multiple), multiple=multiple, limits=limits)
        rh = _clamp_side(_round_to(height, multiple), multiple=multiple, limits=limits)
        return Size(rw, rh)
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
    return Size(_round_to(width, multiple), _round_to(height, multiple))
