"""The model deployment: one pipeline per replica, edits run off the event loop.

Each edit runs in a worker thread; the pipeline's step callback asks `_EditWatch` whether
to go on, so a cancelled request (client gone) or a passed deadline stops denoising at
the next step, and `check_health` can tell a wedged pipeline from a slow one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from serve_app.config import AppConfig, GenerationConfig, ModelConfig
from serve_app.errors import (
    APIError,
    InternalError,
    RequestCancelledError,
    ServiceUnavailableError,
    TimeoutError_,
)
from serve_app.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.metrics import ModelMetrics
from serve_app.streaming import iterate_in_thread

logger = logging.getLogger("ray.serve")

StepHook = Callable[[int, int], str | None]


class Runner(Protocol):
    info: ModelInfo

    def run(self, job: EditJob, *, step_hook: StepHook | None = None) -> EditOutput: ...

    def memory_report(self) -> list[tuple[str, int, int]]: ...


RunnerFactory = Callable[[ModelConfig, GenerationConfig], Runner]


def _default_runner_factory(model: ModelConfig, generation: GenerationConfig) -> Runner:
    from serve_app.pipeline.runner import load_runner

    return load_runner(model, generation)


def _default_metrics() -> ModelMetrics:
    from serve_app.metrics import RayModelMetrics

    return RayModelMetrics()


class _EditWatch:
    """Per-edit state shared between the event loop and the worker thread."""

    def __init__(self, job: EditJob, metrics: ModelMetrics) -> None:
        self.job = job
        self.cancelled = threading.Event()
        self.last_progress = time.monotonic()
        self._metrics = metrics
        self._log_every = max(1, job.num_inference_steps // 10)
        self._started = time.monotonic()

    def on_step(self, done: int, total: int) -> str | None:
        now = time.monotonic()
        if done > 1:  # the first interval also holds prompt encoding
            self._metrics.step(now - self.last_progress)
        self.last_progress = now
        if done % self._log_every == 0 or done == total:
            logger.info(
                "edit %s: step %d/%d (%.1f s)",
                self.job.request_id,
                done,
                total,
                now - self._started,
            )
        if self.cancelled.is_set():
            return "cancelled"
        if self.job.deadline is not None and time.time() > self.job.deadline:
            return "deadline"
        return None


def _with_replica_timings(
    output: EditOutput, queue_s: float | None, replica_s: float
) -> EditOutput:
    """`output` with the replica's stages for the ingress's Server-Timing header: queue (ingress
    hand-off to this replica) and replica (its wall time for the call, the pipeline included)."""
    timings = {} if queue_s is None else {"queue": queue_s}
    timings.update(output.timings_s)
    timings["replica"] = replica_s
    return dataclasses.replace(output, timings_s=timings)


def _outcome_of(err: APIError) -> str:
    if err.code == "gpu_out_of_memory":
        return "oom"
    return {504: "timeout", 499: "cancelled"}.get(err.status_code, "error")


class ImageEditModel:
    """Holds one loaded pipeline; `edit` is called through a DeploymentHandle."""

    def __init__(
        self,
        config: AppConfig | Mapping[str, Any],
        *,
        runner_factory: RunnerFactory | None = None,
        metrics: ModelMetrics | None = None,
    ) -> None:
        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        self._config = cfg
        self._metrics = metrics if metrics is not None else _default_metrics()
        self._runner = (runner_factory or _default_runner_factory)(cfg.model, cfg.generation)
        self._active: dict[str, _EditWatch] = {}
        self._outcomes: Counter[str] = Counter()
        self._broken: str | None = None

    def info(self) -> ModelInfo:
        return self._runner.info

    def stats(self) -> dict[str, int]:
        """Outcome counts since start (ok, cancelled, timeout, oom, error) and edits in flight."""
        return {**self._outcomes, "active": len(self._active)}

    async def edit(self, job: EditJob) -> EditOutput:
        t0 = time.perf_counter()
        self._refuse_if_broken()
        queue_s = None
        if job.submitted_at is not None:
            # Wall clocks of two processes (maybe two hosts): never below zero.
            queue_s = max(0.0, time.time() - job.submitted_at)
            self._metrics.queue_wait(queue_s)
        watch = _EditWatch(job, self._metrics)
        self._active[job.request_id] = watch
        outcome = "error"
        try:
            output = await asyncio.to_thread(self._run, watch)
            outcome = "ok"
            return _with_replica_timings(output, queue_s, time.perf_counter() - t0)
        except asyncio.CancelledError:
            # The caller went away: make the worker thread stop at the next step.
            watch.cancelled.set()
            outcome = "cancelled"
            logger.info("edit %s cancelled by the caller", job.request_id)
            raise
        except APIError as err:
            outcome = _outcome_of(err)
            raise
        finally:
            self._finish(job, outcome, time.perf_counter() - t0)

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            raise ServiceUnavailableError(
                "This model replica is being replaced; retry the request.",
                code="replica_unavailable",
                retry_after_s=self._config.retry_after_s,
            )

    def _finish(self, job: EditJob, outcome: str, seconds: float) -> None:
        self._outcomes[outcome] += 1
        self._metrics.run_done(outcome=outcome, seconds=seconds)
        self._report_memory()
        logger.info(
            "edit %s %s in %.2f s (%d image(s), %d steps)",
            job.request_id, outcome, seconds, job.n, job.num_inference_steps,
        )  # fmt: skip

    async def edit_stream(self, job: EditJob) -> AsyncIterator[PartialImage | EditOutput]:
        """Streaming edit (`handle.options(stream=True).edit_stream`): PartialImages while
        denoising, then the EditOutput. Closing the stream stops the pipeline."""
        self._refuse_if_broken()
        watch = _EditWatch(job, self._metrics)
        self._active[job.request_id] = watch

        def work(emit: Callable[[Any], None]) -> EditOutput:
            def on_partial(index: int, image: Any) -> None:
                emit(PartialImage(index=index, image=image))

            return self._run(watch, on_partial=on_partial)

        t0 = time.perf_counter()
        outcome = "cancelled"  # unless the stream runs to its end or fails
        try:
            async for event in iterate_in_thread(work, on_close=watch.cancelled.set):
                yield event
            outcome = "ok"
        except APIError as err:
            outcome = _outcome_of(err)
            raise
        finally:
            self._finish(job, outcome, time.perf_counter() - t0)

    def _run(
        self, watch: _EditWatch, *, on_partial: Callable[[int, Any], None] | None = None
    ) -> EditOutput:
        from serve_app.pipeline.runner import EditStopped, PipelineBroken, PipelineOutOfMemory

        job = watch.job
        # Only streaming passes on_partial, so runners without previews keep working.
        extra: dict[str, Any] = {} if on_partial is None else {"on_partial": on_partial}
        try:
            return self._runner.run(job, step_hook=watch.on_step, **extra)
        except EditStopped as stop:
            if stop.reason == "deadline":
                raise TimeoutError_(
                    f"The edit did not finish within {self._config.request_timeout_s:.0f} s.",
                ) from None
            raise RequestCancelledError("The request was cancelled.") from None
        except PipelineOutOfMemory as exc:
            logger.warning("edit %s: %s; cache freed, replica keeps serving", job.request_id, exc)
            raise InternalError(
                "The GPU ran out of memory for this edit; retry with a smaller size, fewer"
                " input images or a smaller n.",
                code="gpu_out_of_memory",
            ) from None
        except PipelineBroken as exc:
            self._broken = str(exc)
            logger.error("edit %s: unrecoverable device error: %s", job.request_id, exc)
            raise ServiceUnavailableError(
                "The model replica hit a device error and is being replaced; retry the request.",
                code="replica_unavailable",
                retry_after_s=self._config.retry_after_s,
            ) from None
        except APIError:
            raise
        except Exception:
            logger.exception("edit %s failed", job.request_id)
            raise InternalError(
                "The model failed to process the request.", code="model_error"
            ) from None
        finally:
            self._active.pop(job.request_id, None)

    def _report_memory(self) -> None:
        try:
            for gpu, allocated, peak in self._runner.memory_report():
                self._metrics.gpu_memory(gpu=gpu, allocated=allocated, peak=peak)
        except Exception:  # metrics must never fail an edit
            logger.debug("memory report failed", exc_info=True)

    def check_health(self) -> None:
        """Serve calls this periodically; 3 failures in a row replace the replica."""
        if self._broken is not None:
            raise RuntimeError(f"pipeline broken: {self._broken}")
        now = time.monotonic()
        for request_id, watch in list(self._active.items()):
            stalled = now - watch.last_progress
            if stalled > self._config.wedged_after_s:
                raise RuntimeError(f"edit {request_id} made no progress for {stalled:.0f} s")
