"""The launcher's settings and decisions; tests/integration/test_launch.py runs it for real."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import yaml

from serve_app.common import malloc
from serve_app.common.links import PROXY_CALLBACK_ENV
from serve_app.launch import cli as launch
from serve_app.launch.cli import banner, load_env_file

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"

# Where the code reads a variable: os.environ / env / environ .get("X"), ["X"], getenv("X"), and
# constants naming one (ENV_MODEL_DIR = "QWEN_MODEL_DIR", api_keys_env: str = "QWEN_API_KEYS").
_READS = (
    re.compile(r"""(?:environ|env|getenv)(?:\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""),
    re.compile(r"""^\s*\w*(?:ENV|env)\w*\s*(?::\s*str)?\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M),
)


def test_env_file_fills_in_what_the_environment_lacks(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# a comment\nQWEN_MODEL_DIR=/from/file\nDEVICE_MAP=balanced\n"
        'QWEN_API_KEYS="k1,k2"\nexport HF_HOME=/hf\nEMPTY=\nBARE\n'
    )
    env, read = load_env_file(env_file, environ={"DEVICE_MAP": "cuda", "PATH": "/bin"})
    assert env["DEVICE_MAP"] == "cuda"  # the environment wins
    assert env["QWEN_MODEL_DIR"] == "/from/file" and env["QWEN_API_KEYS"] == "k1,k2"
    assert env["HF_HOME"] == "/hf" and env["EMPTY"] == "" and "BARE" not in env
    assert env["PATH"] == "/bin"
    assert read == ["QWEN_MODEL_DIR", "QWEN_API_KEYS", "HF_HOME", "EMPTY"]


def test_missing_env_file_is_fine_unless_asked_for(tmp_path: Path) -> None:
    assert load_env_file(tmp_path / ".env", environ={"A": "1"}) == ({"A": "1"}, [])
    with pytest.raises(FileNotFoundError):
        load_env_file(tmp_path / "custom.env", environ={}, required=True)


def test_env_example_lists_every_variable_the_code_reads() -> None:
    read: set[str] = set()
    for path in (ROOT / "serve_app").rglob("*.py"):
        text = path.read_text()
        for pattern in _READS:
            read.update(pattern.findall(text))
    read.update(launch._RAY_DEFAULTS)  # defaults the launcher sets, which .env may change
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert {"QWEN_MODEL_DIR", "DEVICE_MAP", "QWEN_API_KEYS", "RAY_ADDRESS"} <= read
    assert read - listed == set()
    # Every line is commented out: copying the example changes nothing until edited.
    assert all(
        line.startswith("#") or not line.strip() for line in ENV_EXAMPLE.read_text().splitlines()
    )


def test_env_example_parses_as_the_launcher_reads_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    uncommented = "\n".join(
        line[2:] for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^# [A-Z_]+=", line)
    )
    env_file.write_text(uncommented)
    env, read = load_env_file(env_file, environ={})
    assert env["DEVICE_MAP"] == "balanced" and "QWEN_API_KEYS" in read


def test_banner_curl_sends_a_key_only_when_keys_are_on() -> None:
    open_banner = banner("http://127.0.0.1:8000", api_keys=False)
    assert "Authorization" not in open_banner
    keyed = banner("http://127.0.0.1:8000", api_keys=True)
    assert '-H "Authorization: Bearer $OPENAI_API_KEY"' in keyed
    assert "export OPENAI_API_KEY" in keyed
    for text in (open_banner, keyed):  # the address a person opens: the playground, the docs
        assert "Open http://127.0.0.1:8000/ in a browser" in text
        assert "The API reference: http://127.0.0.1:8000/docs" in text


def test_banner_names_the_demo_model_and_where_the_real_one_is() -> None:
    demo = banner("http://127.0.0.1:8000", api_keys=False, demo_model=True)
    assert "DEMO model: random weights, so every image it makes is noise" in demo
    assert "http://127.0.0.1:8000/docs#real-model" in demo
    assert "noise" not in banner("http://127.0.0.1:8000", api_keys=False)


def test_api_keys_on_follows_the_env_and_key_file(tmp_path: Path) -> None:
    config = {"applications": [{"args": {"model": {"source": "tiny"}}}]}
    assert not launch._api_keys_on(config, {})
    assert launch._api_keys_on(config, {"QWEN_API_KEYS": "k"})
    assert launch._api_keys_on(config, {"API_KEY": "seed"})
    custom = {"applications": [{"args": {"auth": {"api_keys_env": "MINE"}}}]}
    assert launch._api_keys_on(custom, {"MINE": "k"}) and not launch._api_keys_on(custom, {})
    unreadable = {"applications": [{"args": {"auth": {"api_keys_file": str(tmp_path / "nope")}}}]}
    assert launch._api_keys_on(unreadable, {})  # the replica will read it, or fail loudly


def test_child_env_for_the_tiny_demo_and_for_real_weights() -> None:
    local = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    real = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    env = {"QWEN_MODEL_DIR": "/m", "DEVICE_MAP": "balanced", "RAY_AUTH_MODE": "token"}
    demo = launch._child_env(env, local, own_cluster=True)
    assert "QWEN_MODEL_DIR" not in demo and "DEVICE_MAP" not in demo
    assert demo["RAY_AUTH_MODE"] == "token"  # an explicit setting wins over the default
    assert demo["RAY_USAGE_STATS_ENABLED"] == "0"
    assert demo["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # loopback node IP
    gpu = launch._child_env(env, real, own_cluster=False)
    assert gpu["QWEN_MODEL_DIR"] == "/m" and gpu["DEVICE_MAP"] == "balanced"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in gpu  # joining a cluster: its own network


def test_child_env_tunes_malloc_in_its_own_cluster_only() -> None:
    local = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    own = launch._child_env({}, local, own_cluster=True)
    assert own["GLIBC_TUNABLES"] == malloc.GLIBC_TUNABLES  # every process, Serve's proxy too
    mine = launch._child_env(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, local, own_cluster=True
    )
    assert mine["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"  # a setting of your own wins
    joined = launch._child_env({}, local, own_cluster=False)
    assert "GLIBC_TUNABLES" not in joined  # another cluster's processes are already running


def test_serves_proxy_trusts_no_forwarded_headers_in_its_own_cluster() -> None:
    local = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    assert launch._child_env({}, local, own_cluster=True)["FORWARDED_ALLOW_IPS"] == ""
    mine = launch._child_env({"FORWARDED_ALLOW_IPS": "10.0.0.1"}, local, own_cluster=True)
    assert mine["FORWARDED_ALLOW_IPS"] == "10.0.0.1"


def test_serves_proxy_answers_its_own_errors_as_json_in_its_own_cluster() -> None:
    local = yaml.safe_load((ROOT / "deploy/local.yaml").read_text())
    own = launch._child_env({}, local, own_cluster=True)
    assert own[PROXY_CALLBACK_ENV] == "serve_app.ingress.proxy_errors:proxy_middlewares"
    assert PROXY_CALLBACK_ENV not in launch._child_env({}, local, own_cluster=False)


def test_port_and_host_overrides() -> None:
    config = {"http_options": {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 300}}
    assert launch._with_http(config, host=None, port=None) is config
    moved = launch._with_http(config, host="0.0.0.0", port=9001)
    assert moved["http_options"] == {"host": "0.0.0.0", "port": 9001, "request_timeout_s": 300}
    assert config["http_options"]["port"] == 8000


def test_a_signal_echoed_within_a_second_is_not_a_second_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 100.2, 103.0])
    monkeypatch.setattr(launch.time, "monotonic", lambda: next(clock))
    stop = launch._Stop()
    stop(signal.SIGTERM, None)  # kill -TERM -- -PGID reaches the launcher ...
    stop(signal.SIGTERM, None)  # ... and make forwards its own copy: still graceful
    assert stop.requested.is_set() and not stop.forced.is_set()
    assert stop.first == signal.SIGTERM
    stop(signal.SIGINT, None)  # the user insists, seconds later
    assert stop.forced.is_set()


def test_links_that_follow_any_host_are_warned_about_loudly() -> None:
    plain = {"applications": [{"name": "a", "args": {"model": {"source": "tiny"}}}]}
    assert launch.startup_warnings(plain, bind_host="127.0.0.1") == []  # the demo stays quiet
    any_host = {"applications": [{"name": "a", "args": {"http": {"allowed_hosts": ["*"]}}}]}
    (warning,) = launch.startup_warnings(any_host, bind_host="127.0.0.1")
    assert "storage.public_base_url" in warning and "Host header" in warning
    pinned = {"applications": [{"name": "a", "args": {"http": {"allowed_hosts": ["*"]},
        "storage": {"public_base_url": "https://images.example.com"}}}]}  # fmt: skip
    assert launch.startup_warnings(pinned, bind_host="0.0.0.0") == []
    shown = banner("http://127.0.0.1:8000", api_keys=True, warnings=[warning])
    assert f"WARNING: {warning}" in shown


def test_a_server_beyond_loopback_hears_how_to_name_its_host() -> None:
    plain = {"applications": [{"name": "a", "args": {"model": {"source": "tiny"}}}]}
    (warning,) = launch.startup_warnings(plain, bind_host="0.0.0.0")
    assert "http.allowed_hosts" in warning and "0.0.0.0" in warning
    named = {"applications": [{"name": "a", "args": {"http": {
        "allowed_hosts": ["images.example.com"]}}}]}  # fmt: skip
    assert launch.startup_warnings(named, bind_host="0.0.0.0") == []
