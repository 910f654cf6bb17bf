"""Which address a request was sent to, and whether to believe it (the `http` settings).

- Links: the Host header (and X-Forwarded-Host/Proto) is chosen by the client, so a link built
  from it points wherever the client says. `response_format=url` links are built from
  `storage.public_base_url`, else from the request's own address only when its host is in
  `http.allowed_hosts`; any other Host is refused (400 `host_not_allowed`, before any model
  work). X-Forwarded-Host/Proto count only from `http.trusted_proxies`.
- Cross-site requests: without API keys, any web page could make its visitors' browsers POST
  edits here (a multipart form needs no CORS preflight). `RefuseCrossSite` answers 403
  `cross_site_request` to a state-changing request whose `Origin` is another site's (or whose
  `Sec-Fetch-Site` says cross-site), unless `http.allowed_origins` lists it. Same-origin means
  the Origin equals the request's own address on an allowed host (an unlisted Host may be a
  DNS-rebinding page) or the origin of `storage.public_base_url`. Requests without either
  header (curl, SDKs) are not browsers' and pass.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.common.config import HttpConfig
from serve_app.common.errors import ForbiddenError, InvalidRequestError

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Sec-Fetch-Site values a browser sends for a request another site's page started.
_FOREIGN_FETCH = frozenset({"cross-site", "same-site"})


@dataclass(frozen=True)
class Site:
    """scheme://host[:port], normalised: host lower-case without IPv6 brackets, port explicit."""

    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = _DEFAULT_PORTS.get(self.scheme)
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def parse_origin(value: str) -> Site | None:
    """The Site of an Origin header or a base URL; None if it is not an http(s) origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return Site(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme])


def _last(value: str) -> str:
    # Each proxy appends its own value: the last one is the trusted proxy's.
    return value.rsplit(",", 1)[-1].strip()


class SitePolicy:
    """The `http` settings applied to one request's headers."""

    def __init__(self, config: HttpConfig, *, public_base_url: str | None) -> None:
        self._any_host = "*" in config.allowed_hosts
        self._hosts = {h.lower().strip("[]") for h in config.allowed_hosts if h != "*"}
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]
        self._any_origin = "*" in config.allowed_origins
        self._origins = {
            site.origin for o in config.allowed_origins if (site := parse_origin(o)) is not None
        }
        self._public_base_url = public_base_url
        public = parse_origin(public_base_url) if public_base_url else None
        if public is not None:
            self._origins.add(public.origin)

    def host_allowed(self, host: str) -> bool:
        host = host.lower().strip("[]")
        if self._any_host or host in self._hosts:
            return True
        return any(h.startswith(".") and (host.endswith(h) or host == h[1:]) for h in self._hosts)

    def _from_proxy(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not self._proxies or not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self._proxies)

    def request_site(self, scope: Scope) -> Site | None:
        """The address the client sent this request to, as far as it is to be believed; None
        when the Host header is missing or malformed."""
        headers = Headers(scope=scope)
        scheme = str(scope.get("scheme", "http")).lower()
        host = headers.get("host", "")
        if self._from_proxy(scope):
            proto = _last(headers.get("x-forwarded-proto", "")).lower()
            scheme = proto if proto in _DEFAULT_PORTS else scheme
            host = _last(headers.get("x-forwarded-host", "")) or host
        if scheme not in _DEFAULT_PORTS:
            return None
        return parse_origin(f"{scheme}://{host}") if host and "/" not in host else None

    def link_base(self, scope: Scope) -> str:
        """The prefix of `response_format=url` links, or a 400 when the Host is not trusted."""
        if self._public_base_url:
            return self._public_base_url
        site = self.request_site(scope)
        if site is None or not self.host_allowed(site.host):
            shown = site.host if site is not None else Headers(scope=scope).get("host", "")
            raise InvalidRequestError(
                f"response_format=url links are not built for the host {shown[:80]!r}: it is"
                " not in this server's http.allowed_hosts and storage.public_base_url is not"
                " set. Use response_format=b64_json, or ask the operator to set one of them.",
                param="response_format",
                code="host_not_allowed",
            )
        return site.origin + str(scope.get("root_path", ""))

    def foreign_origin(self, scope: Scope) -> str | None:
        """Why a browser request is refused as cross-site, or None when it may run."""
        if scope.get("method") not in _STATE_CHANGING or self._any_origin:
            return None
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            fetch_site = headers.get("sec-fetch-site", "").lower()
            return f"Sec-Fetch-Site: {fetch_site}" if fetch_site in _FOREIGN_FETCH else None
        site = parse_origin(origin)
        if site is None:  # "null" (a sandboxed page, a file), or not http(s)
            return f"Origin {origin[:80]!r}"
        if site.origin in self._origins:
            return None
        own = self.request_site(scope)
        if own is not None and own == site and self.host_allowed(own.host):
            return None
        return f"Origin {site.origin!r}"


class RefuseCrossSite:
    """ASGI middleware: 403 `cross_site_request` for a browser's state-changing request from
    another site (`SitePolicy.foreign_origin`), before any body is read."""

    def __init__(self, app: ASGIApp, *, policy: SitePolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            foreign = self.policy.foreign_origin(scope)
            if foreign is not None:
                raise ForbiddenError(
                    f"Cross-site request refused ({foreign}): this server takes edits from web"
                    " pages on its own address, or on origins listed in http.allowed_origins.",
                    code="cross_site_request",
                )
        await self.app(scope, receive, send)
