"""stream=true as the ingress writes it: OpenAI's SSE events over a fake model handle."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from PIL import Image

from serve_app.common.errors import ServiceUnavailableError
from serve_app.common.jobs import EditJob, PartialImage
from tests.fakes import FakeModelHandle
from tests.ingress.test_ingress import assert_error, make_client, post_edit


def parse_sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per frame, as the openai client's SSE decoder splits them."""
    events = []
    for frame in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# --- the ingress's SSE ---------------------------------------------------------------------


def test_stream_sends_openai_partial_and_completed_events() -> None:
    client, handle = make_client()
    resp = post_edit(client, stream="true", partial_images=2, size="64x48", seed=5,
                     output_format="jpeg")  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert handle.options_seen == [{"stream": True}]
    assert handle.jobs[0].partial_images == 2
    events = parse_sse(resp.text)
    assert [name for name, _ in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    for name, data in events:
        assert data["type"] == name  # the client dispatches on `type`
    partials = [ImageEditPartialImageEvent.model_validate(d) for _, d in events[:2]]
    done = ImageEditCompletedEvent.model_validate(events[2][1])
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert done.size == "64x48" and done.output_format == "jpeg" and done.usage.input_tokens == 3
    # Strict field sets: exactly OpenAI's, nothing missing.
    assert set(events[0][1]) == {"type", "b64_json", "partial_image_index", "created_at", "size",
                                 "quality", "background", "output_format"}  # fmt: skip
    assert set(events[2][1]) == {"type", "b64_json", "created_at", "size", "quality",
                                 "background", "output_format", "usage"}  # fmt: skip
    final = Image.open(io.BytesIO(base64.b64decode(done.b64_json)))
    assert final.format == "JPEG" and final.size == (64, 48)
    preview = Image.open(io.BytesIO(base64.b64decode(partials[1].b64_json)))
    assert preview.size == (64, 48) and preview.getpixel((0, 0))[0] in range(115, 125)


def test_stream_without_partials_sends_only_the_completion() -> None:
    client, _ = make_client()
    events = parse_sse(post_edit(client, stream="true", size="32x32").text)
    assert [name for name, _ in events] == ["image_edit.completed"]


def test_partial_images_without_stream_is_a_plain_json_answer() -> None:
    client, handle = make_client()
    resp = post_edit(client, partial_images=2, size="32x32")
    assert resp.status_code == 200 and "data" in resp.json()
    assert handle.jobs[0].partial_images == 0 and handle.options_seen == []


def test_error_before_the_first_event_is_an_http_error() -> None:
    async def overloaded(job: EditJob) -> AsyncIterator[Any]:
        raise ServiceUnavailableError("full", retry_after_s=3)
        yield  # an async generator

    client, _ = make_client(FakeModelHandle(edit_stream=overloaded))
    resp = post_edit(client, stream="true", size="32x32")
    assert_error(resp, 503, None)
    assert resp.headers["Retry-After"] == "3"


def test_error_after_the_first_event_is_an_error_event() -> None:
    async def fails_midway(job: EditJob) -> AsyncIterator[Any]:
        yield PartialImage(index=0, image=np.zeros((job.height, job.width, 3), np.uint8))
        raise RuntimeError("secret detail")

    client, _ = make_client(FakeModelHandle(edit_stream=fails_midway))
    resp = post_edit(client, stream="true", partial_images=1, size="32x32")
    assert resp.status_code == 200
    events = parse_sse(resp.text)
    assert [name for name, _ in events] == ["image_edit.partial_image", "error"]
    err = events[1][1]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and "secret" not in err["message"]


def test_stream_that_ends_without_a_result_is_an_error_event() -> None:
    async def no_result(job: EditJob) -> AsyncIterator[Any]:
        yield PartialImage(index=0, image=np.zeros((job.height, job.width, 3), np.uint8))

    client, _ = make_client(FakeModelHandle(edit_stream=no_result))
    events = parse_sse(post_edit(client, stream="true", partial_images=1, size="32x32").text)
    assert events[-1][0] == "error"


def test_stream_validation_errors_are_400() -> None:
    client, handle = make_client()
    assert_error(post_edit(client, stream="true", n=2), 400, "n")
    assert_error(post_edit(client, stream="true", response_format="url"), 400, "response_format")
    assert_error(post_edit(client, stream="true", partial_images=4), 400, "partial_images")
    assert handle.jobs == []


def test_completed_event_reports_the_seed_when_none_was_sent() -> None:
    client, handle = make_client()
    events = parse_sse(post_edit(client, stream="true", size="32x32").text)
    assert events[-1][1]["seed"] == handle.jobs[0].seeds[0]
    events = parse_sse(post_edit(client, stream="true", size="32x32", seed=9).text)
    assert "seed" not in events[-1][1]


class _RefusedCall:
    """A streaming handle call as Ray makes it when the request never reaches a replica: the
    first `anext` raises the error, and so does `cancel()` afterwards (Ray's
    DeploymentResponseGenerator re-reads the failed assignment when cancelled)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.cancelled = 0

    def __aiter__(self) -> _RefusedCall:
        return self

    async def __anext__(self) -> Any:
        raise self.error

    def cancel(self) -> None:
        self.cancelled += 1
        raise self.error


def _ray_refusals() -> list[tuple[BaseException, str]]:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    return [
        (BackPressureError(num_queued_requests=8, max_queued_requests=8), "server_overloaded"),
        (ActorDiedError(), "replica_unavailable"),
        (
            ServiceUnavailableError("busy", code="replica_unavailable", retry_after_s=5),
            "replica_unavailable",
        ),
    ]


@pytest.mark.parametrize("error,code", _ray_refusals(), ids=["backpressure", "died", "api"])
def test_a_refused_stream_keeps_its_503_when_cancelling_raises(
    error: BaseException, code: str
) -> None:
    calls: list[_RefusedCall] = []

    def refused(job: EditJob) -> Any:
        calls.append(_RefusedCall(error))
        return calls[-1]

    client, _ = make_client(FakeModelHandle(edit_stream=refused), retry_after_s=7)
    resp = post_edit(client, stream="true", size="32x32")
    err = assert_error(resp, 503, None)
    assert err["code"] == code
    assert int(resp.headers["Retry-After"]) >= 1
    assert calls[0].cancelled == 1  # the queue slot is still given back


class _Events:
    """An EditStream stand-in: previews forever until closed."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> PartialImage:
        return PartialImage(index=0, image=np.zeros((16, 16, 3), np.uint8))

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("how", ["closed", "cancelled"])
def test_a_client_gone_mid_stream_is_one_info_line_and_stops_the_edit(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from serve_app.ingress.protocol import EditParams
    from serve_app.ingress.responses import event_stream_body

    events = _Events()
    body = event_stream_body(
        events,  # type: ignore[arg-type]
        params=EditParams(prompt="x"),
        size="16x16",
        clock=lambda: 0.0,
        request_id="req-stop",
    )

    async def main() -> None:
        assert (await anext(body)).startswith(b"event: image_edit.partial_image")
        if how == "closed":  # Starlette closes the body when the client disconnects
            await body.aclose()
            return
        task = asyncio.ensure_future(anext(body))  # Serve cancels the request instead
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(main())
    assert events.closed
    records = [r for r in caplog.records if r.name == "ray.serve"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "request req-stop: the client went away mid-stream")
    ]
