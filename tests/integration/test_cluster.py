"""Beyond one machine: the app on a Ray cluster of a head and two worker raylets (this machine,
tests.integration.cluster_nodes, a process of its own), each node with its own HOME and TMPDIR and,
on the workers, its own HTTP proxy port, as separate machines behind a load balancer would be.

In order, on one application (the tiny model, small edits, loopback only):

1. url results with the default local-folder store: made through node A's proxy, a 404 through
   node B's (each ingress replica sees its own node's files: what the shared store is for);
2. a config update under steady load (`serve deploy` of changed args: the Redis store and
   another default step count): Serve's rolling update answers every request;
3. url results in Redis: made through either worker's proxy, read through the other's;
4. an ingress replica killed under steady load;
5. autoscaling: load takes the model deployment from 1 to 3 replicas, idle back to 1;
6. the GCS killed and started again under steady load, its state in Redis (fault tolerance): the
   requests in flight wait for it and are answered after;
7. a worker raylet killed under steady load.

Each phase prints its figures: requests sent, answered 200, answered 503/429 by the app (JSON
with Retry-After), answered 503 by Serve's proxy for a request inside a killed ingress replica
(JSON `replica_unavailable` with Retry-After, serve_app.ingress.proxy_errors; Serve's own
would be a plain-text 500, a failure here), failed otherwise (must be 0), hung (must be 0), and
the seconds until every request was answered 200 again. With QWEN_CLUSTER_RESULTS=path the figures are also written
there as JSON (bench/results/cluster-cpu-*.json, which docs/deployment.md quotes).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.common.links import PROXY_ENV
from serve_app.ingress.proxy_errors import LOST_MESSAGE
from tests.fixtures import free_port, redis_server
from tests.integration.test_survive import png

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
APP = "cluster"
INGRESS, MODEL = "OpenAIIngress", "QwenImageEditModel"
RESULTS_ENV = "QWEN_CLUSTER_RESULTS"
WORKERS = ("a", "b")
# A request not answered within this long counts as hung.
HUNG_AFTER_S = 150.0
FIGURES: dict[str, dict[str, Any]] = {}
# How long the GCS stays down: several edits' time.
GCS_DOWN_S = 10.0

ARGS: dict[str, Any] = {
    "model": {"source": "tiny", "device_map": "cpu"},
    "generation": {"default_steps": 2, "max_steps": 40, "auto_size_pixels": 64 * 64},
    "limits": {"max_n": 1, "min_output_side": 32, "max_output_side": 64},
    # Replica start-ups take the CPUs from the edits here: a generous deadline (its 504 counts
    # as a failure).
    "request_timeout_s": 120,
    "retry_after_s": 1,
}
# The ingress: one replica on each worker (their `ingress` resource), as the manifests spread
# it (max_replicas_per_node: 1); the model replica anywhere.
INGRESS_DEPLOYMENT: dict[str, Any] = {
    "name": INGRESS,
    "num_replicas": 2,
    "max_replicas_per_node": 1,
    "ray_actor_options": {"num_cpus": 0.25, "resources": {"ingress": 1}},
}
MODEL_DEPLOYMENT: dict[str, Any] = {
    "name": MODEL,
    "num_replicas": 1,
    "max_ongoing_requests": 1,
    "max_queued_requests": 8,
    "graceful_shutdown_timeout_s": 20,
}


# --- the cluster -------------------------------------------------------------------------------


@dataclass
class Nodes:
    """The cluster process and the proxies' URLs: the head's and each worker's."""

    proc: subprocess.Popen[str]
    head_url: str
    worker_urls: dict[str, str]
    redis_url: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.lock:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        answer: dict[str, Any] = json.loads(line) if line else {"error": "the cluster exited"}
        assert "error" not in answer, f"{op}: {answer['error']}"
        return answer

    def deploy(self, args: dict[str, Any], deployments: list[dict[str, Any]]) -> None:
        app = {
            "name": APP,
            "route_prefix": "/",
            "import_path": "serve_app.app:build_app",
            "args": args,
            "deployments": deployments,
        }
        self.call("deploy", applications=[app])

    def running(self, deployment: str) -> int:
        return int(
            self.call("status", app=APP)["deployments"].get(deployment, {}).get("running", 0)
        )

    def app_status(self) -> str:
        return str(self.call("status", app=APP)["status"])


def _tiny_model_dir() -> str:
    # Shared by every node (their HOMEs differ): the tiny model is built once.
    from serve_app.pipeline.random_weights.tiny import default_tiny_model_dir

    return str(default_tiny_model_dir())


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("cluster")
    with redis_server(tmp_path_factory.mktemp("redis")) as redis_url:
        port = free_port()
        worker_ports = {name: free_port() for name in WORKERS}
        common = {"QWEN_TINY_MODEL_DIR": _tiny_model_dir(), "SERVE_SOCKET_REUSE_PORT_ENABLED": "0"}

        def node(name: str, **extra: Any) -> dict[str, Any]:
            home = base / name
            (home / "tmp").mkdir(parents=True)
            env = {**common, "HOME": str(home), "TMPDIR": str(home / "tmp"), **extra.pop("env", {})}
            return {"name": name, "env": env, **extra}

        spec = {
            "port": port,
            "redis": redis_url.removeprefix("redis://").rsplit("/", 1)[0],
            "nodes": [
                node("head", num_cpus=2),
                *(
                    node(
                        name,
                        num_cpus=2,
                        resources={"ingress": 1},
                        env={"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_ports[name])},
                    )
                    for name in WORKERS
                ),
            ],
        }
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a cluster of its own
        env.update(PROXY_ENV)
        log = base / "cluster.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.cluster_nodes", json.dumps(spec)],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True,
            )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                pytest.fail(f"cluster: {line or 'exited'}; {log.read_text()[-3000:]}")
            urls = {name: f"http://127.0.0.1:{p}" for name, p in worker_ports.items()}
            yield Nodes(proc, f"http://127.0.0.1:{port}", urls, redis_url)
        finally:
            _report()
            if proc.stdin is not None:
                proc.stdin.close()  # the cluster process shuts Serve and the nodes down
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _report() -> None:
    if not FIGURES:
        return
    print("\ncluster figures:")
    for phase, figures in FIGURES.items():
        print(f"  {phase}: {json.dumps(figures)}")
    target = os.environ.get(RESULTS_ENV)
    if target:
        document = {
            "what": "tests/integration/test_cluster.py: a head and two worker raylets on one CPU"
            " machine, the tiny model, small edits (32x32, 2-3 steps)",
            # The machine is shared: its load says how busy the 2 CPUs were besides.
            "host": {
                "cpus": os.cpu_count(),
                "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
                "python": platform.python_version(),
            },
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "phases": FIGURES,
        }
        Path(target).write_text(json.dumps(document, indent=2) + "\n")


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def deployed(nodes: Nodes) -> Nodes:
    nodes.deploy(ARGS, [INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT])
    wait_until(lambda: _ready(nodes.head_url), timeout=300, what="the app's /ready")
    for url in nodes.worker_urls.values():
        wait_until(lambda url=url: _ready(url), timeout=120, what=f"{url}/ready")
    return nodes


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


# --- requests and load -------------------------------------------------------------------------

IMAGE = png(32, 32)


def edit(url: str, *, timeout: float = HUNG_AFTER_S, **fields: str) -> httpx.Response:
    data = {"prompt": "make it blue", "size": "32x32", **fields}
    return httpx.post(
        f"{url}/v1/images/edits",
        data=data,
        files=[("image", ("in.png", IMAGE, "image/png"))],
        timeout=httpx.Timeout(timeout, connect=10),
    )


@dataclass
class Answer:
    started: float
    ended: float
    kind: str  # "200", "503/429", "lost_ingress_503" (the proxy's), "hung", "failed"
    detail: str = ""


def classify(resp: httpx.Response) -> tuple[str, str]:
    content_type = resp.headers.get("content-type", "")
    if resp.status_code == 200 and content_type.startswith("application/json"):
        return ("200", "") if len(resp.json().get("data", [])) == 1 else ("failed", resp.text)
    if resp.status_code in (429, 503) and content_type.startswith("application/json"):
        error = resp.json().get("error") or {}
        retry = int(resp.headers.get("retry-after") or 0)
        ok = set(error) == {"message", "type", "param", "code"} and retry >= 1
        if not ok:
            return "failed", f"{resp.status_code} {resp.text[:200]}"
        if resp.status_code == 503 and error["message"] == LOST_MESSAGE:
            assert error["code"] == "replica_unavailable", error
            return "lost_ingress_503", ""  # Serve's proxy: the ingress replica it had reached died
        return "503/429", ""
    # Serve's proxy's own plain-text 500 for a lost ingress replica is one of these.
    return "failed", f"{resp.status_code} {content_type} {resp.text[:200]}"


class Load:
    """`clients` threads sending edits back to back through `url` until stopped."""

    def __init__(self, url: str, *, clients: int) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(HUNG_AFTER_S + 15)
        assert not any(t.is_alive() for t in self._threads), "a client thread never returned"

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                kind, detail = classify(edit(self.url))
            except httpx.TimeoutException as exc:
                kind, detail = "hung", repr(exc)
            except httpx.TransportError as exc:
                kind, detail = "failed", repr(exc)
            answer = Answer(started, time.monotonic(), kind, detail)
            with self._lock:
                self.answers.append(answer)
            if kind != "200":
                time.sleep(0.2)  # as a client honouring Retry-After would, briefly

    def answered(self) -> int:
        with self._lock:
            return len(self.answers)

    def figures(self, *, fault_at: float | None = None) -> dict[str, Any]:
        counts = {k: sum(a.kind == k for a in self.answers) for k in KINDS}
        figures: dict[str, Any] = {"sent": len(self.answers), **counts}
        if fault_at is not None:
            bad = [a.ended for a in self.answers if a.kind != "200"]
            figures["seconds_to_full_service"] = round(max([fault_at, *bad]) - fault_at, 2)
        figures["failures"] = [a.detail for a in self.answers if a.kind == "failed"][:5]
        return figures


KINDS = ("200", "503/429", "lost_ingress_503", "failed", "hung")


def record(phase: str, figures: dict[str, Any]) -> dict[str, Any]:
    FIGURES[phase] = figures
    print(f"\n  {phase}: {json.dumps(figures)}")
    return figures


def assert_clean(figures: dict[str, Any], *, lost_at_most: int = 0) -> None:
    assert figures["failed"] == 0, figures
    assert figures["hung"] == 0, figures
    assert figures["lost_ingress_503"] <= lost_at_most, figures
    assert figures["200"] > 0, figures


# --- 1 to 3: the shared url-result store and a config update under load -----------------------


def url_through(url: str) -> str:
    resp = edit(url, response_format="url")
    assert resp.status_code == 200, resp.text
    link = str(resp.json()["data"][0]["url"])
    return link.split("/v1/images/", 1)[1]


def test_local_folder_url_results_are_per_node(deployed: Nodes) -> None:
    a, b = (deployed.worker_urls[n] for n in WORKERS)
    image_id = url_through(a)
    assert httpx.get(f"{a}/v1/images/{image_id}", timeout=10).status_code == 200
    # Node B's ingress looks in node B's HOME: the link made on A is unknown there.
    missing = httpx.get(f"{b}/v1/images/{image_id}", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "image_not_found"


def test_a_config_update_under_load_fails_no_request(deployed: Nodes) -> None:
    changed = {
        **ARGS,
        "generation": {**ARGS["generation"], "default_steps": 3},
        "storage": {"url": deployed.redis_url, "key_prefix": "cluster-test"},
    }
    with Load(deployed.head_url, clients=3) as load:
        wait_until(lambda: load.answered() >= 3, timeout=60, what="the load to run")
        deployed.deploy(changed, [INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT])
        wait_until(lambda: deployed.app_status() != "RUNNING", timeout=30, what="the update")
        took = wait_until(
            lambda: deployed.app_status() == "RUNNING", timeout=240, what="the update to finish"
        )
        time.sleep(2)  # and a moment under the new version
    figures = record("config_update", {**load.figures(), "update_s": round(took, 2)})
    assert_clean(figures)
    assert figures["503/429"] == 0, figures


def test_url_results_in_redis_cross_nodes(deployed: Nodes) -> None:
    a, b = (deployed.worker_urls[n] for n in WORKERS)
    for maker, reader in ((a, b), (b, a), (deployed.head_url, b)):
        image_id = url_through(maker)
        here = httpx.get(f"{maker}/v1/images/{image_id}", timeout=10)
        there = httpx.get(f"{reader}/v1/images/{image_id}", timeout=10)
        assert here.status_code == there.status_code == 200, there.text
        assert there.content == here.content and there.content.startswith(b"\x89PNG")


# --- 4 and 5: an ingress replica lost, autoscaling ---------------------------------------------


def test_an_ingress_replica_killed_under_load(deployed: Nodes) -> None:
    with Load(deployed.head_url, clients=3) as load:
        wait_until(lambda: load.answered() >= 3, timeout=60, what="the load to run")
        # The replica killed holds requests (the other may hold them all for a moment).
        kill: dict[str, Any] = {}

        def killed_a_busy_one() -> bool:
            kill["at"] = time.monotonic()
            kill.update(deployed.call("kill_actor", name_part=f"{APP}#{INGRESS}", busy=True))
            return kill["killed"] is not None

        wait_until(killed_a_busy_one, timeout=60, what="an ingress replica holding a request")
        killed, killed_at = kill["killed"], kill["at"]

        def replaced() -> bool:
            names = deployed.call("actors", name_part=f"{APP}#{INGRESS}")["names"]
            return killed not in names and len(names) == 2 and deployed.running(INGRESS) == 2

        replaced_s = wait_until(replaced, timeout=120, what="a new ingress replica")
        time.sleep(2)
    figures = record(
        "ingress_replica_killed",
        {**load.figures(fault_at=killed_at), "in_killed_replica": kill["ongoing"],
         "replica_replaced_s": round(replaced_s, 2)},
    )  # fmt: skip
    # Only requests that had reached the killed replica: at most one per client. It held at
    # least one, which the proxy answered JSON 503 with Retry-After (a plain-text 500 would
    # count as failed).
    assert_clean(figures, lost_at_most=3)
    assert figures["lost_ingress_503"] >= 1, figures


def test_autoscaling_up_to_three_model_replicas_and_back(deployed: Nodes) -> None:
    scaling = {
        **MODEL_DEPLOYMENT,
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 4,
        },
    }
    del scaling["num_replicas"]
    args = {
        **ARGS,
        "generation": {**ARGS["generation"], "default_steps": 3},
        "storage": {"url": deployed.redis_url, "key_prefix": "cluster-test"},
    }
    deployed.deploy(args, [INGRESS_DEPLOYMENT, scaling])
    wait_until(lambda: deployed.app_status() == "RUNNING", timeout=120, what="autoscaling on")
    # 4 clients: 4 requests per replica at first (3 wanted), 1.3 at 3 replicas (3 kept).
    with Load(deployed.head_url, clients=4) as load:
        up = wait_until(lambda: deployed.running(MODEL) == 3, timeout=180, what="3 model replicas")
        time.sleep(2)
    # From the load's end: downscale_delay_s, then the replicas' graceful shutdown.
    down = wait_until(lambda: deployed.running(MODEL) == 1, timeout=120, what="back to 1 replica")
    figures = record(
        "autoscaling_1_3_1",
        {**load.figures(), "up_to_3_s": round(up, 2), "down_to_1_s": round(down, 2)},
    )
    assert_clean(figures)


# --- 6 and 7: the GCS and a worker node lost ---------------------------------------------------


def test_the_gcs_killed_and_restarted_under_load(deployed: Nodes) -> None:
    with Load(deployed.head_url, clients=3) as load:
        wait_until(lambda: load.answered() >= 3, timeout=60, what="the load to run")
        killed_at = time.monotonic()
        deployed.call("kill_gcs")
        before = load.answered()
        # Edits are held, not failed (here none was answered while it was down); /health, which
        # the ingress answers without the model, tells whether the proxy-to-ingress leg works.
        health = _probe_health(deployed.head_url, seconds=GCS_DOWN_S)
        during = load.answered() - before
        restarted_at = time.monotonic()
        deployed.call("start_gcs")
        back = wait_until(
            lambda: deployed.app_status() == "RUNNING", timeout=120, what="Serve's status again"
        )
        time.sleep(2)
    # How long edits stalled: from the kill, and from the restart, to the first edit answered.
    first = min(a.ended for a in load.answers if a.kind == "200" and a.ended > killed_at)
    figures = record(
        "gcs_killed",
        {**load.figures(fault_at=killed_at), "down_s": GCS_DOWN_S,
         "answered_while_down": during, "health_200_while_down": health[0],
         "health_probes_while_down": health[1], "status_again_s": round(back, 2),
         "first_edit_after_kill_s": round(first - killed_at, 2),
         "first_edit_after_restart_s": round(first - restarted_at, 2)},
    )  # fmt: skip
    assert_clean(figures)


def _probe_health(url: str, *, seconds: float) -> tuple[int, int]:
    """(answered 200, sent) of GET /health, one at a time for `seconds`."""
    ok = sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent += 1
        with contextlib.suppress(httpx.TransportError):
            ok += httpx.get(f"{url}/health", timeout=2).status_code == 200
        time.sleep(0.5)
    return ok, sent


def test_a_worker_raylet_killed_under_load(deployed: Nodes) -> None:
    with Load(deployed.head_url, clients=3) as load:
        wait_until(lambda: load.answered() >= 3, timeout=60, what="the load to run")
        killed_at = time.monotonic()
        deployed.call("remove_node", name="b")
        # Node B's ingress replica cannot come back (only A has the `ingress` resource left).
        wait_until(lambda: deployed.running(MODEL) >= 1, timeout=180, what="a model replica")
        wait_until(
            lambda: sum(a.kind == "200" for a in load.answers[-3:]) == 3,
            timeout=180,
            what="full service",
        )
        time.sleep(2)
    figures = record("worker_raylet_killed", load.figures(fault_at=killed_at))
    assert_clean(figures, lost_at_most=3)
