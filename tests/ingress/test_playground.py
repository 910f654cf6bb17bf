"""serve_app.ingress.playground: the page and its files as the ingress serves them (fake model)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

from starlette.testclient import TestClient

from serve_app.ingress.playground import ASSETS, CONFIG_PATH
from tests.fixtures import ingress_client

CONFIG: dict[str, Any] = {
    "model": {"source": "tiny"},
    "limits": {"max_n": 3, "min_output_side": 64, "max_output_side": 512},
    "generation": {"default_steps": 4, "max_steps": 12},
}


def _client(*, keys: list[str] | None = None) -> TestClient:
    return ingress_client(CONFIG, api_keys=keys)


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        for key in ("src", "href"):
            if tag in ("script", "link") and found.get(key):
                self.refs.append(str(found[key]))


def test_the_page_loads_only_its_own_files_relative_to_the_app() -> None:
    client = _client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = _Refs()
    refs.feed(page.text)
    # Relative links: the page works under a route prefix too.
    assert sorted(refs.refs) == ["favicon.ico", "playground/app.js", "playground/playground.css"]
    for ref in refs.refs:
        asset = client.get(f"/{ref}")
        assert asset.status_code == 200
        assert asset.headers["content-type"] == ASSETS[f"/{ref}"][1]
    script = client.get("/playground/app.js").text
    # Every element the script looks up exists in the page.
    wanted = set(re.findall(r'\$\("([a-z0-9-]+)"\)', script))
    assert wanted and wanted <= refs.ids, wanted - refs.ids


def test_a_strict_content_security_policy_and_revalidation() -> None:
    client = _client()
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe" not in csp
    assert page.headers["cache-control"] == "no-cache"
    again = client.get("/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_the_config_tells_the_page_whether_keys_are_on_and_the_limits() -> None:
    off = _client().get(CONFIG_PATH).json()
    assert off["auth_required"] is False
    assert (off["max_n"], off["max_steps"], off["default_steps"]) == (3, 12, 4)
    assert (off["min_output_side"], off["max_output_side"]) == (64, 512)
    on = _client(keys=["sk-x"])
    assert on.get(CONFIG_PATH).json()["auth_required"] is True


def test_the_config_says_whether_the_model_has_random_weights() -> None:
    demo = _client().get(CONFIG_PATH).json()
    assert (demo["model_source"], demo["random_weights"]) == ("tiny", True)
    real = ingress_client({**CONFIG, "model": {"source": "local", "path": "/models/x"}})
    settings = real.get(CONFIG_PATH).json()
    assert (settings["model_source"], settings["random_weights"]) == ("local", False)


def test_the_page_carries_the_demo_notice_and_the_docs_say_how_to_serve_the_real_model() -> None:
    client = _client()
    page = client.get("/").text
    # Hidden until the config says random weights (the script shows it); the text is in the page.
    assert re.search(r'<div id="demo-notice"[^>]*hidden', page)
    assert "every image it makes is noise" in page and 'href="docs#real-model"' in page
    docs = client.get("/docs").text
    assert 'id="real-model"' in docs and "serve run serve_config.yaml" in docs
    assert "every image it makes is noise" in docs


def test_the_favicon_is_served_without_a_key() -> None:
    icon = _client(keys=["sk-x"]).get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")


def test_with_keys_the_page_is_open_and_the_api_is_not() -> None:
    client = _client(keys=["sk-x"])
    for path in (*ASSETS, CONFIG_PATH):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-x"}).status_code == 200
