"""The model deployment class with an injected fake runner (no pipeline, no Ray)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

import numpy as np
import pytest

from serve_app.common.config import AppConfig
from serve_app.common.errors import InternalError, ServiceUnavailableError, TimeoutError_
from serve_app.common.jobs import EditJob, EditOutput
from serve_app.common.metrics import NullMetrics
from serve_app.engine import EditStopped, EngineBroken, EngineOutOfMemory
from serve_app.replica.deployment import ImageEditModel
from tests.fakes import FAKE_INFO
from tests.fixtures import TRUE_CFG, cancel_after, make_job

CONFIG = AppConfig.model_validate({"model": {"source": "tiny"}})


# 50 steps of 16x16 from one 8x8 black reference.
job = functools.partial(
    make_job, request_id="r1", images=[np.zeros((8, 8, 3), np.uint8)], prompt="p",
    num_inference_steps=50, width=16, height=16, seeds=[1], **TRUE_CFG,
)  # fmt: skip


class StepRunner:
    """Runs `steps` fake denoising steps, asking should_stop after each like the pipeline does."""

    info = FAKE_INFO

    def __init__(self, step_s: float = 0.01, fail: Exception | None = None) -> None:
        self.step_s = step_s
        self.fail = fail
        self.steps_done = 0
        self.finished = threading.Event()

    def memory_report(self) -> list[tuple[str, int, int]]:
        return [("0", 1, 2)]

    def check_health(self) -> None:
        if self.fail is not None and "health" in str(self.fail):
            raise RuntimeError("engine unhealthy")

    def run(self, job: EditJob, *, step_hook: Any = None, on_partial: Any = None) -> EditOutput:
        try:
            if self.fail:
                raise self.fail
            for _ in range(job.num_inference_steps):
                time.sleep(self.step_s)
                self.steps_done += 1
                reason = step_hook(self.steps_done, job.num_inference_steps) if step_hook else None
                if reason:
                    raise EditStopped(reason)
            img = np.zeros((job.height, job.width, 3), np.uint8)
            return EditOutput(images=[img] * job.n, width=job.width, height=job.height)
        finally:
            self.finished.set()


def make(runner: StepRunner) -> ImageEditModel:
    return ImageEditModel(CONFIG, engine_factory=lambda m, g: runner, metrics=NullMetrics())


def test_edit_runs_off_the_event_loop_and_returns_output() -> None:
    runner = StepRunner()
    model = make(runner)
    out = asyncio.run(model.edit(job(num_inference_steps=3)))
    assert out.width == 16 and runner.steps_done == 3
    assert model.info() is FAKE_INFO


def test_memory_answers_the_engines_allocator_figures() -> None:
    """What bench.run reads as one replica's allocator peak per GPU."""
    assert make(StepRunner()).memory() == [("0", 1, 2)]


def test_deadline_stops_denoising_and_raises_504() -> None:
    runner = StepRunner(step_s=0.02)
    with pytest.raises(TimeoutError_):
        asyncio.run(make(runner).edit(job(deadline=time.time() + 0.1)))
    assert runner.steps_done < 50


def test_cancellation_stops_the_worker_thread() -> None:
    runner = StepRunner(step_s=0.02)
    model = make(runner)

    cancel_after(model.edit(job()), 0.1)
    assert runner.finished.wait(5)
    assert runner.steps_done < 50


def test_pipeline_failure_is_a_500_without_details() -> None:
    model = make(StepRunner(fail=RuntimeError("CUDA secret")))
    with pytest.raises(InternalError) as info:
        asyncio.run(model.edit(job()))
    assert "secret" not in info.value.message


def test_oom_answers_a_clear_error_and_the_replica_keeps_serving() -> None:
    runner = StepRunner(fail=EngineOutOfMemory("at 4096x4096"))
    model = make(runner)
    with pytest.raises(InternalError) as info:
        asyncio.run(model.edit(job()))
    assert info.value.code == "gpu_out_of_memory" and "smaller size" in info.value.message
    model.check_health()  # still healthy
    runner.fail = None
    assert asyncio.run(model.edit(job(num_inference_steps=2))).width == 16
    assert model.stats()["oom"] == 1 and model.stats()["ok"] == 1


def test_device_error_marks_the_replica_unhealthy() -> None:
    model = make(StepRunner(fail=EngineBroken("CUDA error: an illegal memory access")))
    with pytest.raises(ServiceUnavailableError) as info:
        asyncio.run(model.edit(job()))
    assert info.value.retry_after_s is not None
    with pytest.raises(RuntimeError, match="broken"):
        model.check_health()
    with pytest.raises(ServiceUnavailableError):  # refuses work until replaced
        asyncio.run(model.edit(job()))


def test_check_health_asks_the_engine() -> None:
    """A parallel engine whose rank died says so through check_health; the replica fails it."""
    model = ImageEditModel(
        CONFIG,
        engine_factory=lambda m, g: StepRunner(fail=RuntimeError("health")),
        metrics=NullMetrics(),
    )
    with pytest.raises(RuntimeError, match="engine unhealthy"):
        model.check_health()
    ImageEditModel(
        CONFIG, engine_factory=lambda m, g: StepRunner(), metrics=NullMetrics()
    ).check_health()


def test_check_health_notices_a_wedged_pipeline() -> None:
    cfg = AppConfig.model_validate({"model": {"source": "tiny"}, "wedged_after_s": 0.2})
    runner = StepRunner(step_s=1.0)  # one step takes longer than the wedge threshold
    model = ImageEditModel(cfg, engine_factory=lambda m, g: runner, metrics=NullMetrics())

    async def main() -> None:
        task = asyncio.create_task(model.edit(job(num_inference_steps=2)))
        await asyncio.sleep(0.5)
        with pytest.raises(RuntimeError, match="no progress"):
            model.check_health()
        assert model.stats()["active"] == 1
        await task

    asyncio.run(main())
    model.check_health()
    assert model.stats() == {"ok": 1, "active": 0}


def test_output_carries_queue_and_replica_times_for_server_timing() -> None:
    runner = StepRunner(step_s=0.01)
    inner = runner.run

    def run_with_pipeline_time(
        job: EditJob, *, step_hook: Any = None, on_partial: Any = None
    ) -> EditOutput:
        out = inner(job, step_hook=step_hook)
        return EditOutput(out.images, out.width, out.height, timings_s={"pipeline": 0.03})

    runner.run = run_with_pipeline_time  # type: ignore[method-assign]
    out = asyncio.run(make(runner).edit(job(num_inference_steps=3, submitted_at=time.time() - 0.5)))
    assert list(out.timings_s) == ["queue", "pipeline", "replica"]
    assert 0.5 <= out.timings_s["queue"] < 5
    assert out.timings_s["replica"] >= 0.03  # three 10 ms steps
    # A submit time from a clock ahead of this one never makes a negative queue wait.
    out = asyncio.run(
        make(StepRunner()).edit(job(num_inference_steps=1, submitted_at=time.time() + 60))
    )
    assert out.timings_s["queue"] == 0.0 and "pipeline" not in out.timings_s
