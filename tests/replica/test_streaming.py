"""stream=true on the model side: the thread bridge and the deployment's edit_stream."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from serve_app.common.errors import InvalidRequestError
from serve_app.common.jobs import EditJob, EditOutput, PartialImage
from serve_app.common.metrics import NullMetrics
from serve_app.engine import EditStopped
from serve_app.pipeline.running.previews import preview_steps
from serve_app.replica.bridge import iterate_in_thread
from serve_app.replica.deployment import ImageEditModel
from tests.fakes import FAKE_INFO, fake_edit
from tests.fixtures import cancel_after
from tests.replica.test_deployment import CONFIG, job

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
                    image = np.full((job.height, job.width, 3), step, np.uint8)
                    on_partial(PartialImage(index=schedule.index(step), image=image))
            return fake_edit(job)
        finally:
            self.finished.set()


def test_edit_stream_yields_previews_then_the_output() -> None:
    model = ImageEditModel(
        CONFIG, engine_factory=lambda m, g: PreviewRunner(), metrics=NullMetrics()
    )

    async def main() -> list[Any]:
        return [e async for e in model.edit_stream(job(num_inference_steps=10, partial_images=3))]

    events = asyncio.run(main())
    assert [type(e).__name__ for e in events] == ["PartialImage"] * 3 + ["EditOutput"]
    assert [e.index for e in events[:3]] == [0, 1, 2]
    assert [int(e.image[0, 0, 0]) for e in events[:3]] == [1, 4, 7]  # steps of the schedule


def test_closing_edit_stream_stops_the_pipeline() -> None:
    runner = PreviewRunner(step_s=0.02)
    model = ImageEditModel(CONFIG, engine_factory=lambda m, g: runner, metrics=NullMetrics())

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
    model = ImageEditModel(CONFIG, engine_factory=lambda m, g: runner, metrics=NullMetrics())

    async def consume() -> None:
        async for _ in model.edit_stream(job(num_inference_steps=200, partial_images=1)):
            pass

    cancel_after(consume(), 0.1)
    assert runner.finished.wait(5)
    assert runner.steps_done < 200
