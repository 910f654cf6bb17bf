from __future__ import annotations

import pytest

from serve_app.common.errors import InvalidRequestError
from serve_app.ingress.sizing import parse_size


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
