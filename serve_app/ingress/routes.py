"""The HTTP surface: OpenAI's routes over an `EditService`, and the FastAPI app around them.

The endpoints read their requests themselves (`forms.py`) and answer `Response`s, so FastAPI
neither validates nor serializes: it routes, and generates the OpenAPI document (`openapi.py`)
from the routes' signatures, `responses=` and `openapi_extra`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.common.errors import InvalidRequestError, MethodNotAllowedError, NotFoundError
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
from serve_app.ingress.protocol import ModelCard, ModelList
from serve_app.ingress.service import EditService
from serve_app.ingress.stored_images import ID_PATTERN


class _StoredImageRoute(APIRoute):
    """GET /v1/images/{image_id}, matching stored-image ids only: other names (edits,
    generations) stay other or unknown routes. The regex is set on the compiled route rather
    than through a custom path convertor, because Serve's HTTP proxy rebuilds every route from
    its path to name it in the access log and metrics, without this module's convertors."""

    def __init__(self, path: str, endpoint: Callable[..., Awaitable[Response]], **kw: Any):
        super().__init__(path, endpoint, **kw)
        self.path_regex = re.compile(f"^/v1/images/(?P<image_id>{ID_PATTERN})$")


def create_app(service: EditService, *, api_keys: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving the OpenAI routes over `service`."""

    config = service.config
    sites = SitePolicy(config.http, public_base_url=config.storage.public_base_url)
    auth_enabled = bool(api_keys)
    app = FastAPI(
        title=openapi.TITLE,
        version=openapi.version(),
        description=openapi.DESCRIPTION,
        openapi_tags=openapi.TAGS,
        # openapi.install serves the document and its page; no Swagger UI (a CDN's script).
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        exception_handlers={
            HTTPException: _raise_as_api_error,
            RequestValidationError: _raise_as_invalid_request,
        },
    )

    @app.post(
        "/v1/images/edits",
        summary="Edit images",
        description="OpenAI's `POST /v1/images/edits`, with the extensions marked so.",
        tags=["images"],
        responses=openapi.EDIT_RESPONSES,
        openapi_extra=openapi.EDIT_BODY,
    )
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

    async def get_image(
        image_id: Annotated[str, PathParam(description="The id in a `url` result's URL.")],
    ) -> Response:
        # With API keys on, RequireApiKey guards this route like the others (it is not in
        # auth.open_paths); the ids are unguessable either way.
        image = await asyncio.to_thread(service.image_store().get, image_id)
        max_age = max(0, int(image.expires_in_s))
        return Response(
            image.data,
            media_type=image.content_type,
            headers={"Cache-Control": f"private, max-age={max_age}"},
        )

    app.router.add_api_route(
        "/v1/images/{image_id}",
        get_image,
        methods=["GET"],
        summary="Get a stored image",
        tags=["images"],
        response_class=Response,
        responses={
            200: {
                "description": "The image bytes, until `storage.ttl_s` after the edit.",
                "content": {f"image/{f}": {} for f in ("png", "jpeg", "webp")},
            },
            **openapi.errors(401, 404),
        },
        route_class_override=_StoredImageRoute,
    )

    @app.get(
        "/v1/models",
        summary="List models",
        tags=["models"],
        responses={200: {"model": ModelList}, **openapi.errors(401)},
    )
    async def list_models() -> Response:
        return JSONResponse((await service.list_models()).model_dump())

    @app.get(
        "/v1/models/{model_id:path}",
        summary="Get a model",
        tags=["models"],
        responses={200: {"model": ModelCard}, **openapi.errors(401, 404)},
    )
    async def get_model(
        model_id: Annotated[str, PathParam(description="A model id from `GET /v1/models`.")],
    ) -> Response:
        for card in (await service.list_models()).data:
            if card.id == model_id:
                return JSONResponse(card.model_dump())
        raise NotFoundError(f"The model '{model_id}' does not exist.")

    @app.get("/health", summary="Liveness", tags=["operations"], openapi_extra=openapi.PUBLIC)
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get(
        "/ready",
        summary="Readiness",
        description="A model replica is loaded: pipeline, variant, placement.",
        tags=["operations"],
        responses={503: {"model": openapi.Error, "description": "Not ready."}},
        openapi_extra=openapi.PUBLIC,
    )
    async def ready() -> Response:
        return JSONResponse(await service.ready())

    # What a person opens: the browser playground and the API description (openapi.install).
    for route in playground.routes(config, auth_enabled=auth_enabled):
        app.add_api_route(
            route.path,
            route.endpoint,
            methods=["GET"],
            summary=f"Playground: {route.path}",
            tags=["playground"],
            response_class=Response,
            openapi_extra=openapi.PUBLIC,
        )
    openapi.install(app, config, auth_enabled=auth_enabled)
    app.user_middleware = [
        Middleware(RequestMetrics, metrics=service.metrics, routes=app.routes),
        Middleware(RequestId),
        Middleware(OpenAIErrors, retry_after_s=config.retry_after_s),
        Middleware(HeaderSizeLimit, max_bytes=config.limits.max_header_bytes),
        Middleware(RefuseCrossSite, policy=sites),
        Middleware(
            RequireApiKey,
            checker=ApiKeyChecker(api_keys or []),
            # The page and the API description are public; the API they describe is not.
            open_paths=[*config.auth.open_paths, *playground.PUBLIC_PATHS, *openapi.PUBLIC_PATHS],
        ),
        Middleware(BodySizeLimit, max_bytes=config.limits.max_upload_bytes),
        Middleware(
            BodyTimeout,
            stall_s=config.upload_stall_timeout_s,
            deadline_s=min(config.upload_timeout_s, config.request_timeout_s),
        ),
    ]
    return app


async def _raise_as_invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's checks of a route's parameters answer 422 in their own shape: raised on as
    OpenAI's 400 naming the parameter (the routes take strings; this is the net under them)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ())]
    raise InvalidRequestError(
        str(first.get("msg", "Invalid request.")), param=loc[-1] if loc else None
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
