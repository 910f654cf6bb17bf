"""Our Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports them (prefixed `ray_`) next to Serve's own metrics on each node's metrics port.
Both deployments take a `Metrics` object; unit tests pass `NullMetrics`.
"""

from __future__ import annotations

from typing import Protocol

# Seconds; edits span ~0.1 s (tiny model) to minutes (50 steps at 2 MP).
_LATENCY_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600]
_STEP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2, 5]
_COUNT_BUCKETS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]


class IngressMetrics(Protocol):
    def request_done(self, *, route: str, status: int, seconds: float) -> None: ...
    def images_returned(self, count: int) -> None: ...


class ModelMetrics(Protocol):
    def run_done(self, *, outcome: str, seconds: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...
    def step(self, seconds: float) -> None: ...
    def gpu_memory(self, *, gpu: str, allocated: int, peak: int) -> None: ...


class NullMetrics:
    def request_done(self, *, route: str, status: int, seconds: float) -> None:
        pass

    def images_returned(self, count: int) -> None:
        pass

    def run_done(self, *, outcome: str, seconds: float) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def step(self, seconds: float) -> None:
        pass

    def gpu_memory(self, *, gpu: str, allocated: int, peak: int) -> None:
        pass


class RayIngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "qwen_edit_requests_total",
            description="HTTP requests answered by the ingress, by route and status code.",
            tag_keys=("route", "status"),  # type: ignore[arg-type]  # Ray's hint is tuple[str]
        )
        self._latency = metrics.Histogram(
            "qwen_edit_request_latency_seconds",
            description="End-to-end request latency inside the ingress, by route and status.",
            boundaries=_LATENCY_BUCKETS,
            tag_keys=("route", "status"),  # type: ignore[arg-type]  # Ray's hint is tuple[str]
        )
        self._images = metrics.Histogram(
            "qwen_edit_images_per_request",
            description="Images returned per successful edit request (n).",
            boundaries=_COUNT_BUCKETS,
        )

    def request_done(self, *, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self._requests.inc(tags=tags)
        self._latency.observe(seconds, tags=tags)

    def images_returned(self, count: int) -> None:
        self._images.observe(count)


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
            boundaries=_LATENCY_BUCKETS,
            tag_keys=("outcome",),
        )
        self._queue = metrics.Histogram(
            "qwen_edit_queue_wait_seconds",
            description="Time from the ingress forwarding an edit to the pipeline starting it.",
            boundaries=_LATENCY_BUCKETS,
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
