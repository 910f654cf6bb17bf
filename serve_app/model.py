"""The model deployment: one pipeline per replica, edits run off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from serve_app.config import AppConfig, GenerationConfig, ModelConfig
from serve_app.errors import APIError, InternalError, RequestCancelledError, TimeoutError_
from serve_app.jobs import EditJob, EditOutput, ModelInfo, PartialImage
from serve_app.streaming import iterate_in_thread, stop_check

logger = logging.getLogger("ray.serve")


class Runner(Protocol):
    info: ModelInfo

    def run(
        self, job: EditJob, *, should_stop: Callable[[], str | None] | None = None
    ) -> EditOutput: ...


RunnerFactory = Callable[[ModelConfig, GenerationConfig], Runner]


def _default_runner_factory(model: ModelConfig, generation: GenerationConfig) -> Runner:
    from serve_app.pipeline.runner import load_runner

    return load_runner(model, generation)


class ImageEditModel:
    """Holds one loaded pipeline; `edit` is called through a DeploymentHandle."""

    def __init__(
        self,
        config: AppConfig | Mapping[str, Any],
        *,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        self._config = cfg
        factory = runner_factory or _default_runner_factory
        self._runner = factory(cfg.model, cfg.generation)

    def info(self) -> ModelInfo:
        return self._runner.info

    async def edit(self, job: EditJob) -> EditOutput:
        cancelled = threading.Event()

        def should_stop() -> str | None:
            if cancelled.is_set():
                return "cancelled"
            if job.deadline is not None and time.time() > job.deadline:
                return "deadline"
            return None

        t0 = time.perf_counter()
        try:
            output = await asyncio.to_thread(self._run, job, should_stop)
        except asyncio.CancelledError:
            # The caller went away: make the worker thread stop at the next step.
            cancelled.set()
            logger.info("edit %s cancelled by the caller", job.request_id)
            raise
        logger.info(
            "edit %s done in %.2f s (%d image(s), %d steps)",
            job.request_id, time.perf_counter() - t0, job.n, job.num_inference_steps,
        )  # fmt: skip
        return output

    async def edit_stream(self, job: EditJob) -> AsyncIterator[PartialImage | EditOutput]:
        """Streaming edit (`handle.options(stream=True).edit_stream`): PartialImages while
        denoising, then the EditOutput. Closing the stream stops the pipeline."""
        cancelled = threading.Event()
        should_stop = stop_check(job, cancelled)

        def work(emit: Callable[[Any], None]) -> EditOutput:
            def on_partial(index: int, image: Any) -> None:
                emit(PartialImage(index=index, image=image))

            return self._run(job, should_stop, on_partial=on_partial)

        async for event in iterate_in_thread(work, on_close=cancelled.set):
            yield event
        logger.info("stream %s done (%d preview(s) asked)", job.request_id, job.partial_images)

    def _run(
        self,
        job: EditJob,
        should_stop: Callable[[], str | None],
        *,
        on_partial: Callable[[int, Any], None] | None = None,
    ) -> EditOutput:
        from serve_app.pipeline.runner import EditStopped

        # Only streaming passes on_partial, so runners without previews keep working.
        extra: dict[str, Any] = {} if on_partial is None else {"on_partial": on_partial}
        try:
            return self._runner.run(job, should_stop=should_stop, **extra)
        except EditStopped as stop:
            if stop.reason == "deadline":
                raise TimeoutError_(
                    "The edit did not finish within the request deadline.", code="timeout"
                ) from None
            raise RequestCancelledError("The request was cancelled.") from None
        except APIError:
            raise
        except Exception as exc:
            logger.exception("edit %s failed", job.request_id)
            raise InternalError(
                "The model failed to process the request.", code="model_error"
            ) from exc

    def check_health(self) -> None:
        # Raises if the runner was never built; Serve restarts the replica after 3 failures.
        if self._runner is None:
            raise RuntimeError("no pipeline loaded")
