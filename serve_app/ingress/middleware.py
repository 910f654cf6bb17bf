"""The ingress's ASGI middleware, in the order `routes.create_app` lists them (outermost first):

- `RequestMetrics`: route, status and latency of every answer;
- `RequestId`: the request id (the caller's `x-request-id`, else a new one that is echoed);
- `OpenAIErrors`: whatever is raised inside becomes OpenAI error JSON (`errors_http.to_api_error`);
- `HeaderSizeLimit`: 431 when the request's headers together pass the limit;
- `origins.RefuseCrossSite`: 403 for a browser's POST from another site;
- `auth.RequireApiKey`: 401 before any body is read;
- `BodySizeLimit`: 413 once the declared or streamed body passes the limit;
- `BodyTimeout`: 408 when the body stalls or is still arriving at the upload's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.common.errors import HeadersTooLargeError, PayloadTooLargeError, RequestTimeoutError
from serve_app.common.metrics import IngressMetrics
from serve_app.ingress.errors_http import client_gone, error_response, to_api_error

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"
_UNMATCHED_ROUTE = "unmatched"


def request_id_of(scope: Scope) -> str:
    """The id `RequestId` gave the request ("" outside it)."""
    return str(scope.get("state", {}).get("request_id", ""))


class RequestMetrics:
    """Counts and times every HTTP answer (a stream until its end) by route template, not raw
    path, so the labels stay few; a client gone before any answer counts as 499."""

    def __init__(self, app: ASGIApp, *, metrics: IngressMetrics, routes: Sequence[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        # No answer at all: the client went away (a cancellation, or OpenAIErrors' quiet end
        # of a ClientDisconnect) - nginx's 499; anything else unanswered would be a 500.
        gone = 499
        try:
            await self.app(scope, receive, send_seen)
        except asyncio.CancelledError:
            raise
        except BaseException:
            gone = 500
            raise
        finally:
            self.metrics.request_done(
                route=self._route(scope), status=status or gone, seconds=time.perf_counter() - t0
            )

    def _route(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path matched, the method did not (405)
                return str(getattr(route, "path_format", _UNMATCHED_ROUTE))
        return _UNMATCHED_ROUTE


class RequestId:
    """Puts the request id in `request.state.request_id`. A caller's `x-request-id` (Serve's
    proxy sets one and echoes it itself) is kept; otherwise a new id is made and echoed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = incoming[:128] or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        if incoming:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class OpenAIErrors:
    """Every exception raised inside becomes an OpenAI error answer, never a traceback. Once
    an answer has started (a stream) nothing can be sent: the exception goes on, logged.

    A client that goes away before its answer (mid-upload: Starlette's ClientDisconnect or
    Serve's TaskCancelledError; while waiting: Serve cancels the request) is an ordinary event:
    one INFO line with the request id, no answer, no traceback; a cancellation goes on as
    itself. Mid-stream, the stream's body says it (`responses.event_stream_body`)."""

    def __init__(self, app: ASGIApp, *, retry_after_s: float) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_seen(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except asyncio.CancelledError:
            if not started:
                _log_gone(scope)
            raise
        except Exception as exc:
            request_id = request_id_of(scope)
            if client_gone(exc):
                if not started:
                    _log_gone(scope)
                return
            if started:
                logger.exception("request %s failed after its answer started", request_id)
                raise
            err = to_api_error(exc, retry_after_s=self.retry_after_s)
            if err is not exc:
                logger.error("request %s failed with an unexpected error", request_id, exc_info=exc)
            elif err.status_code >= 500:
                logger.warning("request %s failed: %s", request_id, err.message)
            await error_response(err)(scope, receive, send)


def _log_gone(scope: Scope) -> None:
    logger.info("request %s: the client went away before its answer", request_id_of(scope))


class HeaderSizeLimit:
    """Answer 431 when the request's header names and values together pass `max_bytes`. The
    HTTP proxy in front has read them already; this keeps them from going further in."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                raise HeadersTooLargeError(
                    f"The request headers are {size} bytes together; the limit is"
                    f" {self.max_bytes}.",
                )
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Answer 413 as soon as a request body passes `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(
            f"The request body exceeds the {self.max_bytes}-byte limit.",
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class BodyTimeout:
    """Answer 408 (OpenAI JSON) when the request body stops arriving: no bytes for `stall_s`,
    or not all of it by `deadline_s` after the request came in (a client trickling a byte now
    and then resets the stall timer, never the deadline). Without it a stalled upload holds its
    connection until the proxy's own timeout, whose 408 is plain text. Once the body is in,
    `receive` is left alone: Starlette then waits on it for the client's disconnect."""

    def __init__(self, app: ASGIApp, *, stall_s: float, deadline_s: float) -> None:
        self.app = app
        self.stall_s = stall_s
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            wait_s = min(self.stall_s, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait_s))
            except TimeoutError:
                stalled = wait_s >= self.stall_s
                raise RequestTimeoutError(
                    f"The request body stalled for {self.stall_s:g} s; send it again."
                    if stalled
                    else f"The request body was not complete within {self.deadline_s:g} s."
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, timed_receive, send)
