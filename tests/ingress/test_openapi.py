"""serve_app.ingress.openapi: FastAPI's document of the app, valid OpenAPI 3.1, listing every route
the app serves, with the multipart fields, stream events and error shape it cannot infer."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Annotated, Any

import pytest
from fastapi import Path as PathParam
from openai.types import image_edit_params
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.ingress.openapi import DOCS_PATH, FIELD_DOCS, OPENAPI_PATH
from serve_app.ingress.protocol import IMAGE_FIELDS, MASK_FIELD, EditParams
from tests.fixtures import ingress_client

CONFIG: dict[str, Any] = {
    "model": {"source": "tiny", "loras": [{"name": "sketch", "path": "/nowhere"}]},
    "limits": {"max_n": 3, "max_prompt_chars": 500},
    "generation": {"default_steps": 4, "max_steps": 12},
}


def _client(*, keys: list[str] | None = None) -> TestClient:
    return ingress_client(CONFIG, api_keys=keys)


def _served_operations(app: Any) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every route the Starlette app routes to."""
    while not hasattr(app, "routes"):  # through the ASGI middleware around it
        app = app.app
    ops = set()
    for route in app.routes:
        assert isinstance(route, Route), f"undocumentable route type: {route!r}"
        for method in route.methods or ():
            if method != "HEAD":  # Starlette adds HEAD to every GET
                ops.add((method, route.path_format))
    return ops


def _documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


@pytest.mark.parametrize("keys", [None, ["sk-test"]])
def test_the_served_document_is_valid_openapi_31(keys: list[str] | None) -> None:
    doc = _client(keys=keys).get(OPENAPI_PATH).json()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any schema violation


def test_an_invalid_document_is_refused_by_the_validator() -> None:
    # The check above can fail: a path parameter left undeclared does not pass.
    doc = _client().get(OPENAPI_PATH).json()
    del doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    with pytest.raises(OpenAPIValidationError, match="model_id"):
        validate(doc)


def test_every_route_the_app_serves_is_documented_and_nothing_else() -> None:
    client = _client()
    doc = client.get(OPENAPI_PATH).json()
    assert _documented_operations(doc) == _served_operations(client.app)


def test_the_edit_body_has_every_form_field_with_this_servers_limits() -> None:
    doc = _client().get(OPENAPI_PATH).json()
    body = doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    ref = body["multipart/form-data"]["schema"]["$ref"]
    form = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    fields = form["properties"]
    # Every spelling the server reads: image, image[], and the seed server's images, images[].
    assert set(fields) == {*IMAGE_FIELDS, MASK_FIELD, *EditParams.model_fields}
    assert {"images", "images[]"} <= set(fields)
    assert set(FIELD_DOCS) == set(EditParams.model_fields)
    assert form["required"] == ["prompt"]
    assert form["anyOf"] == [{"required": [name]} for name in IMAGE_FIELDS]
    assert fields["images[]"]["type"] == "array"
    encoding = body["multipart/form-data"]["encoding"]
    assert set(encoding) == {*IMAGE_FIELDS, MASK_FIELD}
    for extension in ("negative_prompt", "true_cfg_scale", "num_inference_steps", "seed"):
        assert fields[extension]["description"].startswith("Extension.")
    assert fields["n"]["maximum"] == 3
    assert fields["num_inference_steps"]["maximum"] == 12
    assert fields["prompt"]["maxLength"] == 500
    assert fields["model"]["enum"] == ["qwen-image-edit", "sketch"]
    assert fields["seed"]["type"] == "integer"  # not "integer or null": a form field is absent
    assert fields["size"]["type"] == "string"  # `auto` or WIDTHxHEIGHT, parsed by the server


# What OpenAI's Images API sends to an edit; the openai SDK's own parameter list holds them.
OPENAI_EDIT_FIELDS = {
    *("image", "prompt", "mask", "model", "n", "size", "response_format", "output_format"),
    *("output_compression", "quality", "background", "input_fidelity", "partial_images", "user"),
}


def test_the_official_clients_fields_are_all_documented() -> None:
    assert set(image_edit_params.ImageEditParamsBase.__annotations__) >= OPENAI_EDIT_FIELDS
    doc = _client().get(OPENAPI_PATH).json()
    fields = doc["components"]["schemas"]["ImageEditRequest"]["properties"]
    assert {*OPENAI_EDIT_FIELDS, "image[]", "stream"} <= set(fields)


def test_the_response_has_the_seed_of_each_image_and_the_usage_extensions() -> None:
    schemas = _client().get(OPENAPI_PATH).json()["components"]["schemas"]
    ok = schemas["ImagesResponse"]["properties"]
    assert ok["data"]["items"]["$ref"].endswith("/ImageData")
    seed = schemas["ImageData"]["properties"]["seed"]  # data[].seed
    assert {"type": "integer"} in seed["anyOf"]
    usage = schemas["Usage"]["properties"]
    assert {"input_images", "generated_images", "processing_time_seconds"} <= set(usage)


def test_errors_have_openai_shape_and_the_stream_its_events() -> None:
    doc = _client().get(OPENAPI_PATH).json()
    schemas = doc["components"]["schemas"]
    assert schemas["Error"]["properties"]["error"]["$ref"].endswith("/ErrorDetail")
    assert schemas["ErrorDetail"]["required"] == [
        "message",
        "type",
        "param",
        "code",
    ]
    edit = doc["paths"]["/v1/images/edits"]["post"]["responses"]
    assert {"400", "401", "413", "503", "504"} <= set(edit)
    error_ref = {"$ref": "#/components/schemas/Error"}
    assert edit["400"]["content"]["application/json"]["schema"] == error_ref
    assert edit["default"]["content"]["application/json"]["schema"] == error_ref
    events = edit["200"]["content"]["text/event-stream"]["schema"]["oneOf"]
    names = [e["$ref"].rsplit("/", 1)[-1] for e in events]
    assert [schemas[n]["properties"]["type"]["const"] for n in names] == [
        "image_edit.partial_image",
        "image_edit.completed",
        "error",
    ]


def test_fastapis_validation_answers_never_leak() -> None:
    # The routes take strings, so FastAPI's parameter checks never fail on them; a typed
    # parameter would, and is answered as OpenAI's 400 naming it, not FastAPI's 422.
    client = _client()

    async def probe(count: Annotated[int, PathParam()]) -> dict[str, int]:
        return {"count": count}

    client.app.add_api_route("/v1/probe/{count}", probe, methods=["GET"])  # type: ignore[attr-defined]
    assert client.get("/v1/probe/3").json() == {"count": 3}
    resp = client.get("/v1/probe/three")
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "count"
    # ... and the document lists no 422 and none of FastAPI's validation error schemas.
    doc = _client().get(OPENAPI_PATH).json()
    assert "422" not in str([op["responses"] for i in doc["paths"].values() for op in i.values()])
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_with_keys_the_api_is_guarded_and_the_public_routes_are_open() -> None:
    client = _client(keys=["sk-test"])
    doc = client.get(OPENAPI_PATH).json()
    # A bearer key, or the same key as Basic's password (the seed server's clients).
    assert doc["security"] == [{"bearer": []}, {"basic": []}]
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "basic"}
    public = {
        path
        for path, item in doc["paths"].items()
        if all(op.get("security") == [] for op in item.values())
    }
    assert public == {
        "/",
        "/playground/app.js",
        "/playground/playground.css",
        "/playground/config.json",
        "/favicon.ico",
        "/health",
        "/ready",
        OPENAPI_PATH,
        DOCS_PATH,
    }
    for path in public - {"/ready"}:  # /ready waits on the (fake) model; it is open too
        assert client.get(path).status_code == 200, path
    for path in ("/v1/models", "/v1/models/qwen-image-edit"):
        assert client.get(path).status_code == 401, path
    assert client.post("/v1/images/edits").status_code == 401


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.ids.add(str(found["id"]))
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_docs_page_renders_every_operation_and_schema_without_scripts() -> None:
    client = _client(keys=["sk-test"])
    resp = client.get(DOCS_PATH)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    page = _Text()
    page.feed(resp.text)
    doc = client.get(OPENAPI_PATH).json()
    for item in doc["paths"].values():
        for op in item.values():
            assert op["operationId"] in page.ids
    for name in doc["components"]["schemas"]:
        assert f"schema-{name}" in page.ids
    # Every in-page link has its target; nothing is loaded from elsewhere.
    for link in page.links:
        if link.startswith("#"):
            assert link[1:] in page.ids, link
        else:
            assert not re.match(r"^[a-z]+://", link), link
    assert page.scripts == 0
    text = " ".join(page.text)
    assert "needs an API key" in text
    assert "negative_prompt" in text and "Extension." in text
