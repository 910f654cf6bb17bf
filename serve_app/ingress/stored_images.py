"""What every url-result store shares (`storage.py`'s folder store, `redis_store.py`): the image
ids, what a read returns, the interface the service calls, and the errors a client sees.

An id is `img-<created ms>-<32 random hex>.<ext>`: its age and content type are read from it
without asking the store, and 128 random bits make the URL unguessable.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from serve_app.common.errors import InternalError, NotFoundError

# The id's shape, also the route's path convertor (so /v1/images/edits etc. stay other routes).
ID_PATTERN = r"img-\d{13}-[0-9a-f]{32}\.(?:png|jpeg|webp)"
ID_RE = re.compile(r"^img-(\d{13})-([0-9a-f]{32})\.(png|jpeg|webp)$")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    expires_in_s: float


class ImageStorage(Protocol):
    """What url results need of a store; blocking (call from a thread)."""

    def put(self, data: bytes, *, output_format: str) -> str:
        """Store `data`; returns its id. Makes room first (expired, then oldest images)."""
        ...

    def get(self, image_id: str) -> StoredImage:
        """The image, or NotFoundError (404) if the id is malformed, unknown or expired."""
        ...

    def total_bytes(self) -> int:
        """The bytes of the images held (expired ones swept first where that is cheap)."""
        ...


def new_image_id(now_ms: int, output_format: str) -> str:
    return f"img-{now_ms:013d}-{secrets.token_hex(16)}.{output_format}"


def parse_image_id(image_id: str) -> tuple[int, str]:
    """(created ms, content type) of a well-formed id; NotFoundError for anything else."""
    match = ID_RE.match(image_id)
    if match is None:
        raise not_found(image_id)
    return int(match.group(1)), CONTENT_TYPES[match.group(3)]


def too_large() -> InternalError:
    # A configuration problem, not the client's: the cap is below one image.
    return InternalError(
        "The image store is too small for this image; ask the operator to raise"
        " storage.max_total_bytes.",
        code="image_store_full",
    )


def not_found(image_id: str) -> NotFoundError:
    return NotFoundError(
        f"No image '{image_id[:80]}': it never existed or has expired.",
        param="image_id",
        code="image_not_found",
    )
