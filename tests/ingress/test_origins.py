"""Which Host a link is built from, and which browser Origin may POST (`http` settings)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig, HttpConfig
from serve_app.ingress.origins import SitePolicy, parse_origin
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FakeModelHandle
from tests.ingress.test_ingress import assert_error, post_edit
from tests.ingress.test_storage import memory_url


def make_client(
    *,
    base_url: str = "http://localhost:8000",
    client: tuple[str, int] = ("127.0.0.1", 50000),
    **config: Any,
) -> tuple[TestClient, FakeModelHandle]:
    handle = FakeModelHandle()
    cfg = AppConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "limits": {"min_output_side": 32},
            "storage": {"url": memory_url(), **config.pop("storage", {})},
            **config,
        }
    )
    app = create_app(EditService(model=handle, config=cfg))
    return TestClient(app, base_url=base_url, client=client, raise_server_exceptions=False), handle


def url_of(resp: Any) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["data"][0]["url"])


def edit_url(client: TestClient, **headers: str) -> Any:
    client.headers.update(headers)
    return post_edit(client, response_format="url", size="32x32")


# --- links -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base", ["http://localhost:8000", "http://127.0.0.1", "http://[::1]:8000", "http://LocalHost"]
)
def test_loopback_hosts_get_links_by_default(base: str) -> None:
    client, _ = make_client(base_url=base)
    url = url_of(edit_url(client))
    assert url.startswith(f"{base.lower()}/v1/images/img-")


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "localhost.evil.example", "", "a/b", "[::2]"]
)
def test_a_spoofed_host_gets_no_link_and_no_edit(host: str) -> None:
    client, handle = make_client()
    resp = edit_url(client, host=host)
    err = assert_error(resp, 400, "response_format")
    assert err["code"] == "host_not_allowed" and "http.allowed_hosts" in err["message"]
    assert handle.jobs == []  # refused before the model ran
    # b64_json answers carry no link: the same Host is served.
    assert post_edit(client, size="32x32").status_code == 200


def test_a_listed_host_and_its_subdomains_get_links() -> None:
    client, _ = make_client(
        base_url="http://images.example.com", http={"allowed_hosts": [".example.com"]}
    )
    assert url_of(edit_url(client)).startswith("http://images.example.com/v1/images/")
    client.headers["host"] = "example.com"
    assert url_of(edit_url(client)).startswith("http://example.com/v1/images/")
    client.headers["host"] = "example.com.evil"
    assert edit_url(client).status_code == 400


def test_public_base_url_wins_over_any_host() -> None:
    client, _ = make_client(storage={"public_base_url": "https://img.example.com"})
    assert url_of(edit_url(client, host="evil.example")).startswith("https://img.example.com/v1/")


def test_forwarded_host_counts_only_from_a_trusted_proxy() -> None:
    forwarded = {"x-forwarded-host": "images.example.com", "x-forwarded-proto": "https"}
    http = {"allowed_hosts": ["images.example.com", "localhost"], "trusted_proxies": ["10.0.0.0/8"]}
    # From a client that is not a proxy: the headers are ignored, the Host is localhost.
    client, _ = make_client(http=http, client=("192.168.1.5", 1))
    assert url_of(edit_url(client, **forwarded)).startswith("http://localhost:8000/v1/")
    proxied, _ = make_client(http=http, client=("10.1.2.3", 1))
    assert url_of(edit_url(proxied, **forwarded)).startswith("https://images.example.com/v1/")
    # A proxy appends: the last value is its own, an earlier one the client's.
    spoofed = {**forwarded, "x-forwarded-host": "evil.example, images.example.com"}
    assert url_of(edit_url(proxied, **spoofed)).startswith("https://images.example.com/v1/")
    # The proxy passes an unlisted host on: still no link to it.
    assert edit_url(proxied, **{**forwarded, "x-forwarded-host": "evil.example"}).status_code == 400


def test_trusted_proxies_must_parse() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        HttpConfig(trusted_proxies=["proxy.example"])


def test_parse_origin_normalises() -> None:
    assert parse_origin("HTTP://LocalHost:80") == parse_origin("http://localhost")
    assert parse_origin("https://[::1]:8443").origin == "https://[::1]:8443"  # type: ignore[union-attr]
    for bad in ("null", "file://x", "http://", "http://h:99999", "javascript:alert(1)"):
        assert parse_origin(bad) is None


# --- cross-site requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "https://evil.example"},
        {"origin": "http://localhost:9999"},  # another port is another origin
        {"origin": "null"},  # a sandboxed page or a local file
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
def test_a_cross_site_post_runs_no_edit(headers: dict[str, str]) -> None:
    client, handle = make_client()
    client.headers.update(headers)
    err = assert_error(post_edit(client, size="32x32"), 403, None)
    assert err["code"] == "cross_site_request"
    assert handle.jobs == []
    # Reading is not changing: GET routes answer any page (as before).
    assert client.get("/v1/models").status_code == 200


def test_a_dns_rebinding_page_is_foreign_too() -> None:
    # evil.example resolved to this server: Origin and Host agree, but the host is not listed.
    client, handle = make_client(base_url="http://evil.example:8000")
    client.headers["origin"] = "http://evil.example:8000"
    assert assert_error(post_edit(client, size="32x32"), 403, None)["code"] == "cross_site_request"
    assert handle.jobs == []


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, SDKs
        {"origin": "http://localhost:8000"},  # the playground served by this server
        {"origin": "http://localhost:8000", "sec-fetch-site": "same-origin"},
        {"sec-fetch-site": "none"},  # typed by the user
    ],
)
def test_same_origin_and_non_browser_posts_run(headers: dict[str, str]) -> None:
    client, handle = make_client()
    client.headers.update(headers)
    assert post_edit(client, size="32x32").status_code == 200
    assert len(handle.jobs) == 1


def test_allowed_origins_and_public_base_url_are_same_site() -> None:
    client, _ = make_client(
        http={"allowed_origins": ["https://app.example.com"]},
        storage={"public_base_url": "https://images.example.com/api"},
    )
    for origin in ("https://app.example.com", "https://images.example.com"):
        client.headers["origin"] = origin
        assert post_edit(client, size="32x32").status_code == 200, origin
    client.headers["origin"] = "https://other.example.com"
    assert post_edit(client, size="32x32").status_code == 403
    anyone, _ = make_client(http={"allowed_origins": ["*"]})
    anyone.headers["origin"] = "https://evil.example"
    assert post_edit(anyone, size="32x32").status_code == 200


def test_policy_only_guards_state_changing_methods() -> None:
    policy = SitePolicy(HttpConfig(), public_base_url=None)
    scope: dict[str, Any] = {
        "type": "http",
        "scheme": "http",
        "headers": [(b"host", b"localhost"), (b"origin", b"https://evil.example")],
    }
    assert policy.foreign_origin({**scope, "method": "GET"}) is None
    assert policy.foreign_origin({**scope, "method": "OPTIONS"}) is None
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert policy.foreign_origin({**scope, "method": method}) is not None
