"""The ingress' Prometheus metrics, recorded through Ray Serve's metrics API (what they are:
`common/metrics.py`'s `IngressMetrics`)."""

from __future__ import annotations

from serve_app.common.metrics import LATENCY_BUCKETS_S

_COUNT_BUCKETS = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]


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
            boundaries=LATENCY_BUCKETS_S,
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
