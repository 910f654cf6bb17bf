"""The builder's deployment defaults (serve_app/app.py)."""

from __future__ import annotations

from serve_app.app import INGRESS_DRAIN_MARGIN_S, ingress_deployment_options
from serve_app.common.config import load_config


def test_a_draining_ingress_replica_outlasts_every_request_it_holds() -> None:
    # A replica replaced by a rolling update keeps answering until each request has its
    # answer, which request_timeout_s bounds (tests/integration/test_cluster.py runs it).
    config = load_config({"model": {"source": "tiny"}, "request_timeout_s": 45}, environ={})
    options = ingress_deployment_options(config)
    assert options["graceful_shutdown_timeout_s"] == 45 + INGRESS_DRAIN_MARGIN_S
    assert options["ray_actor_options"]["num_gpus"] == 0
