"""Serve's proxy's own answers as OpenAI error JSON; the app's answers and streams untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from serve_app.common.links import PROXY_CALLBACK_ENV, PROXY_ENV
from serve_app.ingress.proxy_errors import (
    LOST_MESSAGE,
    RETRY_AFTER_S,
    ProxyErrorsAsJSON,
    proxy_middlewares,
)

App = Callable[[Scope, Receive, Send], Awaitable[None]]


def scope(path: str = "/v1/images/edits") -> dict[str, Any]:
    headers = [(b"x-request-id", b"req-1"), (b"host", b"serve")]
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


async def _receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def call(app: App, *, path: str = "/v1/images/edits") -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(ProxyErrorsAsJSON(app)(scope(path), _receive, send))
    return sent


def answer(sent: list[Message]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of a complete answer."""
    start, *bodies = sent
    assert start["type"] == "http.response.start"
    assert not bodies[-1].get("more_body", False)
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(b"".join(b["body"] for b in bodies))


def plain(status: int, text: bytes, *headers: tuple[bytes, bytes]) -> App:
    """An app answering as Serve's proxy does for its own errors (convert_object_to_asgi_messages)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        content_type = [b"content-type", b"text/plain; charset=utf-8"]
        start = {"type": "http.response.start", "status": status}
        await send({**start, "headers": [content_type, *(list(h) for h in headers)]})
        await send({"type": "http.response.body", "body": text, "more_body": False})

    return app


async def no_answer(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve's proxy when the ingress replica a request reached dies: it sends nothing (and
    uvicorn would write a plain-text 500)."""


def assert_error(body: dict[str, Any], *, code: str, type_: str = "server_error") -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, None)


def test_a_request_the_proxy_leaves_unanswered_is_a_json_503_with_retry_after() -> None:
    status, headers, body = answer(call(no_answer))
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == str(round(RETRY_AFTER_S)) and RETRY_AFTER_S >= 1
    assert headers["x-request-id"] == "req-1"  # Serve's id: the client can quote it
    assert_error(body, code="replica_unavailable")
    assert body["error"]["message"] == LOST_MESSAGE


def test_an_error_in_the_proxy_before_any_answer_is_the_same_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("the router broke")

    status, headers, body = answer(call(broken))
    assert (status, headers["retry-after"]) == (503, "5")
    assert body["error"]["code"] == "replica_unavailable"
    assert "the router broke" in caplog.text  # logged with its traceback, not sent


def test_a_plain_text_500_is_json_and_its_text_dropped() -> None:
    status, headers, body = answer(call(plain(500, b"Internal Server Error")))
    assert status == 500
    assert_error(body, code="internal_error")
    assert "retry-after" not in headers


@pytest.mark.parametrize(
    ("serve_answer", "expected"),
    [
        # Back-pressure at the ingress's queue: Serve's own Retry-After is kept.
        ((503, b"Request dropped due to backpressure", (b"retry-after", b"3")),
         (503, "server_overloaded", "3")),
        ((429, b"Request dropped due to backpressure", (b"retry-after", b"2")),
         (429, "rate_limit_exceeded", "2")),
        ((429, b"Request dropped due to backpressure"), (429, "rate_limit_exceeded", "5")),
        # A deployment unavailable (e.g. being deleted): no Retry-After from Serve, ours.
        ((503, b"Deployment 'x' is unavailable"), (503, "service_unavailable", "5")),
        # http_options.request_timeout_s: the app's own answer for a deadline passed.
        ((408, b"Request req-1 timed out after 900.0s."), (504, "timeout", None)),
        ((502, b"Bad Gateway"), (502, "http_502", None)),
    ],
)  # fmt: skip
def test_serves_plain_text_errors_become_json(
    serve_answer: tuple[Any, ...], expected: tuple[int, str, str | None]
) -> None:
    status, headers, body = answer(call(plain(*serve_answer)))
    type_ = "rate_limit_error" if status == 429 else "server_error"
    assert_error(body, code=expected[1], type_=type_)
    assert (status, body["error"]["code"], headers.get("retry-after")) == expected


def test_json_answers_and_other_answers_pass_untouched() -> None:
    own = [  # the app's own 500: OpenAI JSON already
        {"type": "http.response.start", "status": 500,
         "headers": [(b"content-type", b"application/json"), (b"x-app", b"1")]},
        {"type": "http.response.body", "body": b'{"error": {}}', "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
    ]  # fmt: skip

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in own:
            await send(message)

    assert call(app) == own
    assert call(plain(404, b"Path '/x' not found."))[0]["status"] == 404  # a 4xx stays
    healthz = call(plain(503, b"draining"), path="/-/healthz")  # Serve's own, for probes
    assert (healthz[0]["status"], healthz[1]["body"]) == (503, b"draining")


def test_a_stream_passes_event_by_event_unbuffered() -> None:
    """Each event reaches the client before the app makes the next: the app waits for it."""

    async def run() -> list[Message]:
        seen: list[Message] = []
        got = asyncio.Event()

        async def send(message: Message) -> None:
            seen.append(message)
            got.set()

        async def stream(scope: Scope, receive: Receive, send: Send) -> None:
            headers = [(b"content-type", b"text/event-stream")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i in range(3):
                got.clear()
                event = f"event: partial\ndata: {i}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await asyncio.wait_for(got.wait(), timeout=5)  # held back: this times out
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await ProxyErrorsAsJSON(stream)(scope(), _receive, send)
        return seen

    seen = asyncio.run(run())
    assert [m.get("body", b"")[:14] for m in seen[1:4]] == [b"event: partial"] * 3
    assert seen[0]["status"] == 200 and len(seen) == 5


def test_an_error_after_the_answer_started_goes_on() -> None:
    async def cut(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        raise RuntimeError("the replica died mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        call(cut)


def test_serve_loads_it_from_the_environment_the_clusters_get() -> None:
    from ray.serve._private.http_util import (
        _apply_middlewares,
        validate_http_proxy_callback_return,
    )
    from ray.serve._private.utils import call_function_from_import_path

    middlewares = validate_http_proxy_callback_return(
        call_function_from_import_path(PROXY_ENV[PROXY_CALLBACK_ENV])
    )
    assert [m.cls for m in middlewares] == [m.cls for m in proxy_middlewares()]
    # Outside Serve's own RequestIdMiddleware, whose id the answers carry.
    proxy = _apply_middlewares(no_answer, middlewares)
    assert isinstance(proxy, ProxyErrorsAsJSON)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(proxy({**scope(), "headers": [(b"host", b"serve")]}, _receive, send))
    status, headers, body = answer(sent)
    assert (status, body["error"]["code"]) == (503, "replica_unavailable")
    assert len(headers["x-request-id"]) > 8  # the id Serve made for the request
