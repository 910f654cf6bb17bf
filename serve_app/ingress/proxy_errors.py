"""Serve's HTTP proxy's own error answers as OpenAI error JSON, with Retry-After where it helps.

Serve's HTTP proxy (Ray's process, in front of every ingress replica) answers some requests itself,
in plain text: when the ingress replica a request had reached dies, the proxy writes nothing and
uvicorn answers `500 Internal Server Error`; when the ingress deployment's queue is full, Serve's
503 (or 429) with its Retry-After; when a deployment is unavailable, a 503; when
`http_options.request_timeout_s` passes, a 408. `ProxyErrorsAsJSON` wraps the proxy's ASGI app
(Serve applies what `proxy_middlewares` returns to every proxy when the environment variable
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` names it: `serve_app.common.links.PROXY_ENV`, which
the launcher, the container image, the manifests and the tests set) and answers those instead:

- no answer at all (a lost ingress replica, or an error in the proxy): 503 `replica_unavailable`
  with Retry-After, as the app answers for a lost model replica: the openai client retries it,
  and Serve routes the retry to a live ingress replica;
- Serve's 503 / 429: the same status as JSON (`server_overloaded` when Serve gave a Retry-After,
  its back-pressure; else `service_unavailable`), Serve's Retry-After kept, else ours;
- Serve's 408: 504 `timeout`, the answer the app gives when its own deadline passes first;
- any other 5xx that is not JSON (a plain 500 from an exception no handler caught): the same
  status as JSON.

Every JSON answer (all of the app's own) and every other answer, streams included, passes
untouched: only the start message's status and content type are read, no body is held. Serve's
own endpoints (`/-/healthz`, `/-/routes`) keep their answers, for the probes that read them.
This module runs in the proxy process: Starlette and the error types only, no torch, no app
config (the proxy serves whatever application is deployed).
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.common.config import AppConfig
from serve_app.common.errors import (
    APIError,
    InternalError,
    RateLimitError,
    ServiceUnavailableError,
    TimeoutError_,
)
from serve_app.ingress.errors_http import error_for_status, error_response

logger = logging.getLogger("ray.serve")

# The proxy reads no application args, so it cannot know `retry_after_s`: its default, which the
# app's own 503s carry unless configured otherwise. Long enough for Serve to have dropped a dead
# replica from its routing (or started a new one where there was only one).
RETRY_AFTER_S: float = AppConfig.model_fields["retry_after_s"].default
# Serve's own endpoints: KubeRay's readiness probe and `serve status` read them as they are.
SERVE_PATHS = frozenset({"/-/healthz", "/-/routes"})
REQUEST_ID_HEADER = "x-request-id"  # Serve's proxy sets one on every request and echoes it
LOST_MESSAGE = "The server lost this request (its ingress replica became unavailable); retry it."
_OVERLOADED = "The server is at capacity; retry after the delay in Retry-After."
_UNAVAILABLE = "The service is unavailable right now; retry after the delay in Retry-After."
_TIMED_OUT = "The request did not finish within the server's HTTP timeout."
_FAILED = "The server had an error while processing your request."


def proxy_middlewares() -> list[Middleware]:
    """What Serve's `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` calls in every proxy."""
    return [Middleware(ProxyErrorsAsJSON)]


class ProxyErrorsAsJSON:
    """The proxy's plain-text error answers, and its missing ones, as OpenAI error JSON."""

    def __init__(self, app: ASGIApp, *, retry_after_s: float = RETRY_AFTER_S) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in SERVE_PATHS:
            await self.app(scope, receive, send)
            return
        started = False  # an answer went out: the app's, or ours in its place
        replaced = False  # ours: the rest of the replaced answer's body is dropped

        async def send_or_replace(message: Message) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start" and not started:
                started = True
                error = self.replacement(message)
                if error is not None:
                    replaced = True
                    await self._answer(error, scope, receive, send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_or_replace)
        except Exception:
            if started and not replaced:
                raise  # an answer under way: nothing else can be sent; uvicorn cuts it
            if not started:
                logger.warning("request failed in the proxy; answered 503", exc_info=True)
        if not started:
            await self._answer(self.lost(), scope, receive, send)

    def lost(self) -> APIError:
        """The answer to a request the proxy left unanswered."""
        return ServiceUnavailableError(
            LOST_MESSAGE, code="replica_unavailable", retry_after_s=self.retry_after_s
        )

    def replacement(self, start: Message) -> APIError | None:
        """What replaces the answer `start` begins; None to keep it."""
        headers = Headers(raw=start.get("headers") or [])
        if _is_json(headers.get("content-type", "")):
            return None
        status = int(start["status"])
        retry_after_s = _retry_after_s(headers.get("retry-after"))
        if status == 408:
            return TimeoutError_(_TIMED_OUT)
        if status == 429:
            return RateLimitError(_OVERLOADED, retry_after_s=retry_after_s or self.retry_after_s)
        if status == 503 and retry_after_s is not None:
            return ServiceUnavailableError(
                _OVERLOADED, code="server_overloaded", retry_after_s=retry_after_s
            )
        if status == 503:
            return ServiceUnavailableError(_UNAVAILABLE, retry_after_s=self.retry_after_s)
        if status == 500:
            return InternalError(_FAILED)  # as the app's own handlers answer an unexpected error
        if status >= 500:
            return error_for_status(status, _FAILED)
        return None

    @staticmethod
    async def _answer(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        # Serve's RequestIdMiddleware (inside this one) put its id in the scope's headers.
        request_id = Headers(scope=scope).get(REQUEST_ID_HEADER)
        extra = {REQUEST_ID_HEADER: request_id} if request_id else None
        await error_response(error, headers=extra)(scope, receive, send)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _retry_after_s(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
