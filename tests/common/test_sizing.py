"""The size rules both deployments share: the output size of a request, the sizes diffusers'
pipelines work at and the transformer tokens they make."""

from __future__ import annotations

import pytest

from serve_app.common.config import LimitsConfig
from serve_app.common.errors import InvalidRequestError
from serve_app.common.sizing import (
    SIZE_MULTIPLE,
    inpaint_size,
    output_tokens,
    pipeline_dimensions,
    reference_tokens,
    resolve_size,
    square_side,
)

LIMITS = LimitsConfig(min_output_side=64, max_output_side=2048)


def test_explicit_size_rounds_to_the_multiple() -> None:
    assert resolve_size((1000, 750), first_image_wh=(1, 1), auto_pixels=1, limits=LIMITS) == (
        1008,
        752,
    )
    assert resolve_size((1024, 1024), first_image_wh=(1, 1), auto_pixels=1, limits=LIMITS) == (
        1024,
        1024,
    )


@pytest.mark.parametrize("size", [(32, 512), (512, 4096), (2048, 2048 + 16)])
def test_explicit_size_bounds(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidRequestError):
        resolve_size(size, first_image_wh=(1, 1), auto_pixels=1, limits=LIMITS)


def test_pixel_cap() -> None:
    limits = LimitsConfig(max_output_pixels=1024 * 1024)
    with pytest.raises(InvalidRequestError, match="pixels"):
        resolve_size((2048, 1024), first_image_wh=(1, 1), auto_pixels=1, limits=limits)


@pytest.mark.parametrize("wh", [(1024, 1024), (1920, 1080), (600, 900), (4000, 1000)])
def test_auto_keeps_aspect_at_about_the_target_area(wh: tuple[int, int]) -> None:
    w, h = resolve_size(None, first_image_wh=wh, auto_pixels=1024 * 1024, limits=LIMITS)
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w / h - wh[0] / wh[1]) / (wh[0] / wh[1]) < 0.05
    assert 0.9 < w * h / (1024 * 1024) < 1.1


def test_auto_clamps_extreme_aspect_into_limits() -> None:
    w, h = resolve_size(None, first_image_wh=(10000, 10), auto_pixels=1024 * 1024, limits=LIMITS)
    assert (w, h) == (2048, 64)


def test_another_multiple_rounds_to_it() -> None:
    assert resolve_size(
        (1000, 750), first_image_wh=(1, 1), multiple=32, auto_pixels=1, limits=LIMITS
    ) == (992, 736)


def test_pipeline_dimensions_round_each_side_to_32_from_the_unrounded_width() -> None:
    assert pipeline_dimensions((1024, 1024), pixels=1024 * 1024) == (1024, 1024)
    assert pipeline_dimensions((1920, 1080), pixels=1024 * 1024) == (1376, 768)
    # 3:1 at 1 MP: width 1773.6 -> 1760, height 591.2 -> 576 (from the unrounded width; the
    # rounded one would give 586.7 -> 576 too, but e.g. 7:5 below differs).
    assert pipeline_dimensions((300, 100), pixels=1024 * 1024) == (1760, 576)


def test_reference_and_output_tokens() -> None:
    # A square reference is VAE-encoded at 1024x1024: 64 x 64 tokens of 16x16 pixels.
    assert reference_tokens((48, 48)) == 64 * 64
    assert output_tokens((1024, 768)) == 64 * 48
    assert SIZE_MULTIPLE == 16


def test_inpaint_size_ignores_the_requested_size_and_keeps_the_aspect_ratio() -> None:
    assert inpaint_size((64, 64)) == (1024, 1024)
    w, h = inpaint_size((600, 900))
    assert w % SIZE_MULTIPLE == 0 and h % SIZE_MULTIPLE == 0
    assert abs(w / h - 600 / 900) < 0.03


@pytest.mark.parametrize("pixels,side", [(96 * 96, 96), (100 * 100, 96), (10, 16)])
def test_square_side(pixels: int, side: int) -> None:
    assert square_side(pixels) == side


@pytest.mark.parametrize("wh", [(64, 64), (1920, 1080), (1997, 1953), (300, 100), (37, 91)])
def test_pipeline_dimensions_are_diffusers_own(wh: tuple[int, int]) -> None:
    """The sizes the runner predicts (reference tokens, the inpaint working size) are the ones
    the Plus and inpaint pipelines compute (diffusers' own function, in this process)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as inpaint
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    ratio = wh[0] / wh[1]
    assert pipeline_dimensions(wh, pixels=plus.VAE_IMAGE_SIZE) == plus.calculate_dimensions(
        plus.VAE_IMAGE_SIZE, ratio
    )
    assert (
        pipeline_dimensions(wh, pixels=1024 * 1024)
        == inpaint.calculate_dimensions(1024 * 1024, ratio)[:2]
    )
