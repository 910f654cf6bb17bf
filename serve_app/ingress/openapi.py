"""`GET /openapi.json` and `GET /docs`: the OpenAPI 3.1 document FastAPI generates from the routes
of `routes.py` and the protocol's pydantic models, completed with what it cannot see.

- The edit's multipart body: `forms.py` reads it (FastAPI's own form parsing would answer 422s,
  not OpenAI's 400s naming the field), so `/v1/images/edits` describes it through
  `openapi_extra` (`EDIT_BODY`), its schema built from `EditParams` and this server's limits.
- The SSE events of `stream=true` and OpenAI's error shape, as pydantic models.
- API keys: the security schemes, and `security: []` on the routes answered without one
  (`PUBLIC`; `PUBLIC_PATHS` here: they describe the API, they do not use it).

`/docs` is the document drawn as one plain page on the server (`openapi_page`), not Swagger UI,
whose script comes from a CDN that a server without internet cannot reach.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema
from starlette.responses import HTMLResponse, Response

from serve_app.common.config import AppConfig, has_random_weights
from serve_app.ingress.openapi_page import MODEL_SOURCE_KEY, RANDOM_WEIGHTS_KEY, render_page
from serve_app.ingress.protocol import (
    IMAGE_FIELDS,
    MASK_FIELD,
    EditParams,
    ImagesResponse,
    OutputFormat,
    Usage,
)

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
PUBLIC_PATHS = [OPENAPI_PATH, DOCS_PATH]
# openapi_extra of a route answered without an API key.
PUBLIC: dict[str, Any] = {"security": []}
TITLE = "qwen-image-edit-serve"
DESCRIPTION = (
    "Qwen-Image-Edit behind the OpenAI Images API. The official `openai` clients work unchanged"
    ' (base URL `<server>/v1`). Every error is `{"error": {"message", "type", "param", "code"}}`.'
)
TAGS = [
    {"name": "images", "description": "OpenAI Images API"},
    {"name": "models", "description": "OpenAI Models API"},
    {"name": "operations", "description": "Probes"},
    {"name": "documentation", "description": "This description"},
    {"name": "playground", "description": "The browser playground"},
]
_REF = "#/components/schemas/{model}"

# What each form field of an edit means (the protocol model holds its type and bounds).
FIELD_DOCS = {
    "prompt": "What to change. Required, at most `limits.max_prompt_chars` characters.",
    "model": "A served model name or a configured LoRA's name; default: the first served name.",
    "n": "How many images (image *i* uses `seed + i`). Must be 1 with `stream=true`.",
    "size": (
        "`auto` (the first image's aspect ratio at about `generation.auto_size_pixels`) or"
        " `WIDTHxHEIGHT`, rounded to multiples of 16; the response's `size` is exact."
    ),
    "response_format": "`b64_json` (inline) or `url` (a link to `GET /v1/images/{image_id}`).",
    "output_format": "Encoding of the returned images.",
    "output_compression": "JPEG/WebP quality, or the PNG zlib level (0-100 maps to 0-9).",
    "quality": "Accepted and echoed.",
    "background": "`transparent` is refused (400): the model paints opaque images.",
    "input_fidelity": "Accepted and ignored.",
    "stream": "Answer Server-Sent Events: `partial_images` previews, then the image.",
    "partial_images": "Previews sent while denoising when `stream=true` (0-3).",
    "user": "Accepted and ignored.",
    "negative_prompt": (
        "Extension. True CFG runs when it is set and `true_cfg_scale > 1` (two transformer"
        " passes per step); default: the server's `generation.negative_prompt`."
    ),
    "true_cfg_scale": "Extension. Classifier-free guidance scale; default: the model's.",
    "num_inference_steps": "Extension. Denoising steps; default: the model's.",
    "seed": (
        "Extension. Image *i* uses `seed + i`; the same seed and inputs give the same bytes on"
        " the same hardware. Default: random (returned as `data[i].seed` where supported)."
    ),
}
_FILE = {"type": "string", "contentMediaType": "application/octet-stream"}
_IMAGE_DOC = (
    "The image to edit (PNG, JPEG or WebP, judged by content); repeat the field for several"
    " images: the first is edited, the others are references. Required, in one of the four"
    " spellings: `image`, `image[]` (the official clients'), `images`, `images[]` (the seed"
    " server's, docs/migrating.md)."
)
_MASK_DOC = (
    "PNG/WebP with alpha, the size of the first image: fully transparent pixels are repainted,"
    " the rest is kept. One input image only."
)


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(description="The field at fault.")
    code: str | None = Field(examples=["invalid_value"])


class Error(BaseModel):
    """OpenAI's error shape; all four keys are always present."""

    error: ErrorDetail


class _ImageEvent(BaseModel):
    b64_json: str
    created_at: int
    size: str = Field(examples=["1024x1024"])
    quality: str
    background: str
    output_format: OutputFormat


class ImageEditPartialImageEvent(_ImageEvent):
    """SSE `event: image_edit.partial_image`: a preview while denoising."""

    type: Literal["image_edit.partial_image"]
    partial_image_index: int = Field(ge=0)


class ImageEditCompletedEvent(_ImageEvent):
    """SSE `event: image_edit.completed`: the final image, last event."""

    type: Literal["image_edit.completed"]
    usage: Usage
    seed: int | None = Field(default=None, description="Extension: the seed used, where returned.")


class ErrorEvent(BaseModel):
    """SSE `event: error`: the edit failed after the stream started."""

    type: Literal["error"]
    error: ErrorDetail


EVENTS = (ImageEditPartialImageEvent, ImageEditCompletedEvent, ErrorEvent)

_ERRORS: dict[int | str, str] = {
    400: "Invalid request; `param` names the field.",
    401: "API keys are on and the key is missing or wrong.",
    403: "A browser page on another site sent it (`cross_site_request`; `http.allowed_origins`).",
    404: "Unknown route, model or image.",
    408: "The body stalled, or was not all in within `upload_timeout_s`.",
    413: "The body is larger than `limits.max_upload_bytes`.",
    415: "The Content-Type's `charset` is no ASCII-compatible text encoding.",
    431: "The request headers together are larger than `limits.max_header_bytes`.",
    503: "The model queue is full or a replica died; retry after `Retry-After` seconds.",
    504: "The edit passed `request_timeout_s`.",
    # Also keeps FastAPI from listing its 422, which this API never answers (its 400s instead).
    "default": "Any other error (405 with `Allow`, 500 with no traceback), in the same shape.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route: these statuses and the default, each an `Error`."""
    keys: list[int | str] = [*statuses, "default"]
    return {s: {"model": Error, "description": _ERRORS[s]} for s in keys}


# `responses=` of the edit: JSON, or with `stream=true` Server-Sent Events.
EDIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": ImagesResponse,
        "description": "The edited images (JSON), or with `stream=true` Server-Sent Events.",
        "headers": {
            "Server-Timing": {
                "description": "Where the time went, per stage in ms (not on streams).",
                "schema": {"type": "string"},
            }
        },
        "content": {
            "text/event-stream": {
                "schema": {
                    "oneOf": [{"$ref": _REF.format(model=e.__name__)} for e in EVENTS],
                    "description": "Each SSE `data:` line is one of these JSON objects.",
                }
            }
        },
    },
    **errors(400, 401, 403, 408, 413, 415, 431, 503, 504),
}
# `openapi_extra` of the edit: its body, read by forms.py.
EDIT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"$ref": _REF.format(model="ImageEditRequest")},
                "encoding": {
                    **{
                        name: {"contentType": "image/png, image/jpeg, image/webp"}
                        for name in IMAGE_FIELDS
                    },
                    MASK_FIELD: {"contentType": "image/png, image/webp"},
                },
            }
        },
    }
}


def _strip_nulls(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field is absent or has a value: `anyOf [X, null]` with `default: null` -> X."""
    options = [o for o in schema.pop("anyOf", []) if o != {"type": "null"}]
    if len(options) == 1:
        schema.update(options[0])
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    schema.pop("title", None)
    return schema


def edit_form_schema(config: AppConfig) -> dict[str, Any]:
    """The multipart body: the file fields, then EditParams' fields with this server's bounds."""
    params = EditParams.model_json_schema()
    fields = {name: _strip_nulls(field) for name, field in params["properties"].items()}
    for name, field in fields.items():
        field["description"] = FIELD_DOCS[name]
    fields["size"] = {  # parsed from `auto` or `WIDTHxHEIGHT`
        "type": "string",
        "examples": ["auto", "1024x1024"],
        "description": FIELD_DOCS["size"],
    }
    fields["model"]["enum"] = list(config.model.model_ids)
    fields["n"]["maximum"] = config.limits.max_n
    fields["prompt"]["maxLength"] = config.limits.max_prompt_chars
    fields["num_inference_steps"]["maximum"] = config.generation.max_steps
    files: dict[str, Any] = {
        name: {"description": _IMAGE_DOC, "type": "array", "items": _FILE, "minItems": 1}
        if name.endswith("[]")
        else {"description": _IMAGE_DOC, "oneOf": [_FILE, {"type": "array", "items": _FILE}]}
        for name in IMAGE_FIELDS
    }
    return {
        "type": "object",
        "required": params["required"],
        "anyOf": [{"required": [name]} for name in IMAGE_FIELDS],  # one spelling carries them
        "properties": {**files, MASK_FIELD: {**_FILE, "description": _MASK_DOC}, **fields},
    }


def version() -> str:
    try:
        return metadata.version("qwen-image-edit-serve")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "0.0.0"


def _complete(doc: dict[str, Any], config: AppConfig, *, auth_enabled: bool) -> None:
    """Add to FastAPI's document what its routes do not tell it."""
    doc["info"][MODEL_SOURCE_KEY] = config.model.source
    doc["info"][RANDOM_WEIGHTS_KEY] = has_random_weights(config.model.source)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, events = models_json_schema([(e, "serialization") for e in EVENTS], ref_template=_REF)
    for name, schema in events["$defs"].items():
        schemas.setdefault(name, schema)
    schemas["ImageEditRequest"] = edit_form_schema(config)
    doc["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `QWEN_API_KEYS` or `auth.api_keys_file`.",
        },
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "The same key as the password, any user name.",
        },
    }
    if auth_enabled:
        doc["security"] = [{"bearer": []}, {"basic": []}]  # either one


def install(app: FastAPI, config: AppConfig, *, auth_enabled: bool) -> dict[str, Any]:
    """Add `GET /openapi.json` and `GET /docs` to `app` (its last routes) and generate the
    document now, once: it is served as these bytes for the replica's life."""
    body = b""
    page = ""

    async def openapi_json() -> Response:
        return Response(body, media_type="application/json")

    async def docs() -> Response:
        return HTMLResponse(page)

    for path, endpoint, summary, media in (
        (OPENAPI_PATH, openapi_json, "OpenAPI document", "application/json"),
        (DOCS_PATH, docs, "API reference page", "text/html"),
    ):
        app.add_api_route(
            path,
            endpoint,
            methods=["GET"],
            summary=summary,
            tags=["documentation"],
            response_class=Response,
            responses={200: {"description": summary, "content": {media: {}}}},
            openapi_extra=PUBLIC,
        )
    doc = app.openapi()
    _complete(doc, config, auth_enabled=auth_enabled)
    body = json.dumps(doc, separators=(",", ":")).encode()
    page = render_page(doc)
    # Starlette's routes answer HEAD wherever they answer GET, FastAPI's do not: added now, after
    # the document, which lists GET alone.
    for route in app.routes:
        if isinstance(route, APIRoute) and route.methods and "GET" in route.methods:
            route.methods.add("HEAD")
    return doc
