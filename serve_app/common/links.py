"""Links and the Host they are built for, from plain config: what the operator must hear at
start (read by the ingress and, before it, the launcher) and the environment that keeps Serve's
proxy from trusting forwarded headers on its own."""

from __future__ import annotations

from serve_app.common.config import HttpConfig, StorageConfig

# For every process of a cluster (the launcher, the container image and the tests set it):
# Serve's HTTP proxy (uvicorn) would apply X-Forwarded-Proto/For from any loopback client
# itself; the ingress trusts such headers only from `http.trusted_proxies`, so the proxy none.
PROXY_ENV = {"FORWARDED_ALLOW_IPS": ""}


def host_header_warning(storage: StorageConfig, http: HttpConfig) -> str | None:
    """What to say at start when url links would follow any client's Host header."""
    if storage.public_base_url or "*" not in http.allowed_hosts:
        return None
    return (
        "http.allowed_hosts is '*' and storage.public_base_url is not set: response_format=url"
        " links are built from each request's Host header, which any client can set. Set"
        " storage.public_base_url to the address your clients use (e.g."
        " https://images.example.com), or list your host names in http.allowed_hosts."
    )
