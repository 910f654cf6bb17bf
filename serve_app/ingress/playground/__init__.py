"""The browser playground: a static page at `/` that edits images through this server's API.

No build step and no framework: `static/` holds the page, its script and its style, served as
they are. `/playground/config.json` tells the page what it must know before a key is entered
(whether API keys are on, the server's limits); everything else it learns from the API itself
(`/ready`, `/v1/models`) and sends to `POST /v1/images/edits` like any other client.
The page and its files are answered without an API key (`PUBLIC_PATHS`); the API stays guarded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app.common.config import AppConfig, has_random_weights

PAGE_PATH = "/"
CONFIG_PATH = "/playground/config.json"
# URL path -> (file in static/, media type).
ASSETS = {
    PAGE_PATH: ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/playground.css": ("playground.css", "text/css; charset=utf-8"),
    # Browsers ask for /favicon.ico on every page of the origin (the /docs page too); an SVG
    # answered there with its own media type is shown like an .ico.
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
PUBLIC_PATHS = [*ASSETS, CONFIG_PATH]
# OpenAI's limit on partial images per streamed edit.
MAX_PARTIAL_IMAGES = 3

# The page loads nothing from elsewhere: its own files, and images it makes (blob:, data:).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load(name: str, media_type: str) -> _Asset:
    body = (resources.files(__package__) / "static" / name).read_bytes()
    return _Asset(body, media_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')


def page_config(config: AppConfig, *, auth_enabled: bool) -> dict[str, Any]:
    """What the page needs before its first API call; nothing secret (it is public)."""
    gen, limits = config.generation, config.limits
    return {
        "auth_required": auth_enabled,
        # The page warns about a random-weight model (make run's demo) before any edit: its
        # images are noise, which a newcomer would otherwise take for a broken server.
        "model_source": config.model.source,
        "random_weights": has_random_weights(config.model.source),
        "default_steps": gen.default_steps,
        "max_steps": gen.max_steps,
        "max_n": limits.max_n,
        "max_partial_images": MAX_PARTIAL_IMAGES,
        "min_output_side": limits.min_output_side,
        "max_output_side": limits.max_output_side,
        "max_output_pixels": limits.max_output_pixels,
        "max_upload_bytes": limits.max_upload_bytes,
        "max_prompt_chars": limits.max_prompt_chars,
    }


def _serve(asset: _Asset) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        # Revalidated on every load (no-cache + ETag): a new server version is seen at once.
        headers = {"ETag": asset.etag, "Cache-Control": "no-cache", **_PAGE_HEADERS}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    return endpoint


def routes(config: AppConfig, *, auth_enabled: bool) -> list[Route]:
    """The page, its files and its config. Files are read once, here (at replica start)."""
    settings = page_config(config, auth_enabled=auth_enabled)

    async def page_settings(request: Request) -> Response:
        return JSONResponse(settings, headers={"Cache-Control": "no-store"})

    return [
        *(
            Route(path, _serve(_load(name, media)), methods=["GET"])
            for path, (name, media) in ASSETS.items()
        ),
        Route(CONFIG_PATH, page_settings, methods=["GET"]),
    ]
