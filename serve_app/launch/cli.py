"""`python -m serve_app.launch CONFIG`: serve a Serve config on this machine; stop it cleanly.

What `make run` runs (CONFIG defaults to deploy/local.yaml, the tiny model on CPU). In order:

1. Settings: a `.env` file in the working directory fills in variables the environment does not
   set (the environment wins), for the launcher and, through `serve run`'s local cluster, for
   every Ray replica.
2. Checks, before Ray starts: the HTTP port must be free, and the replicas the config asks for
   must fit the CPUs and GPUs this machine has. Each failure is one message with the numbers.
3. `serve run CONFIG` in its own session (serve_app.launch.supervise), on a local Ray cluster whose
   ports all listen on loopback only; Ray's token auth stays off for this local cluster, and its
   processes start with glibc's malloc tuned for multi-MB images (serve_app.common.malloc).
4. A ready-to-paste curl once /ready answers 200.
5. SIGINT (Ctrl-C, or from a script) or SIGTERM (`make`, `timeout`, `docker stop`, service
   managers) stops Serve, then Ray: `--stop-timeout` seconds (30) for a graceful shutdown, then
   every process left in the session is killed. A new signal a second or more later kills at
   once. The launcher exits 0 after a requested stop, 2 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from serve_app.common.config import ENV_DEVICE_MAP, ENV_MODEL_DIR
from serve_app.common.links import PROXY_ENV
from serve_app.common.malloc import CLUSTER_ENV
from serve_app.launch import loopback
from serve_app.launch.preflight import (
    client_url,
    demands,
    http_address,
    node_resources,
    port_owner,
    port_taken,
    shortfalls,
)
from serve_app.launch.supervise import ServeProcess

EXIT_CONFIG = 2  # the server could not start as configured (port taken, too few GPUs, ...)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Ray's own servers (GCS, raylet, object manager, agents, workers) listen on all interfaces
# unless the node IP is 127.0.0.1, and on Linux Ray picks the machine's external address. A
# single-node cluster has no peer: with this set to 0 Ray takes 127.0.0.1, as on macOS, and
# listens on loopback only (the dashboard is on 127.0.0.1 already). serve_app.launch.loopback covers
# the one server that ignores the node IP.
_RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_RUNTIME_ENV = {"worker_process_setup_hook": loopback.HOOK}
_RAY_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
# The seed server's settings that mean something else here (docs/migrating.md).
_SEED_ONLY = {
    "HOST": "http_options.host in the config, or --host",
    "PORT": "http_options.port in the config, or --port",
    "LOG_LEVEL": "logging_config.log_level in the config",
    "RELOAD": "nothing: restart the launcher",
}

# fmt: off
_SAVE_B64 = (
    "import sys,json,base64; "
    "open('out.png','wb').write(base64.b64decode(json.load(sys.stdin)['data'][0]['b64_json']))"
)
# fmt: on
_EXAMPLE_IMAGE = Path(__file__).resolve().parents[2] / "examples" / "input.png"


def load_env_file(
    path: Path, *, environ: Mapping[str, str], required: bool = False
) -> tuple[dict[str, str], list[str]]:
    """`environ` plus the variables of a .env file it does not set, and the names read."""
    from dotenv import dotenv_values

    env = dict(environ)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"env file {path} not found")
        return env, []
    read = []
    for key, value in dotenv_values(path).items():
        if value is not None and key not in environ:
            env[key] = value
            read.append(key)
    return env, read


# The embedded tiny model answers noise: said where a newcomer looks first, with the way out.
DEMO_MODEL_NOTE = (
    "\n The model is the embedded DEMO model: random weights, so every image it makes is noise.\n"
    " For real edits serve Qwen-Image-Edit on a GPU: {url}/docs#real-model\n"
)


def banner(
    url: str, *, api_keys: bool, warnings: list[str] | None = None, demo_model: bool = False
) -> str:
    image = _EXAMPLE_IMAGE if _EXAMPLE_IMAGE.exists() else Path("input.png")
    # The key itself is never printed: this output ends up in logs (docker, journald).
    auth = ' -H "Authorization: Bearer $OPENAI_API_KEY"' if api_keys else ""
    keys_note = (
        "\n API keys are on: export OPENAI_API_KEY=<one of the server's keys> first.\n"
        if api_keys
        else ""
    )
    warned = "".join(f"\n WARNING: {w}\n" for w in warnings or [])
    demo = DEMO_MODEL_NOTE.format(url=url) if demo_model else ""
    return f"""
================================================================================
 qwen-image-edit-serve is ready on {url}
 Open {url}/ in a browser to edit images (the playground).
 The API reference: {url}/docs
{demo}
 Try it (writes out.png):
{keys_note}
 curl -s {url}/v1/images/edits{auth} \\
   -F model=qwen-image-edit -F image=@{image} \\
   -F prompt="make the sky purple" -F size=256x256 \\
   | python3 -c "{_SAVE_B64}"

 Ctrl-C (or SIGTERM) stops the server.
{warned}================================================================================
"""


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=10) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _applications(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(config.get("applications") or [])


def _serves_tiny_model(config: Mapping[str, Any]) -> bool:
    apps = _applications(config)
    return bool(apps) and all(
        ((app.get("args") or {}).get("model") or {}).get("source") == "tiny" for app in apps
    )


def _app_api_keys_on(app: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    from serve_app.common.api_keys import load_api_keys
    from serve_app.common.config import AuthConfig

    auth = AuthConfig.model_validate((app.get("args") or {}).get("auth") or {})
    try:
        return bool(load_api_keys(auth, environ=env))
    except OSError:
        return True  # a key file the replica will read, not readable from here


def _api_keys_on(config: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    return any(_app_api_keys_on(app, env) for app in _applications(config))


def startup_warnings(config: Mapping[str, Any], *, bind_host: str) -> list[str]:
    """What the operator must hear at start (the ingress logs the first kind too, less visibly):
    links that follow any Host, and a server reachable beyond loopback whose links and browser
    pages work only on loopback names (the default http.allowed_hosts)."""
    from serve_app.common.config import LOOPBACK_HOSTS, HttpConfig, StorageConfig
    from serve_app.common.links import host_header_warning

    warnings = []
    for app in _applications(config):
        args = app.get("args") or {}
        name = app.get("name", "the application")
        storage = StorageConfig.model_validate(args.get("storage") or {})
        http = HttpConfig.model_validate(args.get("http") or {})
        warning = host_header_warning(storage, http)
        if warning:
            warnings.append(f"{name}: {warning}")
        loopback_only = set(http.allowed_hosts) <= set(LOOPBACK_HOSTS)
        if bind_host not in LOOPBACK_HOSTS and loopback_only and not storage.public_base_url:
            warnings.append(
                f"{name}: the server listens on {bind_host}, but response_format=url links and"
                " the browser playground's edits are served only to requests addressed to"
                " localhost (http.allowed_hosts). Add the name clients use to"
                " args.http.allowed_hosts, or set args.storage.public_base_url"
                " (docs/running.md)."
            )
    return warnings


def _with_http(config: dict[str, Any], *, host: str | None, port: int | None) -> dict[str, Any]:
    if host is None and port is None:
        return config
    http = dict(config.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return {**config, "http_options": http}


def _child_env(
    env: Mapping[str, str], config: Mapping[str, Any], *, own_cluster: bool
) -> dict[str, str]:
    child = dict(env)
    if _serves_tiny_model(config):
        # These point a config at real weights; on the tiny CPU demo they would load a
        # 20B-parameter model on CPU. They stay for the GPU configs.
        for name in (ENV_MODEL_DIR, ENV_DEVICE_MAP):
            if child.pop(name, None) is not None:
                _say(f"{name} is set; ignored: this config serves the tiny model.")
    for name, value in _RAY_DEFAULTS.items():
        child.setdefault(name, value)
    if own_cluster:
        child.update(_RAY_LOOPBACK)
        # Every process of the cluster, Serve's HTTP proxy included; a value of your own wins.
        for name, value in {**CLUSTER_ENV, **PROXY_ENV}.items():
            child.setdefault(name, value)
    return child


def _say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def _preflight(config: Mapping[str, Any], *, host: str, port: int, own_cluster: bool) -> str | None:
    """The reason the server cannot start as configured, or None."""
    if port_taken(host, port):
        owner = port_owner(port)
        held = f" by {owner}" if owner else ""
        return (
            f"port {port} on {host} is already in use{held}. Is another `make run` or server"
            " running? Stop it, or choose another port (`make run PORT=8001`, or --port)."
        )
    if own_cluster:
        cpus, gpus = node_resources()
        problems = shortfalls(demands(config), cpus=cpus, gpus=gpus)
        if problems:
            return (
                "the replicas would wait forever for resources: "
                + " ".join(problems)
                + " Pick the config for your hardware, or lower num_replicas or the"
                " ray_actor_options."
            )
    return None


class _Stop:
    """Records stop signals. A later one (not the echo of the first: `make` forwards SIGTERM
    to its child, which may already have it from a group-wide kill) asks to kill at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.first: int | None = None
        self._first_at = 0.0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self._first_at = signum, now
            self.requested.set()
        elif now - self._first_at > 1.0:
            self.forced.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.launch", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", type=Path, help="a Serve config file (serve run's format)")
    parser.add_argument("--host", help="override http_options.host")
    parser.add_argument("--port", type=int, help="override http_options.port")
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env if any)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, metavar="SECONDS")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="graceful shutdown time before the remaining processes are killed (default 30)",
    )
    args = parser.parse_args(argv)

    stop = _Stop()
    # Installed unconditionally: a launcher started in the background by a script inherits
    # SIGINT ignored, and must still stop on it.
    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)

    env_path = args.env_file or Path(".env")
    env, read = load_env_file(env_path, environ=os.environ, required=args.env_file is not None)
    if read:
        _say(f"read {', '.join(read)} from {env_path} (the environment takes precedence)")
    for name, instead in _SEED_ONLY.items():
        if name in read:
            _say(f"{name} in {env_path} is the seed server's setting; here: {instead}.")

    config = _with_http(yaml.safe_load(args.config.read_text()), host=args.host, port=args.port)
    host, port = http_address(config)
    url = client_url(host, port)
    own_cluster = not env.get("RAY_ADDRESS")
    reason = _preflight(config, host=host, port=port, own_cluster=own_cluster)
    if reason:
        _say(f"cannot start: {reason}")
        return EXIT_CONFIG
    warnings = startup_warnings(config, bind_host=host)
    for warning in warnings:
        _say(f"WARNING: {warning}")

    with tempfile.TemporaryDirectory(prefix="qwen-launch-") as tmp:
        config_path = args.config
        if args.host is not None or args.port is not None:
            config_path = Path(tmp) / args.config.name
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve_argv = [sys.executable, "-m", "ray.serve.scripts", "run", str(config_path)]
        if own_cluster:
            # Never join another Ray on this machine; every worker binds to the node IP.
            serve_argv += ["--address", "local", "--runtime-env-json", json.dumps(_RUNTIME_ENV)]
        server = ServeProcess(serve_argv, env=_child_env(env, config, own_cluster=own_cluster))
        server.start()
        return _supervise(
            server,
            stop,
            url=url,
            api_keys=_api_keys_on(config, env),
            warnings=warnings,
            demo_model=_serves_tiny_model(config),
            ready_timeout=args.ready_timeout,
            stop_timeout=args.stop_timeout,
        )


def _supervise(
    server: ServeProcess,
    stop: _Stop,
    *,
    url: str,
    api_keys: bool,
    warnings: list[str],
    demo_model: bool,
    ready_timeout: float,
    stop_timeout: float,
) -> int:
    deadline = time.monotonic() + ready_timeout
    ready = False
    while not stop.requested.is_set() and server.poll() is None:
        if not ready and _is_ready(url):
            ready = True
            banner_text = banner(url, api_keys=api_keys, warnings=warnings, demo_model=demo_model)
            print(banner_text, flush=True)
        elif not ready and time.monotonic() > deadline:
            _say(f"not ready after {ready_timeout:.0f} s; stopping.")
            break
        stop.requested.wait(1.0 if not ready else 0.5)
    if server.poll() is not None and not stop.requested.is_set():
        code = server.poll() or 1
        _say(f"serve run exited ({code}); stopping what is left of its Ray cluster.")
        server.kill()
        return code
    if stop.first is not None:
        _say(f"{signal.Signals(stop.first).name}: stopping Serve, then Ray ...")
    t0 = time.monotonic()
    graceful = server.stop(grace_s=stop_timeout, abort=stop.forced)
    how = "" if graceful else " (killed what was left)"
    _say(f"stopped in {time.monotonic() - t0:.1f} s{how}.")
    return 0 if stop.first is not None else 1
