"""API keys: `Authorization: Bearer <key>`, OpenAI's convention. Off when no key is configured.

For the seed server's clients (docs/migrating.md), HTTP Basic with the key as the password (any
user name) is the same key. Which keys are on: `common/api_keys.py`.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.common.errors import AuthenticationError


class ApiKeyChecker:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 unless the header carries a configured key."""
        if not self._keys:
            return
        candidate = _presented_key(authorization)
        if not candidate:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        # Compare against every key without stopping early, in constant time per key.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.")


def _presented_key(authorization: str | None) -> bytes:
    """The key in `Bearer <key>`, or the password of `Basic base64(user:key)`; b"" if none."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials.encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""


class RequireApiKey:
    """ASGI middleware: every HTTP route but `open_paths` needs a valid key (a 401
    `AuthenticationError` otherwise, which `OpenAIErrors` answers with `WWW-Authenticate`)."""

    def __init__(self, app: ASGIApp, *, checker: ApiKeyChecker, open_paths: list[str]) -> None:
        self.app = app
        self.checker = checker
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) not in self.open_paths:
            self.checker.check(Headers(scope=scope).get("authorization"))
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (Serve's route prefix, ASGI `root_path`), as the
    router matches it: "/ready" for "/more/ready" under the prefix "/more"."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return str(path)
