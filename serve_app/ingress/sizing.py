"""The `size` field: "auto" or "WxH" (`serve_app.common.sizing` rounds it to what the pipeline
needs).

Grammar (docs/api.md): `auto` (any case), or WIDTH `x` HEIGHT with 1-5 ASCII digits each; the
separator may be `x`, `X` or `×`; ASCII whitespace around the parts is ignored. Other digits
(full-width `１０２４`, Arabic-Indic, ...) are refused: a size should read the same in a log.
The resolved size is the exact size of the returned images, so the response never lies about it.
"""

from __future__ import annotations

import re

from serve_app.common.errors import InvalidRequestError
from serve_app.common.sizing import Size

# re.ASCII: \d is [0-9] and \s ASCII whitespace only.
_SIZE_RE = re.compile(r"\s*([0-9]{1,5})\s*[xX×]\s*([0-9]{1,5})\s*", re.ASCII)
_AUTO_RE = re.compile(r"\s*auto\s*", re.ASCII | re.IGNORECASE)


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
