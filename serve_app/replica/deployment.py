"""The model deployment: one engine per replica, edits run off the event loop.

Each edit runs in a worker thread; the engine's step hook (`EditWatch`) says whether to go on, so
a cancelled request (client gone) or a passed deadline stops denoising at the next step, and
`check_health` can tell a wedged engine from a slow one. What the engine reports (stopped, out of
memory, broken) becomes the API error the client gets here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

from serve_app.common.config import AppConfig
from serve_app.common.errors import (
    APIError,
    InternalError,
    RequestCancelledError,
    ServiceUnavailableError,
    TimeoutError_,
)
from serve_app.common.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.common.malloc import keep_large_buffers
from serve_app.common.metrics import ModelMetrics
from serve_app.engine import (
    EditStopped,
    EngineBroken,
    EngineFactory,
    EngineOutOfMemory,
    PartialSink,
)
from serve_app.replica.bridge import iterate_in_thread
from serve_app.replica.watch import EditWatch

logger = logging.getLogger("ray.serve")


def _default_metrics() -> ModelMetrics:
    from serve_app.replica.metrics import RayModelMetrics

    return RayModelMetrics()


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
    """Holds one engine; `edit` / `edit_stream` are called through a DeploymentHandle."""

    def __init__(
        self,
        config: AppConfig | Mapping[str, Any],
        *,
        engine_factory: EngineFactory,
        metrics: ModelMetrics | None = None,
    ) -> None:
        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        keep_large_buffers()  # every edit's output arrays reuse faulted-in pages
        self._config = cfg
        self._metrics = metrics if metrics is not None else _default_metrics()
        self._engine = engine_factory(cfg.model, cfg.generation)
        self._active: dict[str, EditWatch] = {}
        self._outcomes: Counter[str] = Counter()
        self._broken: str | None = None

    def info(self) -> ModelInfo:
        return self._engine.info

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
        watch = self._watch(job)
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

    async def edit_stream(self, job: EditJob) -> AsyncIterator[PartialImage | EditOutput]:
        """Streaming edit (`handle.options(stream=True).edit_stream`): PartialImages while
        denoising, then the EditOutput. Closing the stream stops the engine."""
        self._refuse_if_broken()
        watch = self._watch(job)
        t0 = time.perf_counter()
        outcome = "cancelled"  # unless the stream runs to its end or fails

        def work(emit: PartialSink) -> EditOutput:
            return self._run(watch, emit)

        try:
            async for event in iterate_in_thread(work, on_close=watch.cancelled.set):
                yield event
            outcome = "ok"
        except APIError as err:
            outcome = _outcome_of(err)
            raise
        finally:
            self._finish(job, outcome, time.perf_counter() - t0)

    def _watch(self, job: EditJob) -> EditWatch:
        watch = EditWatch(job, self._metrics)
        self._active[job.request_id] = watch
        return watch

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

    def _run(self, watch: EditWatch, on_partial: PartialSink | None = None) -> EditOutput:
        """The engine call, on the worker thread; what it reports becomes an APIError."""
        job = watch.job
        try:
            return self._engine.run(job, step_hook=watch.on_step, on_partial=on_partial)
        except EditStopped as stop:
            if stop.reason == "deadline":
                raise TimeoutError_(
                    f"The edit did not finish within {self._config.request_timeout_s:.0f} s.",
                ) from None
            raise RequestCancelledError("The request was cancelled.") from None
        except EngineOutOfMemory as exc:
            logger.warning("edit %s: %s; cache freed, replica keeps serving", job.request_id, exc)
            raise InternalError(
                "The GPU ran out of memory for this edit; retry with a smaller size, fewer"
                " input images or a smaller n.",
                code="gpu_out_of_memory",
            ) from None
        except EngineBroken as exc:
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

    def memory(self) -> list[tuple[str, int, int]]:
        """(gpu, allocated bytes, allocator peak bytes) per GPU of this replica (benchmarks)."""
        return [(str(g), int(a), int(p)) for g, a, p in self._engine.memory_report()]

    def _report_memory(self) -> None:
        try:
            for gpu, allocated, peak in self._engine.memory_report():
                self._metrics.gpu_memory(gpu=gpu, allocated=allocated, peak=peak)
        except Exception:  # metrics must never fail an edit
            logger.debug("memory report failed", exc_info=True)

    def check_health(self) -> None:
        """Serve calls this periodically; 3 failures in a row replace the replica."""
        if self._broken is not None:
            raise RuntimeError(f"engine broken: {self._broken}")
        self._engine.check_health()
        now = time.monotonic()
        for request_id, watch in list(self._active.items()):
            stalled = now - watch.last_progress
            if stalled > self._config.wedged_after_s:
                raise RuntimeError(f"edit {request_id} made no progress for {stalled:.0f} s")
