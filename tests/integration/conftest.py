"""The real Ray Serve app (both deployments, real HTTP proxy) with the embedded tiny model."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fixtures import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEST_ARGS: dict[str, Any] = {
    "model": {"source": "tiny", "device_map": "cpu", "aliases": ["qwen-image-edit-2509"]},
    "generation": {"default_steps": 2, "max_steps": 8, "auto_size_pixels": 96 * 96},
    "limits": {"max_n": 3, "min_output_side": 32, "max_output_side": 256,
               "max_upload_bytes": 2 * 1024 * 1024},
    "ready_timeout_s": 0.5,
}  # fmt: skip


APP_NAME = "qwen-image-edit"


@dataclass
class Server:
    url: str
    metrics_url: str = ""
    # (status, error code or None) of every /ready answer seen while the app came up.
    ready_history: list[tuple[int, str | None]] = field(default_factory=list)


def _get(url: str) -> tuple[int, dict[str, Any] | None]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, None  # the proxy's own answer before our route exists
    except (urllib.error.URLError, OSError):
        return 0, None


def start_server(
    *,
    args: dict[str, Any],
    deployments: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start Ray and deploy the app from a config, as `serve run`/`serve deploy` do."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port, metrics_port = free_port(), free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env or {}},
        _metrics_export_port=metrics_port,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve_app.app:build_app",
                "args": args,
                "deployments": deployments or [],
            }
        ]
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    srv = Server(
        url=f"http://127.0.0.1:{port}", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, body = _get(f"{srv.url}/ready")
        if body is not None:
            srv.ready_history.append((status, (body.get("error") or {}).get("code")))
        if status == 200:
            return srv
        app_status = serve.status().applications.get(APP_NAME)
        if app_status is not None and app_status.status == "DEPLOY_FAILED":
            stop_server()
            pytest.fail(f"app failed to deploy: {app_status.message[-2000:]}")
        time.sleep(0.2)
    stop_server()
    pytest.fail(f"app not ready in 300 s; last /ready answers: {srv.ready_history[-3:]}")


def stop_server() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A fresh folder: the model replica builds the tiny model while the ingress is up,
    # which makes the "not ready yet" window observable.
    args = json.loads(json.dumps(TEST_ARGS))
    args["model"]["path"] = str(tmp_path_factory.mktemp("tiny") / "model")
    srv = start_server(args=args)
    try:
        yield srv
    finally:
        stop_server()
