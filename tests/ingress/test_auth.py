from __future__ import annotations

import base64
import logging

import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig
from serve_app.common.errors import AuthenticationError
from serve_app.ingress.auth import ApiKeyChecker, route_path
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FakeModelHandle, png_bytes

KEY = "sk-test-0123456789abcdef"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_carries_the_key_as_password() -> None:
    checker = ApiKeyChecker([KEY])
    checker.check(_basic("user", KEY))
    checker.check(_basic("", KEY))
    for header in (_basic(KEY, "wrong"), _basic("user", ""), "Basic !!!", "Basic " + KEY):
        with pytest.raises(AuthenticationError):
            checker.check(header)


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
