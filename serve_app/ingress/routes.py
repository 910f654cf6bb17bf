"""The HTTP surface: OpenAI's routes over an `EditService`, and the Starlette app around them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve_app.common.errors import MethodNotAllowedError, NotFoundError
from serve_app.common.timing import SERVER_TIMING_HEADER, StageClock, format_server_timing
from serve_app.ingress import openapi, playground
from serve_app.ingress.auth import ApiKeyChecker, RequireApiKey
from serve_app.ingress.errors_http import to_api_error
from serve_app.ingress.forms import read_edit_form
from serve_app.ingress.middleware import (
    BodySizeLimit,
    BodyTimeout,
    HeaderSizeLimit,
    OpenAIErrors,
    RequestId,
    RequestMetrics,
    request_id_of,
)
from serve_app.ingress.origins import RefuseCrossSite, SitePolicy
from serve_app.ingress.service import EditService
from serve_app.ingress.stored_images import ID_PATTERN


class _StoredImageRoute(Route):
    """GET /v1/images/{image_id}, matching stored-image ids only: other names (edits,
    generations) stay other or unknown routes. The regex is set on the compiled route rather
    than through a custom path convertor, because Serve's HTTP proxy rebuilds every route from
    its path to name it in the access log and metrics, without this module's convertors."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        super().__init__("/v1/images/{image_id}", endpoint, methods=["GET"])
        self.path_regex = re.compile(f"^/v1/images/(?P<image_id>{ID_PATTERN})$")


def create_app(service: EditService, *, api_keys: list[str] | None = None) -> Starlette:
    """The Starlette app serving the OpenAI routes over `service`."""

    config = service.config
    sites = SitePolicy(config.http, public_base_url=config.storage.public_base_url)

    async def images_edits(request: Request) -> Response:
        timing = StageClock()
        with timing.measure("parse"):
            form = await read_edit_form(request)
        result = await service.edit(
            form,
            request_id=request_id_of(request.scope),
            link_base=lambda: sites.link_base(request.scope),
            timing=timing,
        )
        if isinstance(result, bytes):
            # Rendered in the worker thread: a multi-MB body never blocks the event loop.
            timing.add("total", timing.elapsed())
            return Response(
                result,
                media_type="application/json",
                headers={SERVER_TIMING_HEADER: format_server_timing(timing.stages)},
            )
        return StreamingResponse(
            result,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def get_image(request: Request) -> Response:
        # With API keys on, RequireApiKey guards this route like the others (it is not in
        # auth.open_paths); the ids are unguessable either way.
        image_id = request.path_params["image_id"]
        image = await asyncio.to_thread(service.image_store().get, image_id)
        max_age = max(0, int(image.expires_in_s))
        return Response(
            image.data,
            media_type=image.content_type,
            headers={"Cache-Control": f"private, max-age={max_age}"},
        )

    async def list_models(request: Request) -> Response:
        return JSONResponse((await service.list_models()).model_dump())

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for card in (await service.list_models()).data:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise NotFoundError(f"The model '{model_id}' does not exist.")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        return JSONResponse(await service.ready())

    routes = [
        Route("/v1/images/edits", images_edits, methods=["POST"]),
        _StoredImageRoute(get_image),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        # What a person opens: the browser playground and the API description.
        *playground.routes(service.config, auth_enabled=bool(api_keys)),
        *openapi.routes(service.config, auth_enabled=bool(api_keys)),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestMetrics, metrics=service.metrics, routes=routes),
            Middleware(RequestId),
            Middleware(OpenAIErrors, retry_after_s=config.retry_after_s),
            Middleware(HeaderSizeLimit, max_bytes=config.limits.max_header_bytes),
            Middleware(RefuseCrossSite, policy=sites),
            Middleware(
                RequireApiKey,
                checker=ApiKeyChecker(api_keys or []),
                # The page and the API description are public; the API they describe is not.
                open_paths=[
                    *config.auth.open_paths,
                    *playground.PUBLIC_PATHS,
                    *openapi.PUBLIC_PATHS,
                ],
            ),
            Middleware(BodySizeLimit, max_bytes=config.limits.max_upload_bytes),
            Middleware(
                BodyTimeout,
                stall_s=config.upload_stall_timeout_s,
                deadline_s=min(config.upload_timeout_s, config.request_timeout_s),
            ),
        ],
        exception_handlers={HTTPException: _raise_as_api_error},
    )


async def _raise_as_api_error(request: Request, exc: Exception) -> Response:
    """Starlette's router raises 404/405 as HTTPExceptions, which its innermost middleware would
    answer in plain text: raise them on as APIErrors, for `OpenAIErrors` to answer. A 405 keeps
    the `Allow` header the route's methods give it (RFC 9110 15.5.6)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        raise NotFoundError(f"Unknown route: {request.method} {request.url.path}")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        raise MethodNotAllowedError(
            f"{request.method} is not allowed on {request.url.path}; it takes {allow}.",
            extra_headers={"Allow": allow},
        )
    raise to_api_error(exc)
