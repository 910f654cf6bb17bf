"""stream=true: the thread bridge, the model's edit_stream, and the SSE the ingress writes."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai.types import ImageEditCompletedEvent, ImageEditPartialImageEvent
from PIL import Image

from serve_app.errors import InvalidRequestError, ServiceUnavailableError
from serve_app.jobs import EditJob, EditOutput, PartialImage
from serve_app.metrics import NullMetrics
from serve_app.model import ImageEditModel
from serve_app.pipeline.previews import preview_steps
from serve_app.pipeline.runner import EditStopped
from serve_app.streaming import iterate_in_thread
from tests.unit.fakes import FAKE_INFO, FakeModelHandle, fake_edit
from tests.unit.test_ingress import assert_error, make_client, post_edit
from tests.unit.test_model import CONFIG, job


def parse_sse(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per frame, as the openai client's SSE decoder splits them."""
    events = []
    for frame in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# --- preview schedule --------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps,count,expected",
    [
        (10, 3, [1, 4, 7]),
        (4, 2, [0, 2]),
        (8, 1, [3]),
        (2, 3, [0]),  # short runs send fewer previews; never one on the last step
        (1, 3, []),
        (50, 0, []),
    ],
)
def test_preview_steps_are_evenly_spaced_and_never_the_last(
    steps: int, count: int, expected: list[int]
) -> None:
    assert preview_steps(steps, count) == expected


# --- thread bridge -----------------------------------------------------------------------


def test_iterate_in_thread_yields_items_then_the_result() -> None:
    closed = threading.Event()

    def work(emit: Any) -> str:
        emit(1)
        emit(2)
        return "done"

    async def main() -> list[Any]:
        return [x async for x in iterate_in_thread(work, on_close=closed.set)]

    assert asyncio.run(main()) == [1, 2, "done"]
    assert closed.is_set()


def test_iterate_in_thread_raises_the_worker_error() -> None:
    def work(emit: Any) -> None:
        emit("first")
        raise InvalidRequestError("bad", param="mask")

    async def main() -> list[Any]:
        seen = []
        with pytest.raises(InvalidRequestError):
            async for item in iterate_in_thread(work, on_close=lambda: None):
                seen.append(item)
        return seen

    assert asyncio.run(main()) == ["first"]


def test_closing_the_iterator_stops_the_worker() -> None:
    stop = threading.Event()
    finished = threading.Event()
    steps = []

    def work(emit: Any) -> None:
        try:
            for i in range(500):
                if stop.is_set():
                    return
                steps.append(i)
                emit(i)
                time.sleep(0.01)
        finally:
            finished.set()

    async def main() -> None:
        agen = iterate_in_thread(work, on_close=stop.set)
        assert await anext(agen) == 0
        await agen.aclose()  # what a cancelled consumer does

    asyncio.run(main())
    assert finished.wait(5)
    assert len(steps) < 500


# --- the model deployment's edit_stream ----------------------------------------------------


class PreviewRunner:
    """Fake runner with the real runner's keyword interface: previews via on_partial."""

    info = FAKE_INFO

    def __init__(self, step_s: float = 0.0) -> None:
        self.step_s = step_s
        self.steps_done = 0
        self.finished = threading.Event()

    def run(self, job: EditJob, *, step_hook: Any = None, on_partial: Any = None) -> EditOutput:
        try:
            schedule = preview_steps(job.num_inference_steps, job.partial_images)
            for step in range(job.num_inference_steps):
                time.sleep(self.step_s)
                self.steps_done += 1
                if step_hook and (reason := step_hook(step + 1, job.num_inference_steps)):
                    raise EditStopped(reason)
                if on_partial and step in schedule:
                    on_partial(
                        schedule.index(step), np.full((job.height, job.width, 3), step, np.uint8)
                    )
            return fake_edit(job)
        finally:
            self.finished.set()


def test_edit_stream_yields_previews_then_the_output() -> None:
    model = ImageEditModel(
        CONFIG, runner_factory=lambda m, g: PreviewRunner(), metrics=NullMetrics()
    )

    async def main() -> list[Any]:
        return [e async for e in model.edit_stream(job(num_inference_steps=10, partial_images=3))]

    events = asyncio.run(main())
    assert [type(e).__name__ for e in events] == ["PartialImage"] * 3 + ["EditOutput"]
    assert [e.index for e in events[:3]] == [0, 1, 2]
    assert [int(e.image[0, 0, 0]) for e in events[:3]] == [1, 4, 7]  # steps of the schedule


def test_closing_edit_stream_stops_the_pipeline() -> None:
    runner = PreviewRunner(step_s=0.02)
    model = ImageEditModel(CONFIG, runner_factory=lambda m, g: runner, metrics=NullMetrics())

    async def main() -> None:
        agen = model.edit_stream(job(num_inference_steps=200, partial_images=3))
        first = await anext(agen)
        assert isinstance(first, PartialImage)
        await agen.aclose()  # Serve closes the generator when the caller cancels

    asyncio.run(main())
    assert runner.finished.wait(5)
    assert runner.steps_done < 200


def test_edit_stream_cancelled_task_stops_the_pipeline() -> None:
    runner = PreviewRunner(step_s=0.02)
    model = ImageEditModel(CONFIG, runner_factory=lambda m, g: runner, metrics=NullMetrics())

    async def consume() -> None:
        async for _ in model.edit_stream(job(num_inference_steps=200, partial_images=1)):
            pass

    async def main() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert runner.finished.wait(5)
    assert runner.steps_done < 200


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
