from __future__ import annotations

import pytest

from serve_app.common.config import LimitsConfig
from serve_app.common.errors import InvalidRequestError
from serve_app.ingress.sizing import parse_size, resolve_size

LIMITS = LimitsConfig(min_output_side=64, max_output_side=2048)


@pytest.mark.parametrize(
    "text,expected",
    [("auto", None), ("AUTO", None), ("1024x768", (1024, 768)), (" 64X64 ", (64, 64))],
)
def test_parse_size(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "1024", "1024x", "x1024", "-5x5", "1e3x1e3", "1024*1024"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_size(text)
    assert info.value.param == "size"


def test_explicit_size_rounds_to_the_multiple() -> None:
    assert resolve_size(
        (1000, 750), first_image_wh=(1, 1), multiple=16, auto_pixels=1, limits=LIMITS
    ) == (1008, 752)
    assert resolve_size(
        (1024, 1024), first_image_wh=(1, 1), multiple=16, auto_pixels=1, limits=LIMITS
    ) == (1024, 1024)


@pytest.mark.parametrize("size", [(32, 512), (512, 4096), (2048, 2048 + 16)])
def test_explicit_size_bounds(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidRequestError):
        resolve_size(size, first_image_wh=(1, 1), multiple=16, auto_pixels=1, limits=LIMITS)


def test_pixel_cap() -> None:
    limits = LimitsConfig(max_output_pixels=1024 * 1024)
    with pytest.raises(InvalidRequestError, match="pixels"):
        resolve_size((2048, 1024), first_image_wh=(1, 1), multiple=16, auto_pixels=1, limits=limits)


@pytest.mark.parametrize("wh", [(1024, 1024), (1920, 1080), (600, 900), (4000, 1000)])
def test_auto_keeps_aspect_at_about_the_target_area(wh: tuple[int, int]) -> None:
    w, h = resolve_size(
        None, first_image_wh=wh, multiple=16, auto_pixels=1024 * 1024, limits=LIMITS
    )
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w / h - wh[0] / wh[1]) / (wh[0] / wh[1]) < 0.05
    assert 0.9 < w * h / (1024 * 1024) < 1.1


def test_auto_clamps_extreme_aspect_into_limits() -> None:
    w, h = resolve_size(
        None, first_image_wh=(10000, 10), multiple=16, auto_pixels=1024 * 1024, limits=LIMITS
    )
    assert (w, h) == (2048, 64)


@pytest.mark.parametrize(
    "text", ["１０２４x１０２４", "١٠٢٤x١٠٢٤", "64x6４", "64\u3000x64", "ａｕｔｏ"]
)
def test_parse_size_takes_ascii_digits_only(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_size(text)
    assert info.value.param == "size"


def test_parsed_size_is_typed() -> None:
    size = parse_size("640x480")
    assert size is not None and (size.width, size.height) == (640, 480) and str(size) == "640x480"
