"""Server-Timing: the stage clock, the header writer and the parser bench scripts use."""

from __future__ import annotations

import pytest

from serve_app.common.timing import StageClock, format_server_timing, parse_server_timing


def test_format_writes_milliseconds_in_order() -> None:
    header = format_server_timing({"decode": 0.0121, "pipeline": 11.8732, "total": 11.9205})
    assert header == "decode;dur=12.1, pipeline;dur=11873.2, total;dur=11920.5"


def test_format_clamps_negative_durations() -> None:
    assert format_server_timing({"queue": -0.002}) == "queue;dur=0.0"


@pytest.mark.parametrize("name", ["", "two words", "a,b", "semi;colon", 'q"uote'])
def test_format_rejects_names_that_are_not_tokens(name: str) -> None:
    with pytest.raises(ValueError):
        format_server_timing({name: 1.0})


def test_parse_reads_back_what_format_writes() -> None:
    stages = {"parse": 0.0031, "text_encoder": 0.25, "vae_decode": 1.0, "total": 12.0}
    parsed = parse_server_timing(format_server_timing(stages))
    assert parsed == {"parse": 3.1, "text_encoder": 250.0, "vae_decode": 1000.0, "total": 12000.0}


@pytest.mark.parametrize(
    "header,expected",
    [
        # The W3C spec's examples.
        ("miss, db;dur=53, app;dur=47.2", {"db": 53.0, "app": 47.2}),
        ("customView, dc;desc=atl", {}),
        ('cache;desc="Cache Read";dur=23.2', {"cache": 23.2}),
        ("total;dur=123.4", {"total": 123.4}),
        # A quoted desc may hold commas and semicolons; dur may be quoted; names and params
        # tolerate whitespace; the parameter name is case-insensitive.
        ('a;desc="x, y; z";dur=1, b ; DUR = 2', {"a": 1.0, "b": 2.0}),
        ('a;dur="2.5"', {"a": 2.5}),
        ('a;desc="say \\"hi\\", ok";dur=3', {"a": 3.0}),
        # Only the first dur of a metric counts, and the first of a repeated metric.
        ("a;dur=1;dur=2, a;dur=3", {"a": 1.0}),
        # Unusable durations are left out rather than guessed.
        ("a;dur=fast, b;dur=, c;dur=nan, d;dur=inf, e;dur=4", {"e": 4.0}),
        ("", {}),
        (" , ;dur=3,", {}),
    ],
)
def test_parse(header: str, expected: dict[str, float]) -> None:
    assert parse_server_timing(header) == expected


def test_stage_clock_adds_up_repeated_stages() -> None:
    now = iter([0.0, 1.0, 1.5, 2.0, 2.25, 3.0])
    clock = StageClock(clock=lambda: next(now))  # starts at 0.0
    with clock.measure("decode"):  # 1.0 -> 1.5
        pass
    with clock.measure("decode"):  # 2.0 -> 2.25
        pass
    clock.add("pipeline", 10.0)
    assert clock.stages == {"decode": 0.75, "pipeline": 10.0}
    assert clock.elapsed() == 3.0


def test_stage_clock_measures_a_stage_that_raises() -> None:
    clock = StageClock()
    with pytest.raises(RuntimeError), clock.measure("encode"):
        raise RuntimeError("boom")
    assert clock.stages["encode"] >= 0.0
