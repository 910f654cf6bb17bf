"""API keys: `Authorization: Bearer <key>`, OpenAI's convention. Off when no key is configured."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.config import AuthConfig
from serve_app.errors import APIError, AuthenticationError, error_body


def load_api_keys(config: AuthConfig, *, environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from the env var and the key file; an unreadable key file is a startup error."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(config.api_keys_env, "").split(",")]
    if config.api_keys_file:
        for line in Path(config.api_keys_file).read_text().splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return sorted({k for k in keys if k})


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
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        candidate = presented.strip().encode()
        # Compare against every key without stopping early, in constant time per key.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthenticationError("Incorrect API key provided.")


class RequireApiKey:
    """ASGI middleware: every HTTP route but `open_paths` needs a valid key."""

    def __init__(self, app: ASGIApp, *, checker: ApiKeyChecker, open_paths: list[str]) -> None:
        self.app = app
        self.checker = checker
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The path below the app's route prefix, as the router sees it.
        if scope["type"] == "http" and get_route_path(scope) not in self.open_paths:
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"authorization")
            try:
                self.checker.check(raw.decode("latin-1") if raw is not None else None)
            except APIError as err:
                from starlette.responses import JSONResponse

                response = JSONResponse(
                    error_body(err),
                    status_code=err.status_code,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
