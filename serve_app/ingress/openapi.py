"""`GET /openapi.json`: this server's API as an OpenAPI 3.1 document, and `GET /docs`, its page.

The request fields and response bodies come from the protocol's pydantic models (JSON Schema
2020-12, which OpenAPI 3.1 uses as is), specialised to this server's configuration (its model
names and limits); the routes, statuses and stream events are described here. Both routes are
answered without an API key (`PUBLIC_PATHS`): they describe the API, they do not use it.
tests/ingress/test_openapi.py checks the document against the OpenAPI 3.1 schema and against the
routes the app really serves.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import metadata
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from serve_app.common.config import AppConfig, has_random_weights
from serve_app.ingress import playground
from serve_app.ingress.openapi_page import MODEL_SOURCE_KEY, RANDOM_WEIGHTS_KEY, render_page
from serve_app.ingress.protocol import (
    IMAGE_FIELDS,
    MASK_FIELD,
    EditParams,
    ImagesResponse,
    ModelList,
)

OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
PUBLIC_PATHS = [OPENAPI_PATH, DOCS_PATH]

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
# The file fields, by name (protocol.IMAGE_FIELDS: `images` / `images[]` are the seed server's
# spelling of the same field, docs/migrating.md).
_IMAGE_DOCS = {
    "image": (
        "The image to edit (PNG, JPEG or WebP, judged by content); repeat the field for several"
        " images. The first is edited, the others are references. Required, in this field or"
        " one of its spellings (`image[]`, `images`, `images[]`)."
    ),
    "image[]": "Several images, as the official clients send them (or repeat `image`).",
    "images": "The seed server's spelling of `image`; the same field.",
    "images[]": "The seed server's spelling of `image[]`; the same field.",
}
_MASK_DOC = (
    "PNG/WebP with alpha, the size of the first image: fully transparent pixels are repainted,"
    " the rest is kept. One input image only."
)
_IMAGE_TYPES = "image/png, image/jpeg, image/webp"


def _file_fields() -> dict[str, Any]:
    """The multipart file fields: a name with `[]` is an array, a bare one a file or several."""
    fields: dict[str, Any] = {}
    for name in IMAGE_FIELDS:
        array = {"type": "array", "items": _FILE, "minItems": 1}
        shape = array if name.endswith("[]") else {"oneOf": [_FILE, array]}
        fields[name] = {"description": _IMAGE_DOCS[name], **shape}
    fields[MASK_FIELD] = {**_FILE, "description": _MASK_DOC}
    return fields


_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's error shape; all four keys are always present.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "examples": ["invalid_request_error"]},
                "param": {"type": ["string", "null"], "description": "The field at fault."},
                "code": {"type": ["string", "null"], "examples": ["invalid_value"]},
            },
        }
    },
}

_EVENT_COMMON: dict[str, Any] = {
    "created_at": {"type": "integer"},
    "size": {"type": "string", "examples": ["1024x1024"]},
    "quality": {"type": "string"},
    "background": {"type": "string"},
    "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
    "b64_json": {"type": "string", "contentEncoding": "base64"},
}
_EVENTS: dict[str, Any] = {
    "ImageEditPartialImageEvent": {
        "type": "object",
        "description": "SSE `event: image_edit.partial_image`: a preview while denoising.",
        "required": ["type", "b64_json", "partial_image_index"],
        "properties": {
            "type": {"const": "image_edit.partial_image"},
            "partial_image_index": {"type": "integer", "minimum": 0},
            **_EVENT_COMMON,
        },
    },
    "ImageEditCompletedEvent": {
        "type": "object",
        "description": "SSE `event: image_edit.completed`: the final image, last event.",
        "required": ["type", "b64_json"],
        "properties": {
            "type": {"const": "image_edit.completed"},
            "usage": {"$ref": _REF.format(model="Usage")},
            "seed": {"type": "integer", "description": "Extension: the seed used, where returned."},
            **_EVENT_COMMON,
        },
    },
    "ErrorEvent": {
        "type": "object",
        "description": "SSE `event: error`: the edit failed after the stream started.",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": _ERROR_SCHEMA["properties"]["error"],
        },
    },
}

_FORMATS = ("png", "jpeg", "webp")
_PLAIN_OBJECT = {"type": "object", "additionalProperties": True}

# status -> (description, extra headers)
_ERRORS: dict[str, str] = {
    "400": "Invalid request; `param` names the field.",
    "401": "API keys are on and the key is missing or wrong.",
    "403": "A browser page on another site sent it (`cross_site_request`; `http.allowed_origins`).",
    "404": "Unknown route, model or image.",
    "405": "Method not allowed; the `Allow` header lists the route's methods.",
    "408": "The body stalled, or was not all in within `upload_timeout_s`.",
    "413": "The body is larger than `limits.max_upload_bytes`.",
    "415": "The Content-Type's `charset` is no ASCII-compatible text encoding.",
    "431": "The request headers together are larger than `limits.max_header_bytes`.",
    "500": "Internal failure (no traceback reaches the client).",
    "503": "The model queue is full or a replica died; retry after `Retry-After` seconds.",
    "504": "The edit passed `request_timeout_s`.",
}


def _strip_nulls(schema: dict[str, Any]) -> dict[str, Any]:
    """A form field is absent or has a value: `anyOf [X, null]` with `default: null` -> X."""
    options = schema.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != {"type": "null"}]
        if len(kept) == 1:
            schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, **kept[0]}
    if schema.get("default", 0) is None:
        schema = {k: v for k, v in schema.items() if k != "default"}
    return schema


def _model_schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (EditParams, "validation"),
        (ImagesResponse, "serialization"),
        (ModelList, "serialization"),
    ]
    _, schema = models_json_schema(models, ref_template=_REF)
    schemas = dict(schema["$defs"])
    # Edit responses are written without null fields (`images_response_json`).
    for name in ("ImagesResponse", "ImageData"):
        props = schemas[name]["properties"]
        schemas[name]["properties"] = {k: _strip_nulls(v) for k, v in props.items()}
    return schemas


def _edit_form_schema(params: dict[str, Any], config: AppConfig) -> dict[str, Any]:
    """The multipart body: the image fields, then EditParams' fields with this server's bounds."""
    fields = {name: _strip_nulls(field) for name, field in params["properties"].items()}
    for name, field in fields.items():
        field.pop("title", None)
        if name in FIELD_DOCS:
            field["description"] = FIELD_DOCS[name]
    fields["model"]["enum"] = list(config.model.model_ids)
    fields["n"]["maximum"] = config.limits.max_n
    fields["prompt"]["maxLength"] = config.limits.max_prompt_chars
    fields["num_inference_steps"]["maximum"] = config.generation.max_steps
    return {
        "type": "object",
        "required": params.get("required", []),
        # One of the image field's spellings carries the image(s).
        "anyOf": [{"required": [name]} for name in IMAGE_FIELDS],
        "properties": {**_file_fields(), **fields},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    schema = {"$ref": _REF.format(model=ref)}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict[str, Any]:
    error = {"$ref": "#/components/responses/Error"}
    return {status: {**error, "description": _ERRORS[status]} for status in statuses}


def _operation(
    summary: str,
    responses: dict[str, Any],
    *,
    tag: str,
    public: bool = False,
    description: str | None = None,
    parameters: list[dict[str, Any]] | None = None,
    request_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if request_body:
        op["requestBody"] = request_body
    if public:
        op["security"] = []  # open even when API keys are on
    op["operationId"] = re.sub(r"\W+", "_", summary.lower()).strip("_")
    return op


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _page(media_type: str, description: str) -> dict[str, Any]:
    return {"200": {"description": description, "content": {media_type: {"schema": _FILE}}}}


def _paths() -> dict[str, Any]:
    stream_schema = {
        "oneOf": [{"$ref": _REF.format(model=name)} for name in _EVENTS],
        "description": "Each SSE `data:` line is one of these JSON objects.",
    }
    edit_ok = {
        "description": (
            "The edited images (JSON), or with `stream=true` a stream of Server-Sent Events."
        ),
        "headers": {
            "Server-Timing": {
                "description": "Where the time went, per stage in ms (not on streams).",
                "schema": {"type": "string"},
            },
            "x-request-id": {"$ref": "#/components/headers/RequestId"},
        },
        "content": {
            "application/json": {"schema": {"$ref": _REF.format(model="ImagesResponse")}},
            "text/event-stream": {"schema": stream_schema},
        },
    }
    image_id = _path_param("image_id", "The id in a `response_format=url` result's URL.")
    model_id = _path_param("model_id", "A model id from `GET /v1/models`.")
    return {
        "/v1/images/edits": {
            "post": _operation(
                "Edit images",
                {
                    "200": edit_ok,
                    **_errors("400", "401", "403", "408", "413", "415", "431", "500", "503", "504"),
                },
                tag="images",
                description="OpenAI's `POST /v1/images/edits`, with the extensions marked so.",
                request_body={
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {"$ref": _REF.format(model="ImageEditRequest")},
                            "encoding": {
                                **{name: {"contentType": _IMAGE_TYPES} for name in IMAGE_FIELDS},
                                MASK_FIELD: {"contentType": "image/png, image/webp"},
                            },
                        }
                    },
                },
            )
        },
        "/v1/images/{image_id}": {
            "get": _operation(
                "Get a stored image",
                {
                    "200": {
                        "description": "The image bytes, until `storage.ttl_s` after the edit.",
                        "content": {f"image/{f}": {"schema": _FILE} for f in _FORMATS},
                    },
                    **_errors("401", "404"),
                },
                tag="images",
                parameters=[image_id],
            )
        },
        "/v1/models": {
            "get": _operation(
                "List models",
                {"200": _json("ModelList", "The served models and LORAs."), **_errors("401")},
                tag="models",
            )
        },
        "/v1/models/{model_id}": {
            "get": _operation(
                "Get a model",
                {"200": _json("ModelCard", "One model."), **_errors("401", "404")},
                tag="models",
                parameters=[model_id],
            )
        },
        "/health": {
            "get": _operation(
                "Liveness",
                {"200": {"description": "The ingress answers.", "content": _any_json()}},
                tag="operations",
                public=True,
            )
        },
        "/ready": {
            "get": _operation(
                "Readiness",
                {
                    "200": {
                        "description": "A model replica is loaded: pipeline, variant, placement.",
                        "content": _any_json(),
                    },
                    "503": {"$ref": "#/components/responses/Error", "description": "Not ready."},
                },
                tag="operations",
                public=True,
            )
        },
        OPENAPI_PATH: {
            "get": _operation(
                "OpenAPI document",
                {"200": {"description": "This document.", "content": _any_json()}},
                tag="documentation",
                public=True,
            )
        },
        DOCS_PATH: {
            "get": _operation(
                "API reference page",
                _page("text/html", "This document as a web page."),
                tag="documentation",
                public=True,
            )
        },
    }


def _playground_paths() -> dict[str, Any]:
    media = {path: media.split(";")[0] for path, (_, media) in playground.ASSETS.items()}
    paths = {
        path: {
            "get": _operation(
                f"Playground {'page' if path == playground.PAGE_PATH else path.rsplit('/', 1)[-1]}",
                _page(media[path], "The playground's page or one of its files."),
                tag="playground",
                public=True,
            )
        }
        for path in playground.ASSETS
    }
    paths[playground.CONFIG_PATH] = {
        "get": _operation(
            "Playground settings",
            {
                "200": {
                    "description": "Whether API keys are on, and the limits the page enforces.",
                    "content": _any_json(),
                }
            },
            tag="playground",
            public=True,
        )
    }
    return paths


def _any_json(ref: str | None = None) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": ref} if ref else dict(_PLAIN_OBJECT)}}


def _version() -> str:
    try:
        return metadata.version("qwen-image-edit-serve")
    except metadata.PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "0.0.0"


def openapi_document(config: AppConfig, *, auth_enabled: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document for a server with `config`."""
    schemas = _model_schemas()
    schemas["ImageEditRequest"] = _edit_form_schema(schemas.pop("EditParams"), config)
    schemas.update(copy.deepcopy(_EVENTS))
    schemas["Error"] = copy.deepcopy(_ERROR_SCHEMA)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "qwen-image-edit-serve",
            "version": _version(),
            "description": (
                "Qwen-Image-Edit behind the OpenAI Images API. The official `openai` clients"
                " work unchanged (base URL `<server>/v1`). Every error is"
                ' `{"error": {"message", "type", "param", "code"}}`.'
            ),
            MODEL_SOURCE_KEY: config.model.source,
            RANDOM_WEIGHTS_KEY: has_random_weights(config.model.source),
        },
        "paths": {**_paths(), **_playground_paths()},
        "components": {
            "schemas": schemas,
            "responses": {
                "Error": {
                    "description": "An OpenAI error.",
                    "headers": {
                        "x-request-id": {"$ref": "#/components/headers/RequestId"},
                        "Retry-After": {
                            "description": "Seconds to wait before retrying (429 and 503).",
                            "schema": {"type": "integer"},
                        },
                    },
                    "content": _any_json(_REF.format(model="Error")),
                }
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id (the caller's, or a new one).",
                    "schema": {"type": "string"},
                }
            },
            "securitySchemes": {
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
            },
        },
        "tags": [
            {"name": "images", "description": "OpenAI Images API"},
            {"name": "models", "description": "OpenAI Models API"},
            {"name": "operations", "description": "Probes"},
            {"name": "documentation", "description": "This description"},
            {"name": "playground", "description": "The browser playground"},
        ],
    }
    if auth_enabled:
        doc["security"] = [{"bearer": []}, {"basic": []}]  # either one
    return doc


def routes(config: AppConfig, *, auth_enabled: bool) -> list[Route]:
    """`GET /openapi.json` and `GET /docs`; the document is built once, here."""
    doc = openapi_document(config, auth_enabled=auth_enabled)
    body = json.dumps(doc, separators=(",", ":")).encode()
    page = render_page(doc)

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def docs(request: Request) -> Response:
        return HTMLResponse(page)

    return [
        Route(OPENAPI_PATH, openapi_json, methods=["GET"]),
        Route(DOCS_PATH, docs, methods=["GET"]),
    ]
