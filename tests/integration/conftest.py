"""The real Ray Serve app (both deployments, real HTTP proxy) with the embedded tiny model.

One Ray cluster with Serve serves the whole session (`serve_cluster`): starting Ray costs tens of
seconds on two cores, so each test module deploys its own application on it, under its own name
and route prefix, as a Serve config would (`deploy_app`), and deletes it when done
(`remove_app`). Applications are deployed declaratively, all of them in one config, so adding one
never restarts another.
"""

from __future__ import annotations

import copy
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serve_app.common.links import PROXY_ENV
from tests.fixtures import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# As the launcher and the container image set it for every process of a cluster.
os.environ.update(PROXY_ENV)

TEST_ARGS: dict[str, Any] = {
    "model": {"source": "tiny", "device_map": "cpu", "aliases": ["qwen-image-edit-2509"]},
    "generation": {"default_steps": 2, "max_steps": 8, "auto_size_pixels": 96 * 96},
    "limits": {"max_n": 3, "min_output_side": 32, "max_output_side": 256,
               "max_upload_bytes": 2 * 1024 * 1024},
    "ready_timeout_s": 0.5,
}  # fmt: skip

MODEL = "QwenImageEditModel"
INGRESS = "OpenAIIngress"


@dataclass
class Cluster:
    """The session's Ray cluster: Serve's HTTP proxy and Ray's metrics endpoint."""

    http_url: str
    metrics_url: str
    # name -> the application's config entry, for every application deployed now.
    apps: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Server:
    url: str  # the application's base URL (the proxy plus its route prefix)
    app: str = ""
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


@pytest.fixture(scope="session")
def serve_cluster() -> Iterator[Cluster]:
    import ray
    from ray import serve

    port, metrics_port = free_port(), free_port()
    # Logical CPUs: room for the replicas of every module's application (a few at a time).
    ray.init(
        num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield Cluster(
            http_url=f"http://127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def _apply(cluster: Cluster) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = {"applications": list(cluster.apps.values())}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))


def deploy_app(
    cluster: Cluster,
    name: str,
    *,
    args: dict[str, Any],
    deployments: list[dict[str, Any]] | None = None,
    route_prefix: str | None = None,
    wait: bool = True,
) -> Server:
    """Deploy `serve_app.app:build_app` with `args` as application `name` (at /`name` unless
    `route_prefix`), next to the others; with `wait`, until its /ready answers 200."""
    from ray import serve

    prefix = route_prefix if route_prefix is not None else f"/{name}"
    cluster.apps[name] = {
        "name": name,
        "route_prefix": prefix,
        "import_path": "serve_app.app:build_app",
        "args": copy.deepcopy(args),
        "deployments": deployments or [],
    }
    _apply(cluster)
    srv = Server(
        url=f"{cluster.http_url}{prefix.rstrip('/')}", app=name, metrics_url=cluster.metrics_url
    )
    if not wait:
        return srv
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, body = _get(f"{srv.url}/ready")
        if body is not None:
            srv.ready_history.append((status, (body.get("error") or {}).get("code")))
        if status == 200:
            return srv
        app_status = serve.status().applications.get(name)
        if app_status is not None and app_status.status == "DEPLOY_FAILED":
            remove_app(cluster, name)
            pytest.fail(f"app failed to deploy: {app_status.message[-2000:]}")
        time.sleep(0.2)
    remove_app(cluster, name)
    pytest.fail(f"app not ready in 300 s; last /ready answers: {srv.ready_history[-3:]}")


def ingress_with_api_keys(keys: str) -> dict[str, Any]:
    """A `deploy_app` deployments entry that turns API keys on: `keys` (comma-separated) reach
    the ingress through its environment (QWEN_API_KEYS), as from a Kubernetes Secret."""
    return {
        "name": INGRESS,
        "ray_actor_options": {"runtime_env": {"env_vars": {"QWEN_API_KEYS": keys}}},
    }


def remove_app(cluster: Cluster, name: str) -> None:
    """Delete application `name` and wait until its replicas are gone (their CPUs free)."""
    from ray import serve

    if cluster.apps.pop(name, None) is None:
        return
    if cluster.apps:
        _apply(cluster)
    else:
        serve.delete(name)
    deadline = time.monotonic() + 120
    while name in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.2)


def fresh_model_args(tmp_path_factory: pytest.TempPathFactory, **overrides: Any) -> dict[str, Any]:
    """TEST_ARGS with a fresh tiny-model folder: the model replica builds it while the ingress
    is up, which makes the "not ready yet" window observable."""
    args = copy.deepcopy(TEST_ARGS)
    args["model"]["path"] = str(tmp_path_factory.mktemp("tiny") / "model")
    args.update(overrides)
    return args


@pytest.fixture(scope="session")
def server(serve_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default application (TEST_ARGS), shared by the modules that need nothing else."""
    # At "/", as the seed server's clients expect (test_seed_servers_curl_verbatim).
    args = fresh_model_args(tmp_path_factory)
    srv = deploy_app(serve_cluster, "http-api", args=args, route_prefix="/")
    try:
        yield srv
    finally:
        remove_app(serve_cluster, "http-api")


def model_stats(app: str) -> dict[str, int]:
    """The model replica's outcome counts (ok, cancelled, timeout, ...) and edits in flight
    (`active`: worker threads still running). Answered at once unless the replica is busy."""
    from ray import serve

    handle = serve.get_deployment_handle(MODEL, app_name=app)
    return dict(handle.stats.remote().result(timeout_s=60))


def wait_for(predicate: Any, *, timeout: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every_s)
    pytest.fail(f"timed out waiting for {what}")


def serve_log_lines(prefix: str) -> list[str]:
    """Every line so far of this cluster's Serve log files whose names start with `prefix`
    (`replica_<app>_` for an application's replicas, `proxy_` for the HTTP proxy's access log),
    as Ray writes them under its session's logs/serve."""
    import ray

    node = ray._private.worker._global_node  # the driver's node: where this cluster logs
    lines: list[str] = []
    for path in sorted(Path(node.get_logs_dir_path(), "serve").glob(f"{prefix}*.log")):
        lines += path.read_text(errors="replace").splitlines()
    return lines
