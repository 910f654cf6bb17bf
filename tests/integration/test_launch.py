"""`make run` and `python -m serve_app.launch` as a user and their tools run them, then stopped.

Each lifecycle test starts the real launcher (deploy/local.yaml, the tiny model, a free port) as
a child process, waits for /ready, checks what the running server promises, sends a signal the
way a script, `make`, `timeout`, `docker stop` or a service manager does, and then checks that
the port is free and that no process of that Ray session is left: none in the session `serve run`
leads, none of the launcher's descendants, none naming the session's temp dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from serve_app.launch.cli import EXIT_CONFIG
from serve_app.launch.preflight import port_taken

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = ROOT / "deploy/local.yaml"
READY_TIMEOUT_S = 300
# The launcher's bound: 30 s graceful (--stop-timeout), then SIGKILL, 10 s at most to reap.
STOP_BOUND_S = 45
KEY = "sk-launch-test-key"
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ignore_sigint() -> None:
    # What a non-interactive shell does to a command it starts with `&`.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Launch:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    launcher_pid: int = 0
    serve_run_pid: int = 0
    session_dir: str = ""
    seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def session(self) -> list[psutil.Process]:
        if not self.serve_run_pid:  # unknown: never every process of session 0 (init, kernel)
            return []
        members = []
        for pid in psutil.pids():
            with contextlib.suppress(OSError, psutil.Error):
                if os.getsid(pid) == self.serve_run_pid:
                    proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        members.append(proc)
        return members

    def leftovers(self) -> list[str]:
        """Anything still alive of the session, the launcher's tree, or its Ray temp dir."""
        left = {p.pid: p for p in self.session()}
        for pid in self.seen:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left[pid] = proc
        if self.session_dir:
            for proc in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    cmdline = " ".join(proc.info["cmdline"] or [])
                    if self.session_dir in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                        left[proc.pid] = proc
        out = []
        for proc in left.values():
            with contextlib.suppress(psutil.Error):
                out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        return out

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output()}"
            self._remember()
            try:
                with urllib.request.urlopen(f"{self.url}/ready", timeout=10) as resp:
                    if resp.status == 200 and "is ready on" in self.output():
                        self._remember()
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        pytest.fail(f"not ready in {READY_TIMEOUT_S} s:\n{self.output()[-3000:]}")

    def _remember(self) -> None:
        """Record the launcher, serve run, Ray's session dir and every descendant so far."""
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(self.proc.pid)
            tree = [top, *top.children(recursive=True)]
            self.seen.update(p.pid for p in tree)
            for proc in tree:
                cmdline = " ".join(proc.cmdline())
                # serve run first: its runtime env names serve_app.launch.loopback.
                if "ray.serve.scripts" in cmdline:
                    self.serve_run_pid = proc.pid
                elif "serve_app.launch" in cmdline:
                    self.launcher_pid = proc.pid
                found = re.search(r"(/\S*/session_[0-9_\-]+_\d+)", cmdline)
                if found and not self.session_dir:
                    self.session_dir = found.group(1)
        if self.serve_run_pid:
            self.seen.update(p.pid for p in self.session())

    def stop(self, sig: int, *, target: str) -> float:
        """Send `sig` to "launcher", "make" (its pid alone) or "group" (make's process group)."""
        self._remember()
        t0 = time.monotonic()
        if target == "launcher":
            os.kill(self.launcher_pid, sig)
        elif target == "make":
            os.kill(self.proc.pid, sig)
        else:
            os.killpg(os.getpgid(self.proc.pid), sig)
        try:
            self.proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_BOUND_S} s after {sig}:\n{self.output()[-3000:]}")
        # make returns as soon as the launcher has; the launcher waits for the whole session.
        with contextlib.suppress(psutil.Error):
            psutil.Process(self.launcher_pid).wait(timeout=5)
        return time.monotonic() - t0

    def kill_all(self) -> None:
        """Test cleanup: SIGKILL whatever this launch started that is still alive, by pid."""
        self._remember()
        for pid in sorted(self.seen | {p.pid for p in self.session()}):
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


@contextlib.contextmanager
def launched(
    argv: list[str], *, cwd: Path, log: Path, port: int, env: dict[str, str] | None = None
) -> Iterator[Launch]:
    # The developer's own keys must not turn auth on in these tests.
    base = {k: v for k, v in os.environ.items() if k not in ("QWEN_API_KEYS", "API_KEY")}
    env = {**base, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a script's job would have
            preexec_fn=_ignore_sigint,
        )
    launch = Launch(proc=proc, port=port, log=log)
    try:
        yield launch
    finally:
        launch.kill_all()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def assert_all_gone(launch: Launch, elapsed_s: float) -> None:
    assert elapsed_s < STOP_BOUND_S
    assert launch.serve_run_pid and launch.session_dir, launch.output()[-2000:]
    assert launch.leftovers() == []
    assert not port_taken("127.0.0.1", launch.port)
    assert re.search(r"\[launch\] stopped in [0-9.]+ s", launch.output()), launch.output()[-2000:]


def _listening_not_on_loopback(launch: Launch) -> list[str]:
    bad = []
    for proc in launch.session():
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in LOOPBACK:
                    bad.append(f"{proc.name()} {conn.laddr.ip}:{conn.laddr.port}")
    return bad


def _banner_curl(output: str) -> str:
    lines = output[output.index("Try it") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
    command = []
    for line in lines[start:]:
        command.append(line.strip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(command)


@pytest.mark.parametrize("target", ["make", "group"])
def test_make_run_serves_on_loopback_and_stops_on_sigterm(tmp_path: Path, target: str) -> None:
    """`make run` started by a script (SIGINT ignored), stopped with SIGTERM to make alone, or
    to make's whole process group (then the launcher gets it twice: from the kill and from
    make, which forwards SIGTERM to its child)."""
    port = _free_port()
    env_file = tmp_path / "keys.env"
    env_file.write_text(f"QWEN_API_KEYS={KEY}\n")
    argv = ["make", "--no-print-directory", "run", f"PORT={port}", f"ENV_FILE={env_file}"]
    with launched(argv, cwd=ROOT, log=tmp_path / "out.log", port=port) as launch:
        launch.wait_ready()
        assert _listening_not_on_loopback(launch) == []
        if target == "make":
            # API keys from the env file are on, and the banner's curl carries one.
            with pytest.raises(urllib.error.HTTPError) as denied:
                urllib.request.urlopen(f"{launch.url}/v1/models", timeout=10)
            assert denied.value.code == 401
            # The address the banner prints opens the playground, without a key.
            with urllib.request.urlopen(f"{launch.url}/", timeout=10) as page:
                assert page.headers.get_content_type() == "text/html"
            output = launch.output()
            assert f"Open {launch.url}/ in a browser" in output
            assert KEY not in output
            curl = _banner_curl(output)
            assert '-H "Authorization: Bearer $OPENAI_API_KEY"' in curl
            subprocess.run(
                ["bash", "-c", curl],
                cwd=tmp_path,
                env={**os.environ, "OPENAI_API_KEY": KEY},
                check=True,
                timeout=120,
            )
            assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        elapsed = launch.stop(signal.SIGTERM, target=target)
        assert_all_gone(launch, elapsed)
        assert "SIGTERM: stopping Serve" in launch.output()


def test_launcher_reads_dotenv_and_stops_on_sigint_from_a_script(tmp_path: Path) -> None:
    """`python -m serve_app.launch` from a script (SIGINT ignored), in a folder with a .env:
    its variables reach the Ray replicas, the environment's win; SIGINT stops everything."""
    port = _free_port()
    (tmp_path / ".env").write_text(
        "QWEN_LAUNCH_TEST_FROM_FILE=dotenv\nQWEN_LAUNCH_TEST_BOTH=dotenv\n"
    )
    argv = [sys.executable, "-m", "serve_app.launch", str(LOCAL_CONFIG), f"--port={port}"]
    env = {"QWEN_LAUNCH_TEST_BOTH": "environment"}
    with launched(argv, cwd=tmp_path, log=tmp_path / "out.log", port=port, env=env) as launch:
        launch.wait_ready()
        replicas = [p for p in launch.session() if "QwenImageEditModel" in " ".join(p.cmdline())]
        assert replicas, [p.cmdline() for p in launch.session()]
        replica_env = replicas[0].environ()
        assert replica_env["QWEN_LAUNCH_TEST_FROM_FILE"] == "dotenv"
        assert replica_env["QWEN_LAUNCH_TEST_BOTH"] == "environment"
        assert "read QWEN_LAUNCH_TEST_FROM_FILE from .env" in launch.output()
        elapsed = launch.stop(signal.SIGINT, target="launcher")
        assert_all_gone(launch, elapsed)
        assert launch.proc.returncode == 0


def test_port_taken_is_said_plainly_before_ray_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = [sys.executable, "-m", "serve_app.launch", str(LOCAL_CONFIG), f"--port={port}"]
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG
    assert time.monotonic() - t0 < 30
    assert f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in done.stderr
    assert "make run PORT=" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_more_gpus_than_the_machine_has_is_said_with_the_numbers(tmp_path: Path) -> None:
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = _free_port()
    model = config["applications"][0]["deployments"][0]
    model.update(num_replicas=2, ray_actor_options={"num_cpus": 1, "num_gpus": 2})
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.launch", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == EXIT_CONFIG
    assert time.monotonic() - t0 < 30
    assert (
        "the config asks for 4 GPU(s) (QwenImageEditModel: 2 replica(s) x 2 GPU);"
        " this machine has 0." in done.stderr
    ), done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
