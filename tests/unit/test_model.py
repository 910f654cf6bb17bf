"""The model deployment class with an injected fake runner (no pipeline, no Ray)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from serve_app.config import AppConfig
from serve_app.errors import InternalError, TimeoutError_
from serve_app.jobs import EditJob, EditOutput
from serve_app.model import ImageEditModel
from serve_app.pipeline.runner import EditStopped
from tests.unit.fakes import FAKE_INFO

CONFIG = AppConfig.model_validate({"model": {"source": "tiny"}})


def job(**kw: Any) -> EditJob:
    base = dict(
        request_id="r1",
        model="qwen-image-edit",
        images=[np.zeros((8, 8, 3), np.uint8)],
        prompt="p",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=50,
        width=16,
        height=16,
        seeds=[1],
    )
    base.update(kw)
    return EditJob(**base)


class StepRunner:
    """Runs `steps` fake denoising steps, asking should_stop after each like the pipeline does."""

    info = FAKE_INFO

    def __init__(self, step_s: float = 0.01, fail: Exception | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.steps_done = 0
        self.finished = threading.Event()

    def run(self, job: EditJob, *, should_stop: Any = None) -> EditOutput:
        try:
            if self.fail:
                raise self.fail
            for _ in range(job.num_inference_steps):
                time.sleep(self.step_s)
                self.steps_done += 1
                reason = should_stop() if should_stop else None
                if reason:
                    raise EditStopped(reason)
            img = np.zeros((job.height, job.width, 3), np.uint8)
            return EditOutput(images=[img] * job.n, width=job.width, height=job.height)
        finally:
            self.finished.set()


def make(runner: StepRunner) -> ImageEditModel:
    return ImageEditModel(CONFIG, runner_factory=lambda m, g: runner)


def test_edit_runs_off_the_event_loop_and_returns_output() -> None:
    runner = StepRunner()
    model = make(runner)
    out = asyncio.run(model.edit(job(num_inference_steps=3)))
    assert out.width == 16 and runner.steps_done == 3
    assert model.info() is FAKE_INFO


def test_deadline_stops_denoising_and_raises_504() -> None:
    runner = StepRunner(step_s=0.02)
    with pytest.raises(TimeoutError_):
        asyncio.run(make(runner).edit(job(deadline=time.time() + 0.1)))
    assert runner.steps_done < 50


def test_cancellation_stops_the_worker_thread() -> None:
    runner = StepRunner(step_s=0.02)
    model = make(runner)

    async def main() -> None:
        task = asyncio.create_task(model.edit(job()))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert runner.finished.wait(5)
    assert runner.steps_done < 50


def test_pipeline_failure_is_a_500_without_details() -> None:
    model = make(StepRunner(fail=RuntimeError("CUDA secret")))
    with pytest.raises(InternalError) as info:
        asyncio.run(model.edit(job()))
    assert "secret" not in info.value.message
