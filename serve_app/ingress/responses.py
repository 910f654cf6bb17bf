"""The answers to an edit: OpenAI's JSON body, or for `stream=true` its Server-Sent Events.

JSON: `{"created", "data": [{"b64_json" | "url", "seed"?}], "output_format", "size", ...}`.
SSE: `image_edit.partial_image` frames, then `image_edit.completed`; a failure after the first
frame becomes an `error` frame (the openai client raises it as `APIError`). Encoding blocks:
both run it in worker threads, so a multi-MB body never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pybase64

from serve_app.common.errors import APIError, InternalError, error_body
from serve_app.common.jobs import EditOutput, PartialImage
from serve_app.common.timing import StageClock
from serve_app.ingress.imaging import encode_image
from serve_app.ingress.model_client import EditStream
from serve_app.ingress.protocol import (
    EditParams,
    ImageData,
    ImagesResponse,
    Usage,
    images_response_json,
)
from serve_app.ingress.storage import image_url
from serve_app.ingress.stored_images import ImageStorage

logger = logging.getLogger("ray.serve")

PARTIAL_EVENT = "image_edit.partial_image"
COMPLETED_EVENT = "image_edit.completed"
ERROR_EVENT = "error"


def _encode(image: np.ndarray, params: EditParams) -> bytes:
    return encode_image(
        image, output_format=params.output_format, compression=params.output_compression
    )


class Base64Splice:
    """Base64 payloads spliced into a serialized JSON document.

    A multi-MB `b64_json` costs time to become a Python str and as much again for the
    serializer to scan for characters to escape; base64 has none, so the document is serialized
    with a short placeholder per payload and the payloads' bytes (pybase64, SIMD) are joined in
    afterwards (the measured difference: docs/gpu.md)."""

    def __init__(self) -> None:
        # A fresh nonce per document: no other value in it can equal a placeholder.
        self._nonce = secrets.token_hex(8)
        self._payloads: list[bytes] = []

    def add(self, data: bytes) -> str:
        """The placeholder to put where the base64 of `data` goes."""
        self._payloads.append(pybase64.b64encode(data))
        return f"{self._nonce}-{len(self._payloads) - 1}"

    def fill(self, document: bytes) -> bytes:
        """`document` with each placeholder string replaced by its payload, in one join."""
        parts: list[bytes] = []
        start = 0
        for index, payload in enumerate(self._payloads):
            mark = f'"{self._nonce}-{index}"'.encode()
            at = document.index(mark, start)
            parts += (document[start : at + 1], payload)
            start = at + len(mark) - 1
        parts.append(document[start:])
        return b"".join(parts)


def json_body(
    params: EditParams,
    output: EditOutput,
    *,
    created: int,
    seeds: list[int] | None,
    store: Callable[[], ImageStorage] | None = None,
    url_base: str | None = None,
    timing: StageClock,
) -> bytes:
    """The JSON body; `seeds` (one per image) are returned when the client sent none. With
    `url_base` the images go to `store()` and the body holds their URLs. Blocking."""
    with timing.measure("encode"):
        encoded = [_encode(image, params) for image in output.images]
    with timing.measure("body"):
        per_image = seeds if seeds is not None else [None] * len(encoded)
        splice = Base64Splice()
        if url_base is not None and store is not None:
            data = [
                ImageData(
                    url=image_url(url_base, store().put(e, output_format=params.output_format)),
                    seed=seed,
                )
                for e, seed in zip(encoded, per_image, strict=True)
            ]
        else:
            data = [
                ImageData(b64_json=splice.add(e), seed=seed)
                for e, seed in zip(encoded, per_image, strict=True)
            ]
        response = ImagesResponse(
            created=created,
            data=data,
            output_format=params.output_format,
            size=f"{output.width}x{output.height}",
            quality=params.quality,
            background="opaque",
            usage=Usage.of(output),
        )
        return splice.fill(images_response_json(response))


def sse_frame(event: str, data: dict[str, Any], *, splice: Base64Splice | None = None) -> bytes:
    frame = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
    return frame if splice is None else splice.fill(frame)


def event_frame(
    event: PartialImage | EditOutput,
    *,
    params: EditParams,
    size: str,
    created_at: int,
    seed: int | None = None,
) -> bytes:
    """One SSE frame with the fields of openai's ImageEdit{PartialImage,Completed}Event
    (`seed` on the completed event when the client sent none)."""
    common = {
        "created_at": created_at,
        "size": size,
        "quality": params.quality,
        "background": "opaque",
        "output_format": params.output_format,
    }
    splice = Base64Splice()
    if isinstance(event, PartialImage):
        data = {
            "type": PARTIAL_EVENT,
            "b64_json": splice.add(_encode(event.image, params)),
            "partial_image_index": event.index,
            **common,
        }
        return sse_frame(PARTIAL_EVENT, data, splice=splice)
    data = {
        "type": COMPLETED_EVENT,
        "b64_json": splice.add(_encode(event.images[0], params)),
        **common,
        "usage": Usage.of(event).model_dump(exclude_none=True),
    }
    if seed is not None:
        data["seed"] = seed
    return sse_frame(COMPLETED_EVENT, data, splice=splice)


async def event_stream_body(
    events: EditStream,
    *,
    params: EditParams,
    size: str,
    clock: Callable[[], float],
    request_id: str,
    seed: int | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body: a frame per event until the EditOutput; an error frame if the model fails
    first; the edit is stopped upstream if the client goes away (the body is closed or
    cancelled), an ordinary event logged in one INFO line."""
    finished = False
    try:
        async for event in events:
            yield await asyncio.to_thread(
                event_frame, event, params=params, size=size, created_at=int(clock()), seed=seed
            )
            if isinstance(event, EditOutput):
                finished = True
                return
        raise InternalError("The model ended the stream without a result.")
    except APIError as exc:
        finished = True  # the model side is done; nothing to cancel
        logger.warning("stream %s failed: %s", request_id, exc.message)
        yield sse_frame(ERROR_EVENT, {"type": ERROR_EVENT, **error_body(exc)})
    except (GeneratorExit, asyncio.CancelledError):
        logger.info("request %s: the client went away mid-stream", request_id)
        raise
    finally:
        if not finished:
            events.close()
