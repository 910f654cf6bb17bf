"""compose.yaml: valid against the Compose Specification's schema, and wired as documented.

The schema is vendored (tests/deploy/compose-spec, Apache-2.0). It rejects unknown keys, so a
typo such as `reservation:` fails here instead of being ignored on a user's GPU host.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SCHEMA = Path(__file__).resolve().parent / "compose-spec" / "compose-spec.json"
SERVICE = "qwen-image-edit"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def service(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"][SERVICE]


def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))


def _defaults(value: str) -> str:
    """Compose interpolation of `${VAR:-default}` with nothing set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


@pytest.mark.parametrize(
    "path,bad",
    [
        (("deploy", "resources", "reservations"), {"device": []}),  # typo of devices
        (("healthcheck",), {"test": ["CMD", "true"], "start_periods": "1m"}),
        ((), {"gpu": "all"}),  # the key is `gpus`
    ],
)
def test_the_schema_rejects_typos(
    compose: dict[str, Any], path: tuple[str, ...], bad: dict[str, Any]
) -> None:
    broken = copy.deepcopy(compose)
    node = broken["services"][SERVICE]
    for key in path:
        node = node.setdefault(key, {})
    node.update(bad)
    assert list(_validator().iter_errors(broken))


def test_gpus_of_the_host_are_reserved(service: dict[str, Any]) -> None:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert service["init"] is True
    shm = service["shm_size"]
    assert shm.endswith("gb") and int(shm[:-2]) >= 8


def test_image_is_built_from_the_dockerfile(service: dict[str, Any]) -> None:
    build = service["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == ROOT / "deploy/Dockerfile"
    # The image is the package only (.dockerignore): config and weights come from mounts.
    assert "serve_app" in (ROOT / ".dockerignore").read_text()


def test_launcher_serves_the_mounted_config_on_the_published_port(
    service: dict[str, Any],
) -> None:
    command = service["command"]
    assert command[:3] == ["python", "-m", "serve_app.launch"]
    mounts = {m["target"]: m for m in service["volumes"]}
    config_mount = mounts[command[3]]
    assert config_mount["read_only"] is True
    config_file = ROOT / _defaults(config_mount["source"])
    config = yaml.safe_load(config_file.read_text())
    ServeDeploySchema.model_validate(config)
    port = _flag(command, "port")
    assert service["ports"] == [f"{port}:{port}"]
    assert _flag(command, "host") == "0.0.0.0"
    # docker compose stop: SIGTERM, then SIGKILL after stop_grace_period. The launcher's own
    # graceful period must end first.
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert float(_flag(command, "stop-timeout")) + 5 <= grace


def test_weights_from_the_hub_cache_or_a_host_folder(
    compose: dict[str, Any], service: dict[str, Any]
) -> None:
    mounts = {m["target"]: m for m in service["volumes"]}
    # A Hugging Face id downloads into HF_HOME, a named volume that outlives the container.
    hf_home = mounts[service["environment"]["HF_HOME"]]
    assert hf_home["type"] == "volume" and hf_home["source"] in compose["volumes"]
    # The image creates HF_HOME as the ray user, so the new volume is writable by it.
    assert (
        f"mkdir -p {service['environment']['HF_HOME']}" in (ROOT / "deploy/Dockerfile").read_text()
    )
    # A local folder: QWEN_MODEL_DIR=/models/<folder>, MODELS_DIR on the host.
    models = mounts["/models"]
    assert models["read_only"] is True and models["type"] == "bind"
    assert models["source"].startswith("${MODELS_DIR:-")
    assert service["env_file"] == [{"path": ".env", "required": False}]
    assert "QWEN_MODEL_DIR" not in service["environment"]  # .env's value reaches the launcher


def test_env_example_lists_the_compose_variables() -> None:
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used and used <= listed


class _Ready(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ready_stub() -> Iterator[HTTPServer]:
    httpd = HTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_healthcheck_passes_only_when_ready_answers_200(
    service: dict[str, Any], ready_stub: HTTPServer
) -> None:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    port = _flag(service["command"], "port")
    code = test[-1].replace(f"127.0.0.1:{port}", f"127.0.0.1:{ready_stub.server_port}")
    assert code != test[-1]  # the probe targets the port the launcher serves on

    def probe() -> int:
        return subprocess.run([sys.executable, *test[2:-1], code], capture_output=True).returncode

    _Ready.status = 503
    assert probe() != 0
    _Ready.status = 200
    assert probe() == 0
