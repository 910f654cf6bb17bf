from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig, AuthConfig
from serve_app.common.errors import AuthenticationError
from serve_app.ingress.auth import ApiKeyChecker, load_api_keys, route_path
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FakeModelHandle, png_bytes

KEY = "sk-test-0123456789abcdef"


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-1\n\nfile-key-2  # ci\n")
    cfg = AuthConfig(api_keys_env="MY_KEYS", api_keys_file=str(key_file))
    keys = load_api_keys(cfg, environ={"MY_KEYS": " env-a , env-b,"})
    assert keys == ["env-a", "env-b", "file-key-1", "file-key-2"]
    assert load_api_keys(AuthConfig(), environ={}) == []


def test_seed_api_key_is_the_key_only_when_ours_is_unset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    assert load_api_keys(AuthConfig(), environ={"API_KEY": " seed-key "}) == ["seed-key"]
    assert "API_KEY" in caplog.text and "seed-key" not in caplog.text
    both = {"API_KEY": "seed-key", "QWEN_API_KEYS": "ours"}
    assert load_api_keys(AuthConfig(), environ=both) == ["ours"]
    key_file = tmp_path / "keys"
    key_file.write_text("from-file\n")
    cfg = AuthConfig(api_keys_file=str(key_file))
    assert load_api_keys(cfg, environ={"API_KEY": "seed-key"}) == ["from-file"]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_carries_the_key_as_password() -> None:
    checker = ApiKeyChecker([KEY])
    checker.check(_basic("user", KEY))
    checker.check(_basic("", KEY))
    for header in (_basic(KEY, "wrong"), _basic("user", ""), "Basic !!!", "Basic " + KEY):
        with pytest.raises(AuthenticationError):
            checker.check(header)


def test_missing_key_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_api_keys(AuthConfig(api_keys_file=str(tmp_path / "nope")), environ={})


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Basic abc", f"Bearer {KEY}x", "Bearer other"]
)
def test_checker_rejects(header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        ApiKeyChecker([KEY, "other-key"]).check(header)


def test_checker_accepts_and_is_off_without_keys() -> None:
    ApiKeyChecker([KEY, "b"]).check(f"Bearer {KEY}")
    ApiKeyChecker([KEY]).check(f"bearer   {KEY}  ")
    ApiKeyChecker([]).check(None)
    assert not ApiKeyChecker([]).enabled


def _client() -> TestClient:
    cfg = AppConfig.model_validate({"model": {"source": "tiny"}, "limits": {"min_output_side": 32}})
    service = EditService(model=FakeModelHandle(), config=cfg)
    return TestClient(create_app(service, api_keys=[KEY]))


def test_routes_need_a_key_but_probes_do_not(caplog: pytest.LogCaptureFixture) -> None:
    client = _client()
    caplog.set_level(logging.DEBUG)
    for path in ("/v1/models", "/v1/models/qwen-image-edit", "/v1/nothing"):
        resp = client.get(path)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "missing_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    ok = client.post(
        "/v1/images/edits",
        headers={"Authorization": f"Bearer {KEY}"},
        data={"prompt": "x", "size": "32x32"},
        files=[("image", ("a.png", png_bytes(), "image/png"))],
    )
    assert ok.status_code == 200
    seed_style = client.get("/v1/models", headers={"Authorization": _basic("user", KEY)})
    assert seed_style.status_code == 200
    assert KEY not in caplog.text


def test_open_paths_are_matched_below_the_route_prefix() -> None:
    assert route_path({"type": "http", "path": "/more/ready", "root_path": "/more"}) == "/ready"
    assert route_path({"type": "http", "path": "/more", "root_path": "/more"}) == "/"
    assert route_path({"type": "http", "path": "/moreready", "root_path": "/more"}) == "/moreready"
    assert route_path({"type": "http", "path": "/ready", "root_path": ""}) == "/ready"
