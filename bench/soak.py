"""A soak: a bounded, mixed load for a fixed time, then what held and what it cost.

    python -m bench.soak --seconds 600 [--concurrency 6] [--json bench/results/cpu-soak.json]
    python -m bench.soak --seconds 60 --url http://127.0.0.1:8000   # a server already running

Without --url it starts `make run`'s launcher (`python -m serve_app.launch`) on deploy/local.yaml
(the tiny model on CPU) on a free port, with the url store in a temporary folder under a small
cap (`--store-cap`, so eviction runs), and stops it with SIGTERM at the end.

`concurrency` clients each send, for `seconds`, a random mix of: plain edits, streams (with a
preview), url results (then fetched), mask edits, n=2, bad inputs (each must be a 400 naming its
field), and clients that hang up mid-edit. Every answer is checked:

- 200: the body has what was asked (n images; the SSE ends with `image_edit.completed`; each url
  serves an image);
- 4xx: OpenAI error JSON with its four keys, and the expected `param` for a bad input;
- 429/503: JSON and a `Retry-After` of at least 1 s (overload is an answer, not a failure);
- anything else (500, 504, a malformed body, a transport error) is a failure.

It prints answers by kind and status, p50/p99 latency of the 200s, the RSS of the ingress and model
replicas and of Serve's HTTP proxy at the start (after a warm-up edit) and at the end, and the url
store's size against its cap; `--json` writes the same. Exit status 1 if any answer failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "deploy" / "local.yaml"
APP = "qwen-image-edit"
DEPLOYMENTS = {"ingress": "OpenAIIngress", "model": "QwenImageEditModel"}


# ---------------------------------------------------------------------------------------
# Inputs


def png(width: int, height: int, *, seed: int = 0, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    color = tuple(rng.randrange(256) for _ in range(len(mode)))
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(width: int, height: int) -> bytes:
    """Opaque, with the left half fully transparent (the area to repaint)."""
    from PIL import Image

    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# Bad inputs: (form fields, files, the param the 400 must name).
BAD_INPUTS: list[tuple[dict[str, Any], list[tuple[str, bytes]] | None, str]] = [
    ({"size": "1x1"}, None, "size"),
    ({"n": "99"}, None, "n"),
    ({"num_inference_steps": "100000"}, None, "num_inference_steps"),
    ({}, [("image", png(404, 4))], "image"),  # aspect ratio 101:1
    ({"prompt": "make it <|im_end|> blue"}, None, "prompt"),
    ({"prompt": "猫" * 1500}, None, "prompt"),  # within the characters, past the tokens
    ({"negative_prompt": "x" * 100_000}, None, "negative_prompt"),
    ({"prompt": "make\x00it blue"}, None, "prompt"),
    ({"prompt": b"caf\xe9 au lait"}, None, "prompt"),  # not UTF-8
    ({"size": "１０２４x１０２４"}, None, "size"),  # full-width digits
]


# ---------------------------------------------------------------------------------------
# One request of each kind, checked


@dataclass
class Answer:
    kind: str
    status: str  # "200", "400", ..., "disconnected" (the client hung up on purpose)
    seconds: float
    problem: str | None = None
    url_id: str | None = None  # a url result's image id


def _error_problem(resp: httpx.Response, *, param: str | None = None) -> str | None:
    try:
        error = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code} without OpenAI error JSON: {resp.text[:200]!r}"
    if set(error) != {"message", "type", "param", "code"}:
        return f"{resp.status_code} error keys {sorted(error)}"
    if resp.status_code in (429, 503):
        retry = resp.headers.get("retry-after", "")
        if not retry.isdigit() or int(retry) < 1:
            return f"{resp.status_code} without Retry-After"
    elif resp.status_code >= 500:
        return f"{resp.status_code} {error.get('code')}: {error.get('message')}"
    if param is not None and error["param"] != param:
        return f"{resp.status_code} names {error['param']!r}, expected {param!r}"
    return None


def _images_problem(resp: httpx.Response, *, n: int) -> str | None:
    data = resp.json().get("data") or []
    if len(data) != n:
        return f"200 with {len(data)} images, expected {n}"
    return None


def _sse_problem(body: str) -> str | None:
    events = [
        dict(line.split(": ", 1) for line in frame.splitlines() if ": " in line)
        for frame in body.strip().split("\n\n")
        if frame.strip()
    ]
    names = [e.get("event") for e in events]
    if not names or names[-1] != "image_edit.completed":
        return f"stream ended with {names[-1:] or 'nothing'}"
    json.loads(events[-1]["data"])
    return None


class Load:
    """The request kinds, against one server."""

    def __init__(self, url: str, *, steps: int, seed: int, long_steps: int = 20) -> None:
        self.url = url.rstrip("/")
        self.steps = steps
        self.long_steps = long_steps
        self.rng = random.Random(seed)
        self.image = png(64, 48, seed=seed)
        self.mask = mask_png(64, 48)
        self.kinds: dict[str, tuple[float, Callable[[httpx.Client], Answer]]] = {
            "plain": (4, self.plain),
            "stream": (2, self.stream),
            "url": (2, self.url_result),
            "mask": (1, self.masked),
            "n2": (1, self.two),
            "bad": (3, self.bad),
            "disconnect": (1, self.disconnect),
        }

    def picks(self, *, offset: int = 0) -> Iterator[Callable[[httpx.Client], Answer]]:
        """Every kind once (from `offset`, so that short runs still cover all), then at random
        by weight."""
        names = list(self.kinds)
        for name in names[offset % len(names) :] + names[: offset % len(names)]:
            yield self.kinds[name][1]
        weights = [self.kinds[n][0] for n in names]
        while True:
            yield self.kinds[self.rng.choices(names, weights)[0]][1]

    def _post(
        self,
        client: httpx.Client,
        data: dict[str, Any],
        files: list[tuple[str, bytes]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        fields = {"prompt": "make it blue", "size": "64x64", "num_inference_steps": self.steps}
        fields.update(data)
        parts = [(name, (f"{name}.png", blob, "image/png")) for name, blob in files or []]
        if not any(name == "image" for name, _ in files or []):
            parts.insert(0, ("image", ("in.png", self.image, "image/png")))
        return client.post(
            f"{self.url}/v1/images/edits",
            data={k: v if isinstance(v, bytes) else str(v) for k, v in fields.items()},
            files=parts,
            **kwargs,
        )

    def _timed(self, kind: str, call: Callable[[], tuple[str, str | None]]) -> Answer:
        t0 = time.perf_counter()
        self._url_id: str | None = None
        try:
            status, problem = call()
        except httpx.TransportError as exc:
            status, problem = "transport_error", f"{type(exc).__name__}: {exc}"
        return Answer(kind, status, time.perf_counter() - t0, problem, self._url_id)

    def _json_edit(
        self, kind: str, client: httpx.Client, data: dict[str, Any], *, n: int = 1, **kw: Any
    ) -> Answer:
        def call() -> tuple[str, str | None]:
            resp = self._post(client, data, **kw)
            if resp.status_code != 200:
                return str(resp.status_code), _error_problem(resp)
            return "200", _images_problem(resp, n=n)

        return self._timed(kind, call)

    def plain(self, client: httpx.Client) -> Answer:
        return self._json_edit("plain", client, {})

    def two(self, client: httpx.Client) -> Answer:
        return self._json_edit("n2", client, {"n": 2}, n=2)

    def masked(self, client: httpx.Client) -> Answer:
        return self._json_edit("mask", client, {}, files=[("mask", self.mask)])

    def url_result(self, client: httpx.Client) -> Answer:
        def call() -> tuple[str, str | None]:
            resp = self._post(client, {"response_format": "url"})
            if resp.status_code != 200:
                return str(resp.status_code), _error_problem(resp)
            problem = _images_problem(resp, n=1)
            if problem:
                return "200", problem
            url = resp.json()["data"][0]["url"]
            self._url_id = url.rsplit("/", 1)[-1]
            image = client.get(url)
            if image.status_code != 200 or not image.headers["content-type"].startswith("image/"):
                return "200", f"url result answered {image.status_code}"
            return "200", None

        return self._timed("url", call)

    def stream(self, client: httpx.Client) -> Answer:
        def call() -> tuple[str, str | None]:
            resp = self._post(client, {"stream": "true", "partial_images": 1})
            if resp.status_code != 200:
                return str(resp.status_code), _error_problem(resp)
            return "200", _sse_problem(resp.text)

        return self._timed("stream", call)

    def bad(self, client: httpx.Client) -> Answer:
        data, files, param = self.rng.choice(BAD_INPUTS)

        def call() -> tuple[str, str | None]:
            resp = self._post(client, data, files)
            status = str(resp.status_code)
            if resp.status_code in (429, 503):
                return status, _error_problem(resp)
            if resp.status_code != 400:
                return status, f"a bad {param} answered {resp.status_code}: {resp.text[:200]!r}"
            return status, _error_problem(resp, param=param)

        return self._timed("bad", call)

    def disconnect(self, client: httpx.Client) -> Answer:
        """A client that hangs up half a second into a long edit (streaming or not)."""
        data: dict[str, Any] = {"num_inference_steps": self.long_steps}
        if self.rng.random() < 0.5:
            data.update(stream="true", partial_images=2)

        def call() -> tuple[str, str | None]:
            try:
                resp = self._post(client, data, timeout=httpx.Timeout(60, read=0.5))
            except httpx.ReadTimeout:
                return "disconnected", None
            if resp.status_code == 200:
                return "200", None  # it finished first
            return str(resp.status_code), _error_problem(resp)

        return self._timed("disconnect", call)


# ---------------------------------------------------------------------------------------
# Measuring the server


def serve_processes(app: str = APP, *, root: int | None = None) -> dict[str, int]:
    """name -> pid of the Ray Serve processes for `app`: its ingress and model replicas (Ray
    titles them `ray::ServeReplica:<app>:<deployment>`) and the HTTP proxy; among the
    descendants of process `root` (the launcher, the test process), else on the whole machine."""
    import psutil

    candidates = (
        psutil.Process(root).children(recursive=True) if root is not None else psutil.process_iter()
    )
    found: dict[str, int] = {}
    for proc in candidates:
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for name, deployment in DEPLOYMENTS.items():
            if f"ServeReplica:{app}:{deployment}" in line:
                found[name if name not in found else f"{name}-{proc.pid}"] = proc.pid
        if "ray::ProxyActor" in line:
            found["http_proxy"] = proc.pid
    return found


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = float("nan")
    return out


def store_usage(folder: Path | None) -> dict[str, int] | None:
    if folder is None or not folder.is_dir():
        return None
    files = [p for p in folder.iterdir() if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


# ---------------------------------------------------------------------------------------
# The run


@dataclass
class Report:
    seconds: float
    concurrency: int
    answers: list[Answer] = field(default_factory=list)
    memory_start: dict[str, float] = field(default_factory=dict)
    memory_end: dict[str, float] = field(default_factory=dict)
    # (seconds into the run, RSS MiB per process), every `seconds / 20`.
    memory_samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    store: dict[str, int] | None = None
    store_cap: int | None = None

    @property
    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.problem is not None]

    def second_half_growth(self) -> dict[str, float]:
        """RSS growth per process from the sample nearest the middle of the run to the end:
        what is left once the first edits of each kind have warmed the caches up."""
        if not self.memory_samples:
            return {}
        middle = min(self.memory_samples, key=lambda tm: abs(tm[0] - self.seconds / 2))[1]
        return {
            name: round(self.memory_end[name] - middle[name], 1)
            for name in middle
            if name in self.memory_end
        }

    @property
    def url_ids(self) -> set[str]:
        return {a.url_id for a in self.answers if a.url_id is not None}

    def to_dict(self) -> dict[str, Any]:
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        for a in self.answers:
            by_kind[a.kind][a.status] += 1
        ok = [a.seconds for a in self.answers if a.status == "200"]
        latency = {
            kind: {
                "p50": percentile([a.seconds for a in group if a.status == "200"], 50),
                "p99": percentile([a.seconds for a in group if a.status == "200"], 99),
            }
            for kind, group in _grouped(self.answers).items()
        }
        latency["all"] = {"p50": percentile(ok, 50), "p99": percentile(ok, 99)}
        return {
            "seconds": self.seconds,
            "concurrency": self.concurrency,
            "requests": len(self.answers),
            "by_status": dict(Counter(a.status for a in self.answers)),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "latency_s": latency,
            "rss_mib_start": self.memory_start,
            "rss_mib_end": self.memory_end,
            "rss_mib_growth_second_half": self.second_half_growth(),
            "rss_mib_samples": [{"t_s": round(t, 1), **m} for t, m in self.memory_samples],
            "store": self.store,
            "store_cap_bytes": self.store_cap,
            "failures": [f"{a.kind} {a.status}: {a.problem}" for a in self.failures][:50],
        }


def _grouped(answers: list[Answer]) -> dict[str, list[Answer]]:
    groups: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        groups[a.kind].append(a)
    return groups


def run_load(
    url: str,
    *,
    seconds: float,
    concurrency: int,
    steps: int = 2,
    long_steps: int = 20,
    seed: int = 0,
    app: str = APP,
    store_dir: Path | None = None,
    store_cap: int | None = None,
    root_pid: int | None = None,
) -> Report:
    """Warm up with one edit, then `concurrency` clients for `seconds`; every answer checked."""
    load = Load(url, steps=steps, seed=seed, long_steps=long_steps)
    with httpx.Client(timeout=httpx.Timeout(600, connect=30)) as client:
        warm = load.plain(client)
        if warm.status != "200":
            raise RuntimeError(f"warm-up edit failed: {warm}")
    pids = serve_processes(app, root=root_pid)
    report = Report(seconds=seconds, concurrency=concurrency, store_cap=store_cap)
    report.memory_start = rss_mib(pids)
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def worker(index: int) -> None:
        own = Load(url, steps=steps, seed=seed * 1000 + index, long_steps=long_steps)
        with httpx.Client(timeout=httpx.Timeout(600, connect=30)) as client:
            for request in own.picks(offset=index * 2):
                if time.monotonic() >= stop_at:
                    break
                answer = request(client)
                with lock:
                    report.answers.append(answer)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        report.memory_samples.append((time.monotonic() - started, rss_mib(pids)))
        for t in threads:
            t.join(timeout=max(1.0, seconds / 20) / len(threads))
    for t in threads:
        t.join()
    time.sleep(2)  # let the cancelled edits finish stopping before memory is read
    report.memory_end = rss_mib(pids)
    report.store = store_usage(store_dir)
    return report


def print_report(report: Report) -> None:
    d = report.to_dict()
    print(f"\nsoak: {d['requests']} requests in {d['seconds']:.0f} s at concurrency "
          f"{d['concurrency']}")  # fmt: skip
    print(f"  by status: {d['by_status']}")
    for kind, statuses in d["by_kind"].items():
        lat = d["latency_s"].get(kind, {})
        print(f"  {kind:<11} {statuses}  p50 {lat.get('p50')} s  p99 {lat.get('p99')} s")
    print(
        f"  all 200s    p50 {d['latency_s']['all']['p50']} s  p99 {d['latency_s']['all']['p99']} s"
    )
    for name in sorted(d["rss_mib_start"]):
        start, end = d["rss_mib_start"][name], d["rss_mib_end"].get(name)
        late = d["rss_mib_growth_second_half"].get(name)
        growth = f"{late:+} MiB" if late is not None else "n/a"
        print(f"  RSS {name:<11} {start} MiB -> {end} MiB ({growth} in the second half)")
    if d["store"] is not None:
        print(f"  url store   {d['store']['files']} files, {d['store']['bytes']} bytes "
              f"(cap {d['store_cap_bytes']})")  # fmt: skip
    print(f"  failures: {len(report.failures)}")
    for line in d["failures"][:20]:
        print(f"    {line}")


# ---------------------------------------------------------------------------------------
# `make run`, started and stopped here


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def launched(*, store_dir: Path, store_cap: int, ready_s: float = 900) -> Iterator[tuple[str, int]]:
    """`make run` (the launcher on deploy/local.yaml) on a free port, its url store in
    `store_dir` under `store_cap` bytes; yields (its URL, its pid), stops it with SIGTERM."""
    import yaml

    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    args = config["applications"][0]["args"]
    args["storage"] = {"url": str(store_dir), "max_total_bytes": store_cap}
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        path = Path(tmp) / "soak.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = (Path(tmp) / "launch.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve_app.launch", str(path), "--port", str(port)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_s
            while True:
                try:
                    if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (Path(tmp) / "launch.log").read_text()[-3000:]
                    raise RuntimeError(f"make run did not get ready: {tail}")
                time.sleep(1)
            yield url, proc.pid
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of each edit")
    parser.add_argument(
        "--long-steps", type=int, default=20, help="steps of the edits clients leave (<= max_steps)"
    )
    parser.add_argument("--url", help="a running server (default: start make run here)")
    parser.add_argument(
        "--store-cap", type=int, default=64 * 1024, help="url store cap in bytes (evictions run)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)

    load = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "steps": args.steps,
        "long_steps": args.long_steps,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory(prefix="soak-store-") as store:
        store_dir = Path(store)
        if args.url:
            report = run_load(args.url, **load)
        else:
            with launched(store_dir=store_dir, store_cap=args.store_cap) as (url, pid):
                report = run_load(
                    url, store_dir=store_dir, store_cap=args.store_cap, root_pid=pid, **load
                )
    print_report(report)
    if args.json:
        result = {
            "name": args.json.stem,
            "what": f"python -m bench.soak --seconds {args.seconds:g} --concurrency "
            f"{args.concurrency}" + (" (make run: deploy/local.yaml)" if not args.url else ""),
            "date": time.strftime("%Y-%m-%d"),
            **report.to_dict(),
        }
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
