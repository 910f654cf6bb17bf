"""The step hook of one edit: progress, step metrics, and whether to stop.

Shared between the event loop (which cancels, and which `check_health` reads the progress time
from) and the worker thread that runs the engine and calls `on_step` after every step.
"""

from __future__ import annotations

import logging
import threading
import time

from serve_app.common.jobs import EditJob
from serve_app.common.metrics import ModelMetrics

logger = logging.getLogger("ray.serve")


class EditWatch:
    def __init__(self, job: EditJob, metrics: ModelMetrics) -> None:
        self.job = job
        self.cancelled = threading.Event()
        self.last_progress = time.monotonic()
        self._metrics = metrics
        self._log_every = max(1, job.num_inference_steps // 10)
        self._started = time.monotonic()

    def on_step(self, done: int, total: int) -> str | None:
        """The engine's step hook: a reason to stop ("cancelled", "deadline"), or None."""
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
