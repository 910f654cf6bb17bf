"""Survive and hold: faults injected into the real app while edits run, then a short soak.

The model replica, the ingress replica and Serve's HTTP proxy are killed mid-edit (JSON, streams,
url results and >1 MB uploads, which Starlette spools to temporary files), and Serve's
controller is restarted. Every request gets exactly one answer and the service recovers by
itself. What a client may get:

- the app's own answer, well-formed: the result, an OpenAI error (503 `replica_unavailable` with
  Retry-After when the model replica died), or for a stream already started an `error` event;
- when the ingress replica dies, Serve's proxy answers for it (serve_app.ingress.proxy_errors):
  503 `replica_unavailable` JSON with Retry-After (docs/api.md, "What only the proxy answers"),
  or, for a stream already under way, closes the connection mid-stream;
- when the proxy itself dies, the connection closes without an answer (mid-stream for a stream
  under way).

The openai client retries all three (5xx, 503 with Retry-After, connection errors). Afterwards
the url store holds only images whose URL was given out (or whose answer a kill lost), within
its cap; no upload is left open in temporary space; and no edit is left running. Then
`bench.soak` runs its mixed load for 20 s (`python -m bench.soak` runs it for longer).
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.ingress.proxy_errors import LOST_MESSAGE
from tests.integration.conftest import (
    Cluster,
    Server,
    deploy_app,
    model_stats,
    remove_app,
    wait_for,
)

pytestmark = pytest.mark.integration

APP = "survive"
STORE_CAP = 400_000
STEPS = 30  # an edit runs for seconds: long enough to be killed in the middle


@dataclass
class Ledger:
    """What the module's clients were given: url result ids, and answers a kill took."""

    store: Path
    url_ids: set[str] = field(default_factory=set)
    lost_url_answers: int = 0


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    return Ledger(store=tmp_path_factory.mktemp("url-store"))


@pytest.fixture(scope="module")
def server(serve_cluster: Cluster, ledger: Ledger) -> Iterator[Server]:
    args = {
        "model": {"source": "tiny", "device_map": "cpu"},
        "generation": {"default_steps": 2, "max_steps": 400, "auto_size_pixels": 64 * 64},
        "limits": {"max_n": 2, "min_output_side": 32, "max_output_side": 64},
        "storage": {"url": str(ledger.store), "max_total_bytes": STORE_CAP},
        "request_timeout_s": 120,
        "upload_stall_timeout_s": 5,
    }
    deployments = [
        {"name": "QwenImageEditModel", "max_ongoing_requests": 1, "max_queued_requests": 4,
         "graceful_shutdown_timeout_s": 30},
    ]  # fmt: skip
    srv = deploy_app(serve_cluster, APP, args=args, deployments=deployments)
    try:
        yield srv
    finally:
        remove_app(serve_cluster, APP)


# --- requests and what came back --------------------------------------------------------------


def png(width: int = 40, height: int = 40, *, noise: bool = False) -> bytes:
    if noise:  # ~1.3 MB: Starlette spools it to a temporary file
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), (90, 10, 200))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


BIG = png(660, 660, noise=True)
KINDS: dict[str, tuple[dict[str, str], bytes]] = {
    "json": ({}, png()),
    "stream": ({"stream": "true", "partial_images": "2"}, png()),
    "url": ({"response_format": "url"}, png()),
    "upload": ({}, BIG),
}


@dataclass
class Outcome:
    kind: str
    status: int | None = None  # None: the connection ended without an answer
    content_type: str = ""
    body: bytes = b""
    retry_after: str | None = None
    error: str = ""  # the transport error


def send(server: Server, kind: str, *, steps: int = STEPS) -> Outcome:
    extra, image = KINDS[kind]
    data = {"prompt": "make it blue", "size": "32x32", "num_inference_steps": str(steps), **extra}
    try:
        resp = httpx.post(
            f"{server.url}/v1/images/edits",
            data=data,
            files=[("image", ("in.png", image, "image/png"))],
            timeout=httpx.Timeout(240, connect=30),
        )
    except httpx.TransportError as exc:
        return Outcome(kind, error=f"{type(exc).__name__}: {exc}")
    headers = resp.headers
    return Outcome(
        kind, resp.status_code, headers.get("content-type", ""), resp.content,
        headers.get("retry-after"),
    )  # fmt: skip


def classify(outcome: Outcome, ledger: Ledger) -> str:
    """ "answer" (the app's, well-formed), "proxy_503", "dropped", or "bad: <why>"."""
    import json

    if outcome.status is None:
        if outcome.kind == "url":
            ledger.lost_url_answers += 1
        # A stream whose answer had started is cut; anything else never got one.
        return "cut" if "incomplete" in outcome.error else "dropped"
    if outcome.content_type.startswith("text/event-stream"):
        frames = outcome.body.decode().strip().split("\n\n")
        last = dict(line.split(": ", 1) for line in frames[-1].splitlines())
        if last["event"] == "image_edit.completed":
            return "answer"
        if last["event"] == "error":
            error = json.loads(last["data"])["error"]
            ok = set(error) == {"message", "type", "param", "code"}
            return "answer" if ok else f"bad: error event {error}"
        return f"bad: stream ended with {last['event']}"
    if not outcome.content_type.startswith("application/json"):
        return f"bad: {outcome.status} {outcome.content_type} {outcome.body[:100]!r}"
    body = json.loads(outcome.body)
    if outcome.status == 200:
        if outcome.kind == "url":
            ledger.url_ids.update(item["url"].rsplit("/", 1)[-1] for item in body["data"])
        return "answer" if len(body["data"]) == 1 else "bad: 200 without its image"
    error = body.get("error") or {}
    if set(error) != {"message", "type", "param", "code"}:
        return f"bad: {outcome.status} {body}"
    if outcome.status == 503 and int(outcome.retry_after or 0) < 1:
        return "bad: 503 without Retry-After"
    if outcome.status == 503 and error["message"] == LOST_MESSAGE:
        if outcome.kind == "url":
            ledger.lost_url_answers += 1  # the image may be stored, its answer was lost
        return "proxy_503"  # the proxy's, for a request inside a lost ingress replica
    return "answer" if outcome.status in (503, 504) else f"bad: {outcome.status} {error}"


def during(
    server: Server,
    fault: Callable[[], None],
    *,
    after_s: float = 4,
    after_answers: int | None = None,
) -> list[Outcome]:
    """One request of each kind at once; `fault()` `after_s` seconds in, or with `after_answers`
    `after_s` seconds after that many requests were answered (how long the first edits take
    varies with the host's load); every outcome."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(kind: str) -> None:
        outcome = send(server, kind)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, args=(kind,)) for kind in KINDS]
    for t in threads:
        t.start()
    if after_answers is None:
        time.sleep(after_s)
    else:
        wait_for(lambda: len(outcomes) >= after_answers, timeout=300, what="the first answers",
                 every_s=0.02)  # fmt: skip
        time.sleep(after_s)
    fault()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request got no answer within 300 s"
    return outcomes


def kill_actor(name_part: str, *, restart: bool) -> None:
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if name_part in a["name"]]
    assert len(actors) == 1, actors
    actor = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    ray.kill(actor, no_restart=not restart)


def assert_recovers(server: Server, ledger: Ledger) -> float:
    """Seconds until a fresh edit (of each kind) is answered 200 again."""
    t0 = time.monotonic()
    wait_for(
        lambda: send(server, "json", steps=2).status == 200,
        timeout=240,
        what="the service to recover",
        every_s=1,
    )
    for kind in KINDS:
        outcome = send(server, kind, steps=2)
        assert (outcome.status, classify(outcome, ledger)) == (200, "answer"), outcome
    return time.monotonic() - t0


def check(outcomes: list[Outcome], ledger: Ledger, allowed: set[str]) -> list[str]:
    classes = [classify(o, ledger) for o in outcomes]
    seen = [(o.kind, o.status, o.error, c) for o, c in zip(outcomes, classes, strict=True)]
    print(f"\n  {[(kind, status, c) for kind, status, _, c in seen]}")
    assert len(outcomes) == len(KINDS)  # every request, exactly one outcome
    assert set(classes) <= allowed, seen
    # Only a stream already under way can be cut: its headers and first events had left.
    assert all(kind == "stream" for kind, _, _, c in seen if c == "cut"), seen
    return classes


def test_model_replica_killed_mid_edit(server: Server, ledger: Ledger) -> None:
    # A second after the first answer the next queued edit is running in the replica.
    outcomes = during(
        server,
        lambda: kill_actor(f"{APP}#QwenImageEditModel", restart=False),
        after_answers=1,
        after_s=1,
    )
    classes = check(outcomes, ledger, {"answer"})
    # The killed edit and those queued behind it were answered, not all with images.
    assert any(o.status != 200 or b"event: error" in o.body for o in outcomes), classes
    print(f"  recovered in {assert_recovers(server, ledger):.1f} s")


def test_ingress_replica_killed_mid_edit(server: Server, ledger: Ledger) -> None:
    outcomes = during(server, lambda: kill_actor(f"{APP}#OpenAIIngress", restart=False))
    classes = check(outcomes, ledger, {"answer", "proxy_503", "cut"})
    assert "proxy_503" in classes
    print(f"  recovered in {assert_recovers(server, ledger):.1f} s")


def test_http_proxy_killed_mid_edit(server: Server, ledger: Ledger) -> None:
    outcomes = during(server, lambda: kill_actor("SERVE_PROXY_ACTOR", restart=True))
    classes = check(outcomes, ledger, {"answer", "dropped", "cut"})
    assert "dropped" in classes
    print(f"  recovered in {assert_recovers(server, ledger):.1f} s")


def test_controller_restart_is_invisible_to_clients(server: Server, ledger: Ledger) -> None:
    from ray import serve

    outcomes = during(server, lambda: kill_actor("SERVE_CONTROLLER_ACTOR", restart=True))
    check(outcomes, ledger, {"answer"})
    assert all(o.status == 200 for o in outcomes), [(o.kind, o.status) for o in outcomes]
    wait_for(
        lambda: serve.status().applications[APP].status == "RUNNING",
        timeout=120,
        what="the restarted controller to see the app running",
    )
    print(f"  recovered in {assert_recovers(server, ledger):.1f} s")


def test_a_short_soak_holds(server: Server, ledger: Ledger) -> None:
    from bench.soak import print_report, run_load

    report = run_load(
        server.url,
        seconds=20,
        concurrency=4,
        app=APP,
        store_dir=ledger.store,
        store_cap=STORE_CAP,
        root_pid=os.getpid(),  # this process started the cluster
    )
    print_report(report)
    assert report.failures == [], report.to_dict()["failures"]
    statuses = {a.status for a in report.answers}
    assert "200" in statuses and "400" in statuses
    ledger.url_ids.update(report.url_ids)


def test_nothing_is_left_behind(server: Server, ledger: Ledger) -> None:
    wait_for(lambda: model_stats(APP)["active"] == 0, timeout=60, what="no edit running")
    stored = {p.name for p in ledger.store.iterdir()}
    assert sum(p.stat().st_size for p in ledger.store.iterdir()) <= STORE_CAP
    orphans = stored - ledger.url_ids  # stored, but its URL never reached a client
    assert len(orphans) <= ledger.lost_url_answers, (orphans, ledger.lost_url_answers)
    assert all(p.is_file() and p.suffix == ".png" for p in ledger.store.iterdir())
    assert open_temporary_files(APP) == []


def open_temporary_files(app: str) -> list[str]:
    """Deleted files the app's ingress replicas still hold open: spooled uploads not closed."""
    import psutil

    held = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if f"ServeReplica:{app}:OpenAIIngress" not in " ".join(proc.info["cmdline"] or []):
            continue
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.endswith("(deleted)"):
                held.append(target)
    return held
