"""Output and working sizes: the one home of the size rules the ingress and the engine share.

The ingress settles a request's output size here (`resolve_size`); the engine asks the same
module which size diffusers' pipelines work at (`pipeline_dimensions`: the reference images the
Plus pipeline VAE-encodes, the inpaint pipeline's fixed working area). Plain arithmetic, no
torch: both deployments import it.

Every Qwen-Image-Edit variant has the same geometry, fixed by its architecture rather than by the
weights: the VAE downsamples 8x and the transformer packs 2x2 latent patches, so output sides are
multiples of `SIZE_MULTIPLE` (the runner checks that its pipeline agrees when it loads).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from serve_app.common.config import LimitsConfig
from serve_app.common.errors import InvalidRequestError

#: Output width and height are multiples of this: the VAE's 8x times the 2x2 latent patches.
SIZE_MULTIPLE = 16

#: The area at which the Plus pipeline VAE-encodes every reference image, and at which the
#: inpaint pipeline always works (diffusers' `VAE_IMAGE_SIZE`, the inpaint `__call__`).
PIPELINE_WORKING_PIXELS = 1024 * 1024


class Size(NamedTuple):
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def resolve_size(
    requested: tuple[int, int] | None,
    *,
    first_image_wh: tuple[int, int],
    auto_pixels: int,
    limits: LimitsConfig,
    multiple: int = SIZE_MULTIPLE,
) -> Size:
    """The size the pipeline will produce for a request: `requested` ("WxH", None for "auto")
    checked against `limits` (a 400 naming `size`) and rounded to `multiple`; "auto" keeps the
    first image's aspect ratio at about `auto_pixels`, clamped into the limits."""
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


def square_side(pixels: int, *, multiple: int = SIZE_MULTIPLE) -> int:
    """The side of a square of about `pixels` (at most), a multiple of `multiple`."""
    side = max(multiple, math.isqrt(pixels))
    return side - side % multiple


def pipeline_dimensions(image_wh: tuple[int, int], *, pixels: int) -> Size:
    """diffusers' `calculate_dimensions` (the Qwen-Image-Edit pipelines): `image_wh`'s aspect
    ratio at about `pixels`, each side rounded to 32 (the height from the unrounded width)."""
    ratio = image_wh[0] / image_wh[1]
    width = math.sqrt(pixels * ratio)
    height = width / ratio
    return Size(round(width / 32) * 32, round(height / 32) * 32)


def reference_tokens(image_wh: tuple[int, int], *, multiple: int = SIZE_MULTIPLE) -> int:
    """The transformer tokens one reference image adds: the Plus pipeline VAE-encodes it at
    `PIPELINE_WORKING_PIXELS` of its aspect ratio."""
    width, height = pipeline_dimensions(image_wh, pixels=PIPELINE_WORKING_PIXELS)
    return (width // multiple) * (height // multiple)


def output_tokens(size: tuple[int, int], *, multiple: int = SIZE_MULTIPLE) -> int:
    """The transformer tokens of one output image of `size` (width, height)."""
    return (size[0] // multiple) * (size[1] // multiple)


def inpaint_size(image_wh: tuple[int, int], *, multiple: int = SIZE_MULTIPLE) -> Size:
    """The size the inpaint pipeline denoises at for an input of `image_wh`: it ignores the
    requested size and works at `PIPELINE_WORKING_PIXELS` of the image's aspect ratio."""
    width, height = pipeline_dimensions(image_wh, pixels=PIPELINE_WORKING_PIXELS)
    return Size(width // multiple * multiple, height // multiple * multiple)


def _round_to(value: float, multiple: int) -> int:
    # Half up, not Python's banker's rounding: 1000 -> 1008 at multiple 16.
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)


def _clamp_side(value: int, *, multiple: int, limits: LimitsConfig) -> int:
    low = math.ceil(limits.min_output_side / multiple) * multiple
    high = max(low, limits.max_output_side // multiple * multiple)
    return min(max(value, low), high)
