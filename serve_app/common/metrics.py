"""What our Prometheus metrics record: each deployment's metrics interface, and a no-op one.

Both deployments take a metrics object; unit tests pass `NullMetrics`. Served, they record through
Ray Serve's metrics API (`ingress/metrics.py`, `replica/metrics.py`), and Ray exports them
(prefixed `ray_`) next to Serve's own metrics on each node's metrics port.
"""

from __future__ import annotations

from typing import Protocol

# Seconds, for a request's and an edit's latency histograms (both deployments): edits span a
# fraction of a second (the tiny model) to minutes (50 steps at 2 MP).
LATENCY_BUCKETS_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600]


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
