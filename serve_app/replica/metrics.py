"""The model replica's Prometheus metrics, recorded through Ray Serve's metrics API (what they
are: `common/metrics.py`'s `ModelMetrics`)."""

from __future__ import annotations

from serve_app.common.metrics import LATENCY_BUCKETS_S

# Seconds per denoising step (both CFG passes).
_STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2, 5]


class RayModelMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self._runs = metrics.Counter(
            "qwen_edit_runs_total",
            description="Pipeline runs by outcome: ok, cancelled, timeout, oom, error.",
            tag_keys=("outcome",),
        )
        self._run_seconds = metrics.Histogram(
            "qwen_edit_pipeline_seconds",
            description="Time in the pipeline per edit request (all n images).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("outcome",),
        )
        self._queue = metrics.Histogram(
            "qwen_edit_queue_wait_seconds",
            description="Time from the ingress forwarding an edit to the pipeline starting it.",
            boundaries=LATENCY_BUCKETS_S,
        )
        self._step = metrics.Histogram(
            "qwen_edit_denoise_step_seconds",
            description="Wall time of one denoising step (both CFG passes).",
            boundaries=_STEP_BUCKETS,
        )
        self._gpu = metrics.Gauge(
            "qwen_edit_gpu_memory_bytes",
            description="torch CUDA memory per visible GPU: allocated now and peak.",
            tag_keys=("gpu", "kind"),  # type: ignore[arg-type]  # Ray's hint is tuple[str]
        )

    def run_done(self, *, outcome: str, seconds: float) -> None:
        self._runs.inc(tags={"outcome": outcome})
        self._run_seconds.observe(seconds, tags={"outcome": outcome})

    def queue_wait(self, seconds: float) -> None:
        self._queue.observe(max(0.0, seconds))

    def step(self, seconds: float) -> None:
        self._step.observe(seconds)

    def gpu_memory(self, *, gpu: str, allocated: int, peak: int) -> None:
        self._gpu.set(allocated, tags={"gpu": gpu, "kind": "allocated"})
        self._gpu.set(peak, tags={"gpu": gpu, "kind": "peak"})
