"""The model deployment as the ingress calls it: plain data in and out, every failure an APIError.

`ModelClient` wraps the DeploymentHandle (a fake in unit tests): what awaiting a call raises (Ray's
back-pressure, a lost replica, the model's own APIErrors) goes through `errors_http.to_api_error`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

from serve_app.common.errors import InternalError, TimeoutError_
from serve_app.common.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.ingress.errors_http import to_api_error

logger = logging.getLogger("ray.serve")

# Extra time the ingress waits past the model's own deadline before answering 504 itself.
DEADLINE_GRACE_S = 5.0

StreamEvent = PartialImage | EditOutput


class ModelHandle(Protocol):
    """What the ingress needs of the model deployment's DeploymentHandle."""

    @property
    def edit(self) -> Any: ...

    @property
    def info(self) -> Any: ...

    # `options(stream=True).edit_stream.remote(job)`: the streaming edit.
    def options(self, **kwargs: Any) -> Any: ...


class ModelClient:
    def __init__(
        self, handle: ModelHandle, *, retry_after_s: float, request_timeout_s: float
    ) -> None:
        self._handle = handle
        self._retry_after_s = retry_after_s
        self._request_timeout_s = request_timeout_s

    async def call(self, awaitable: Awaitable[Any]) -> Any:
        """Await a handle call; what it raises leaves as an APIError (cancellation as itself)."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = to_api_error(exc, retry_after_s=self._retry_after_s)
            if isinstance(err, InternalError) and err is not exc:
                logger.error("model call failed", exc_info=exc)
            raise err from None

    async def info(self) -> ModelInfo:
        info: ModelInfo = await self.call(self._handle.info.remote())
        return info

    async def edit(self, job: EditJob) -> EditOutput:
        response = self._handle.edit.remote(job)
        try:
            output: EditOutput = await asyncio.wait_for(
                self.call(response), self._request_timeout_s + DEADLINE_GRACE_S
            )
        except TimeoutError:
            # The model normally answers 504 itself at the deadline; this covers a request
            # that never reached a replica. Cancelling frees its queue slot.
            _cancel(response)
            raise TimeoutError_(
                f"The edit did not finish within {self._request_timeout_s:.0f} s."
            ) from None
        return output

    async def edit_stream(self, job: EditJob) -> EditStream:
        """Start a streaming edit and wait for its first event, so that errors up to then
        (validation, a full queue, an early model failure) are still ordinary HTTP errors."""
        upstream = self._handle.options(stream=True).edit_stream.remote(job)
        try:
            first = await self.call(_next(upstream))
        except BaseException:
            _cancel(upstream)
            raise
        if first is None:
            raise InternalError("The model ended the stream without a result.")
        return EditStream(upstream, first, self)


class EditStream:
    """A streaming edit whose first event has arrived: iterate for it and the rest (errors as
    APIErrors); `close()` stops the edit upstream (the client went away)."""

    def __init__(self, upstream: Any, first: StreamEvent, client: ModelClient) -> None:
        self._upstream = upstream
        self._first: StreamEvent | None = first
        self._client = client

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._first is not None:
            event, self._first = self._first, None
            return event
        following = await self._client.call(_next(self._upstream))
        if following is None:
            raise StopAsyncIteration
        return following

    def close(self) -> None:
        _cancel(self._upstream)


async def _next(stream: Any) -> StreamEvent | None:
    # None at the end: StopAsyncIteration must not leak into `call`'s error mapping.
    try:
        event: StreamEvent = await anext(stream)
        return event
    except StopAsyncIteration:
        return None


def _cancel(call: Any) -> None:
    """Stop a handle call upstream, best effort and without raising: this runs while another
    answer is on its way (an error already mapped, a cancellation), which it must not replace.
    Ray's `cancel()` re-raises what the call failed with when it never reached a replica (e.g.
    the BackPressureError of a full queue, already answered as 503)."""
    try:
        # A Ray DeploymentResponse(Generator) has cancel(); fakes are plain async generators.
        cancel = getattr(call, "cancel", None)
        if callable(cancel):
            cancel()
            return
        aclose = getattr(call, "aclose", None)
        if callable(aclose):
            task = asyncio.ensure_future(aclose())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
    except Exception:
        logger.debug("cancelling a model call raised; already answered", exc_info=True)
