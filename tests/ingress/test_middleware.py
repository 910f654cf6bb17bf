"""The ingress middleware at the ASGI level, where a client can stall mid-body."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from serve_app.common.config import AppConfig
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FakeModelHandle
from tests.fixtures import multipart

Message = dict[str, Any]
BODY, CONTENT_TYPE = multipart([("prompt", b"make it blue"), ("size", b"32x32")])


def app(handle: FakeModelHandle | None = None, **config: Any) -> Any:
    cfg = AppConfig.model_validate(
        {"model": {"source": "tiny"}, "limits": {"min_output_side": 32}, **config}
    )
    return create_app(EditService(model=handle or FakeModelHandle(), config=cfg))


def chunks(*, size: int, upto: int | None = None) -> list[Message]:
    body = BODY[:upto] if upto is not None else BODY
    return [
        {"type": "http.request", "body": body[i : i + size], "more_body": True}
        for i in range(0, len(body), size)
    ]


async def post(
    asgi: Any,
    receive: Callable[[], Awaitable[Message]],
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, Any, float]:
    """POST /v1/images/edits with `receive` (and extra `headers`): (status, JSON answer, s)."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/images/edits", "raw_path": b"/v1/images/edits",
        "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("c", 1),
        "headers": [(b"content-type", CONTENT_TYPE.encode()), *(headers or [])],
    }  # fmt: skip
    t0 = time.monotonic()
    await asyncio.wait_for(asgi(scope, receive, send), 30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert dict(start["headers"])[b"content-type"] == b"application/json"
    return start["status"], json.loads(body), time.monotonic() - t0


def feeding(messages: list[Message], *, every_s: float = 0.0) -> Callable[[], Awaitable[Message]]:
    """A client sending `messages` (one per `every_s`), then nothing ever again."""

    async def receive() -> Message:
        await asyncio.sleep(every_s)
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # stalled
        raise AssertionError("unreachable")

    return receive


@pytest.mark.parametrize("upto", [0, 40, 200])
def test_a_stalled_upload_is_answered_408_json(upto: int) -> None:
    status, answer, seconds = asyncio.run(
        post(app(upload_stall_timeout_s=0.3), feeding(chunks(size=64, upto=upto)))
    )
    assert status == 408
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == "request_timeout"
    assert "stalled for 0.3 s" in answer["error"]["message"]
    assert seconds < 5


def test_an_upload_still_arriving_at_the_deadline_is_408() -> None:
    # 10-byte chunks every 50 ms: never stalled, never done within the 0.5 s deadline.
    asgi = app(upload_stall_timeout_s=5, request_timeout_s=0.5)
    status, answer, _ = asyncio.run(post(asgi, feeding(chunks(size=10), every_s=0.05)))
    assert status == 408
    assert "not complete within 0.5 s" in answer["error"]["message"]


def test_a_trickle_that_never_stalls_is_bounded_by_upload_timeout_s() -> None:
    # A byte every 50 ms resets the 5 s stall timer each time; the 0.5 s upload bound holds.
    asgi = app(upload_stall_timeout_s=5, upload_timeout_s=0.5, request_timeout_s=30)
    status, answer, seconds = asyncio.run(post(asgi, feeding(chunks(size=1), every_s=0.05)))
    assert status == 408 and answer["error"]["code"] == "request_timeout"
    assert "not complete within 0.5 s" in answer["error"]["message"]
    assert seconds < 5


def test_headers_above_the_limit_are_431_before_the_body_is_read() -> None:
    handle = FakeModelHandle()
    asgi = app(handle, limits={"min_output_side": 32, "max_header_bytes": 4096})
    read: list[Message] = []

    async def receive() -> Message:
        read.append({})
        return {"type": "http.request", "body": BODY, "more_body": False}

    big = [(b"x-big", b"a" * 5000)]
    status, answer, _ = asyncio.run(post(asgi, receive, headers=big))
    assert status == 431 and answer["error"]["code"] == "request_headers_too_large"
    assert "4096" in answer["error"]["message"]
    assert read == [] and handle.jobs == []
    many = [(b"x-n", b"b" * 100)] * 50  # many small ones add up
    assert asyncio.run(post(asgi, receive, headers=many))[0] == 431
    assert asyncio.run(post(asgi, receive, headers=[(b"x-ok", b"c" * 1000)]))[0] == 200


def test_a_slow_but_complete_upload_gets_its_answer_and_its_deadline_counts_from_arrival() -> None:
    handle = FakeModelHandle()
    asgi = app(handle, upload_stall_timeout_s=5, request_timeout_s=30)
    messages = chunks(size=len(BODY) // 2 + 1)
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    status, answer, _ = asyncio.run(post(asgi, feeding(messages, every_s=0.3)))
    assert status == 200 and answer["data"]
    job = handle.jobs[0]
    assert job.deadline is not None and job.submitted_at is not None
    # The ~0.9 s upload came off the 30 s.
    assert job.deadline - job.submitted_at <= 30 - 0.8


def _scope(request_id: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/images/edits", "raw_path": b"/v1/images/edits",
        "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("c", 1),
        "headers": [(b"content-type", CONTENT_TYPE.encode()),
                    (b"x-request-id", request_id.encode())],
    }  # fmt: skip


def _assert_one_quiet_line(caplog: pytest.LogCaptureFixture, request_id: str) -> None:
    records = [r for r in caplog.records if r.name == "ray.serve"]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
    assert request_id in records[0].getMessage() and "went away" in records[0].getMessage()
    assert records[0].exc_info is None


def test_a_client_gone_mid_upload_is_one_info_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handle = FakeModelHandle()
    asgi = app(handle)
    messages = [*chunks(size=64, upto=200), {"type": "http.disconnect"}]
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(asgi(_scope("req-gone-upload"), feeding(messages), send))
    assert sent == [] and handle.jobs == []  # nobody to answer
    _assert_one_quiet_line(caplog, "req-gone-upload")


def test_a_cancelled_request_is_one_info_line_and_stays_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asgi = app(upload_stall_timeout_s=30)

    async def main() -> None:
        task = asyncio.create_task(
            asgi(_scope("req-gone-wait"), feeding(chunks(size=64, upto=100)), _ignore)
        )
        await asyncio.sleep(0.2)  # mid-upload, as Serve cancels when the client hangs up
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(main())
    _assert_one_quiet_line(caplog, "req-gone-wait")


async def _ignore(message: Message) -> None:
    return None


def test_serves_cancellation_while_reading_the_body_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What Serve's `receive` raises for a request whose client hung up mid-body.
    from ray.exceptions import TaskCancelledError

    messages: list[Message] = chunks(size=64, upto=100)

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        raise TaskCancelledError()

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(app()(_scope("req-ray-cancel"), receive, _ignore))
    _assert_one_quiet_line(caplog, "req-ray-cancel")
