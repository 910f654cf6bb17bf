"""Per-request stage timings and the W3C `Server-Timing` header that carries them.

The ingress times its own stages (multipart parse, image decode, the model call, encode) with a
`StageClock`; the model replica adds its own (queue wait, replica wall time, the pipeline and its
sub-stages) to `EditOutput.timings_s`. `format_server_timing` writes them, in milliseconds, as
`name;dur=12.3, ...`; `parse_server_timing` reads such a header back (bench scripts, tests).
No torch, no ray: bench scripts import this module on machines without either.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

SERVER_TIMING_HEADER = "Server-Timing"

# A metric name is an RFC 7230 token; anything else would make the header invalid.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class StageClock:
    """Seconds spent per named stage of one request, in the order stages were first seen."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self.stages: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        t0 = self._clock()
        try:
            yield
        finally:
            self.add(name, self._clock() - t0)

    def elapsed(self) -> float:
        """Seconds since the clock was made (the request's `total` so far)."""
        return self._clock() - self._start


def format_server_timing(stages_s: Mapping[str, float]) -> str:
    """`{"decode": 0.0121}` -> `decode;dur=12.1` (W3C Server-Timing, durations in ms)."""
    parts = []
    for name, seconds in stages_s.items():
        if not _TOKEN.match(name):
            raise ValueError(f"not a Server-Timing metric name: {name!r}")
        parts.append(f"{name};dur={max(0.0, seconds) * 1000:.1f}")
    return ", ".join(parts)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on `sep`, except inside double-quoted strings (a `desc` may hold commas)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def parse_server_timing(header: str) -> dict[str, float]:
    """A Server-Timing header -> {metric name: dur in milliseconds}.

    Follows the W3C syntax (`name;dur=1.5;desc="..."`, comma-separated, several headers joined
    with commas). Metrics without a finite numeric `dur` are left out; a repeated name keeps its
    first value, as the spec's processing model does for parameters.
    """
    out: dict[str, float] = {}
    for entry in _split_outside_quotes(header, ","):
        name, *params = (p.strip() for p in _split_outside_quotes(entry, ";"))
        if not name or name in out:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() != "dur":
                continue
            try:
                dur = float(value.strip().strip('"'))
            except ValueError:
                dur = math.nan
            if math.isfinite(dur):
                out[name] = dur
            break  # only the first dur counts
    return out
