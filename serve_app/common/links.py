"""Links and the Host they are built for, from plain config: what the operator must hear at
start (read by the ingress and, before it, the launcher) and the environment that keeps Serve's
proxy from trusting forwarded headers on its own."""

from __future__ import annotations

from serve_app.common.config import HttpConfig, StorageConfig

# Serve's hook for middleware in every HTTP proxy: an import path Serve calls in the proxy.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# For every process of a cluster (the launcher, the container image, the manifests and the tests
# set it), read by Serve's HTTP proxy when it starts:
# - FORWARDED_ALLOW_IPS: uvicorn would apply X-Forwarded-Proto/For from any loopback client
#   itself; the ingress trusts such headers only from `http.trusted_proxies`, so the proxy none;
# - the proxy's own error answers (a lost ingress replica, its queue full, its timeout) as
#   OpenAI error JSON with Retry-After instead of plain text (serve_app.ingress.proxy_errors;
#   a string here: the proxy imports it, this layer does not).
PROXY_ENV = {
    "FORWARDED_ALLOW_IPS": "",
    PROXY_CALLBACK_ENV: "serve_app.ingress.proxy_errors:proxy_middlewares",
}


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
