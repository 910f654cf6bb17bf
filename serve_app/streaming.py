"""`stream=true`: Server-Sent Events in OpenAI's shape, fed by a streaming DeploymentHandle.

Model side: `iterate_in_thread` runs the blocking pipeline in a worker thread and yields what
its step callback emits (`PartialImage`s), then the `EditOutput`. When the consumer goes away
(client disconnect -> Serve cancels the handle call -> the generator is closed), `on_close`
sets the flag the step callback checks, so the pipeline stops at the next step.

Ingress side: `open_event_stream` starts the handle call and waits for the first event
*before* the HTTP answer is committed, so validation errors, a full queue (503 + Retry-After)
or an early model failure are still ordinary OpenAI error responses. After that, events become
`image_edit.partial_image` / `image_edit.completed` SSE frames; a later failure becomes an
`error` event, which the openai client raises as `APIError`.

With `stream=true`, `n` must be 1 (400 otherwise): one completed event per request, as OpenAI.
No torch here: both deployments import this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve_app.errors import APIError, InternalError, InvalidRequestError, error_body
from serve_app.imaging import encode_image
from serve_app.jobs import EditJob, EditOutput, PartialImage
from serve_app.protocol import EditParams, InputTokensDetails, Usage

logger = logging.getLogger("ray.serve")

PARTIAL_EVENT = "image_edit.partial_image"
COMPLETED_EVENT = "image_edit.completed"
ERROR_EVENT = "error"

StreamEvent = PartialImage | EditOutput

# ---------------------------------------------------------------------------------------
# Model side


async def iterate_in_thread(
    work: Callable[[Callable[[Any], None]], Any], *, on_close: Callable[[], None]
) -> AsyncIterator[Any]:
    """Run blocking `work(emit)` in a thread; yield each emitted item, then its result.

    `on_close` runs however the iteration ends (finished, failed, or closed/cancelled by the
    consumer): it is where the caller tells the thread to stop.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(kind: str, value: Any) -> None:
        # After a cancellation the loop may be gone; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def target() -> None:
        try:
            result = work(lambda item: put("item", item))
        except BaseException as exc:
            put("error", exc)
        else:
            put("done", result)

    worker = loop.run_in_executor(None, target)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            yield value
            if kind == "done":
                break
        await worker
    finally:
        on_close()


# ---------------------------------------------------------------------------------------
# Ingress side


def check_stream_params(params: EditParams) -> None:
    """Stream-specific 400s, before any model work."""
    if not params.stream:
        return
    if params.n != 1:
        raise InvalidRequestError(
            "stream=true supports n=1 only; send n requests to stream n images.",
            param="n",
            code="unsupported_value",
        )
    if params.response_format == "url":
        raise InvalidRequestError(
            "stream=true sends images as b64_json events; response_format 'url' cannot stream.",
            param="response_format",
            code="unsupported_value",
        )


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _b64(image: Any, params: EditParams) -> str:
    encoded = encode_image(
        image, output_format=params.output_format, compression=params.output_compression
    )
    return base64.b64encode(encoded).decode("ascii")


def usage_of(output: EditOutput) -> Usage:
    input_tokens = output.text_tokens + output.input_image_tokens
    return Usage(
        input_tokens=input_tokens,
        input_tokens_details=InputTokensDetails(
            image_tokens=output.input_image_tokens, text_tokens=output.text_tokens
        ),
        output_tokens=output.output_image_tokens,
        total_tokens=input_tokens + output.output_image_tokens,
        processing_time_seconds=output.timings_s.get("pipeline"),
        input_images=output.input_images,
        generated_images=len(output.images),
    )


def render_event(event: StreamEvent, *, params: EditParams, size: str, created_at: int) -> bytes:
    """One SSE frame with the fields of openai's ImageEdit{PartialImage,Completed}Event."""
    common = {
        "created_at": created_at,
        "size": size,
        "quality": params.quality,
        "background": "opaque",
        "output_format": params.output_format,
    }
    if isinstance(event, PartialImage):
        data = {
            "type": PARTIAL_EVENT,
            "b64_json": _b64(event.image, params),
            "partial_image_index": event.index,
            **common,
        }
        return sse_frame(PARTIAL_EVENT, data)
    data = {
        "type": COMPLETED_EVENT,
        "b64_json": _b64(event.images[0], params),
        **common,
        "usage": usage_of(event).model_dump(exclude_none=True),
    }
    return sse_frame(COMPLETED_EVENT, data)


def _close_handle_stream(stream: Any) -> None:
    # A Ray DeploymentResponseGenerator has cancel(); fakes are plain async generators.
    cancel = getattr(stream, "cancel", None)
    if callable(cancel):
        cancel()
    else:
        aclose = getattr(stream, "aclose", None)
        if callable(aclose):
            task = asyncio.ensure_future(aclose())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


async def _next(stream: Any) -> StreamEvent | None:
    # None at the end: StopAsyncIteration must not leak into `call`'s error mapping.
    try:
        return await anext(stream)  # type: ignore[no-any-return]
    except StopAsyncIteration:
        return None


async def open_event_stream(
    stream: Any,
    *,
    params: EditParams,
    job: EditJob,
    call: Callable[[Awaitable[Any]], Awaitable[Any]],
    clock: Callable[[], float],
) -> AsyncIterator[bytes]:
    """Await the first model event (errors still become HTTP errors), then return the SSE body.

    `stream` is the async iterator of `handle.options(stream=True).edit_stream.remote(job)`;
    `call` maps what awaiting it raises to APIErrors, as for non-streaming calls.
    """
    try:
        first = await call(_next(stream))
    except BaseException:
        _close_handle_stream(stream)
        raise
    if first is None:
        raise InternalError("The model ended the stream without a result.")
    return _event_body(stream, first, params=params, job=job, call=call, clock=clock)


async def _event_body(
    stream: Any,
    first: StreamEvent,
    *,
    params: EditParams,
    job: EditJob,
    call: Callable[[Awaitable[Any]], Awaitable[Any]],
    clock: Callable[[], float],
) -> AsyncIterator[bytes]:
    size = f"{job.width}x{job.height}"
    finished = False
    event: StreamEvent = first
    try:
        while True:
            frame = await asyncio.to_thread(
                render_event, event, params=params, size=size, created_at=int(clock())
            )
            yield frame
            if isinstance(event, EditOutput):
                finished = True
                return
            following = await call(_next(stream))
            if following is None:
                raise InternalError("The model ended the stream without a result.")
            event = following
    except APIError as exc:
        finished = True  # the model side is done; nothing to cancel
        logger.warning("stream %s failed: %s", job.request_id, exc.message)
        yield sse_frame(ERROR_EVENT, {"type": ERROR_EVENT, **error_body(exc)})
    finally:
        # Client gone (the body iterator is closed or cancelled): stop the edit upstream too.
        if not finished:
            _close_handle_stream(stream)
