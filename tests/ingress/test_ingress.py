"""The ingress over a fake model handle: parsing, validation, errors, encoding."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from serve_app.common.config import AppConfig
from serve_app.common.errors import InternalError, InvalidRequestError
from serve_app.common.timing import parse_server_timing
from serve_app.ingress.routes import create_app
from serve_app.ingress.service import EditService
from tests.fakes import FAKE_INFO, FakeModelHandle, fake_edit, png_bytes


def make_client(
    handle: FakeModelHandle | None = None, **config: Any
) -> tuple[TestClient, FakeModelHandle]:
    handle = handle or FakeModelHandle()
    cfg = AppConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "limits": {"min_output_side": 32, **config.pop("limits", {})},
            **config,
        }
    )
    app = create_app(EditService(model=handle, config=cfg))
    return TestClient(app, raise_server_exceptions=False), handle


def post_edit(
    client: TestClient, *, files: list[tuple[str, Any]] | None = None, **data: Any
) -> Any:
    if files is None:
        files = [("image", ("a.png", png_bytes(), "image/png"))]
    data.setdefault("prompt", "make it blue")
    return client.post("/v1/images/edits", data={k: str(v) for k, v in data.items()}, files=files)


def assert_error(resp: Any, status: int, param: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert body["error"]["message"]
    # Every error has a code clients can branch on (every test's error path checks it here).
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    return body["error"]


def decode(item: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def test_edit_returns_images_of_the_size_it_claims() -> None:
    client, handle = make_client()
    resp = post_edit(client, size="100x70", n=2, seed=7)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["size"] == "96x64"  # rounded to multiples of 16
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert decode(item).size == (96, 64)
    assert body["output_format"] == "png"
    assert body["usage"]["output_tokens"] == 0 and body["usage"]["input_tokens"] == 3
    job = handle.jobs[0]
    assert job.seeds == [7, 8] and job.prompt == "make it blue"
    assert job.negative_prompt == " " and job.true_cfg_scale == 4.0
    assert resp.headers["x-request-id"] == job.request_id


@pytest.mark.parametrize(
    "fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP"), ("jpg", "JPEG")]
)
def test_output_formats(fmt: str, pil: str) -> None:
    client, _ = make_client()
    resp = post_edit(client, output_format=fmt, output_compression=50, size="64x64")
    assert resp.status_code == 200, resp.text
    assert decode(resp.json()["data"][0]).format == pil


def test_image_array_and_repeated_image_fields() -> None:
    client, handle = make_client()
    two = [
        ("image[]", ("a.png", png_bytes(), "image/png")),
        ("image[]", ("b.png", png_bytes(20, 20), "image/png")),
    ]
    assert post_edit(client, files=two, size="64x64").status_code == 200
    repeated = [
        ("image", ("a.png", png_bytes(), "image/png")),
        ("image", ("b.png", png_bytes(), "image/png")),
    ]
    assert post_edit(client, files=repeated, size="64x64").status_code == 200
    assert [len(j.images) for j in handle.jobs] == [2, 2]
    assert handle.jobs[0].images[1].shape == (20, 20, 3)


def test_auto_size_follows_first_image_aspect() -> None:
    client, _ = make_client(generation={"auto_size_pixels": 128 * 128})
    resp = post_edit(client, files=[("image", ("a.png", png_bytes(200, 100), "image/png"))])
    assert resp.status_code == 200
    w, h = (int(v) for v in resp.json()["size"].split("x"))
    assert w % 16 == 0 and h % 16 == 0
    assert 1.8 <= w / h <= 2.2
    assert abs(w * h - 128 * 128) / (128 * 128) < 0.2


def test_rgba_and_grayscale_inputs_become_rgb() -> None:
    client, handle = make_client()
    for mode in ("RGBA", "L", "LA"):
        files = [("image", ("x.png", png_bytes(mode=mode), "image/png"))]
        assert post_edit(client, files=files, size="64x64").status_code == 200
    rgba, gray, _ = handle.jobs
    assert rgba.images[0].shape == (30, 40, 3)
    # Fully transparent pixels are composited onto white.
    assert rgba.images[0][0, 0].tolist() == [255, 255, 255]
    assert gray.images[0][0, 0].tolist() == [128, 128, 128]


def test_without_seed_each_image_gets_its_own_seed() -> None:
    client, handle = make_client()
    post_edit(client, n=3, size="64x64")
    seeds = handle.jobs[0].seeds
    assert len(set(seeds)) == 3


def test_extensions_reach_the_job() -> None:
    client, handle = make_client()
    post_edit(
        client, negative_prompt="blurry", true_cfg_scale=2.5, num_inference_steps=7, size="64x64"
    )
    job = handle.jobs[0]
    assert (job.negative_prompt, job.true_cfg_scale, job.num_inference_steps) == ("blurry", 2.5, 7)


@pytest.mark.parametrize(
    "data,param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"n": "0"}, "n"),
        ({"n": "5"}, "n"),  # above the configured max_n (4)
        ({"n": "999"}, "n"),  # above OpenAI's 10 too: still this server's limit in the message
        ({"n": "two"}, "n"),
        ({"size": "big"}, "size"),
        ({"size": "10x10"}, "size"),
        ({"size": "9000x9000"}, "size"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": "101"}, "output_compression"),
        ({"model": "dall-e-2"}, "model"),
        ({"response_format": "url", "stream": "true"}, "response_format"),
        ({"num_inference_steps": "1000"}, "num_inference_steps"),
        ({"true_cfg_scale": "abc"}, "true_cfg_scale"),
        ({"seed": "-1"}, "seed"),
        ({"background": "transparent"}, "background"),
        ({"stream": "true", "n": "2"}, "n"),  # streams carry one image
    ],
)
def test_bad_fields_are_400_naming_the_param(data: dict[str, str], param: str) -> None:
    client, handle = make_client()
    err = assert_error(post_edit(client, **data), 400, param)
    assert err["type"] == "invalid_request_error"
    assert handle.jobs == []


@pytest.mark.parametrize("max_n", [1, 3])
def test_n_above_the_limit_names_this_servers_limit(max_n: int) -> None:
    client, _ = make_client(limits={"max_n": max_n})
    err = assert_error(post_edit(client, n=999), 400, "n")
    assert f"between 1 and {max_n} on this server" in err["message"] and "10" not in err["message"]


def test_missing_prompt_and_missing_image() -> None:
    client, _ = make_client()
    resp = client.post("/v1/images/edits", files=[("image", ("a.png", png_bytes(), "image/png"))])
    assert assert_error(resp, 400, "prompt")["code"] == "missing_required_parameter"
    resp = client.post(
        "/v1/images/edits", data={"prompt": "x"}, files=[("other", ("a.txt", b"hi"))]
    )
    assert_error(resp, 400, "image")


def test_unreadable_image() -> None:
    client, _ = make_client()
    bad = [("image", ("a.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"))]
    assert_error(post_edit(client, files=bad), 400, "image")
    text = [("image", ("a.png", b"hello world", "image/png"))]
    assert (
        assert_error(post_edit(client, files=text), 400, "image")["code"] == "invalid_image_format"
    )
    # Several images decode concurrently; one bad one still fails the request, naming image[].
    several = [("image[]", ("a.png", png_bytes(), "image/png")), bad[0], text[0]]
    several = [("image[]", file) for _, file in several]
    assert assert_error(post_edit(client, files=several), 400, "image[]")


def test_several_images_keep_their_order() -> None:
    client, handle = make_client()
    sizes = [(40, 30), (20, 20), (33, 17)]
    files = [
        ("image[]", (f"{i}.png", png_bytes(w, h), "image/png")) for i, (w, h) in enumerate(sizes)
    ]
    assert post_edit(client, files=files, size="64x64").status_code == 200
    assert [a.shape[:2] for a in handle.jobs[0].images] == [(h, w) for w, h in sizes]


def test_too_many_images_for_the_pipeline() -> None:
    client, _ = make_client()
    files = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(4)]
    err = assert_error(post_edit(client, files=files), 400, "image[]")
    assert err["code"] == "too_many_images"


@pytest.mark.parametrize("field", ["images", "images[]"])
def test_seed_spelling_images_is_the_image_field(field: str) -> None:
    client, handle = make_client()
    one = [(field, ("a.png", png_bytes(30, 20), "image/png"))]
    resp = post_edit(client, files=one, size="64x64")
    assert resp.status_code == 200, resp.text
    two = [(field, (f"{i}.png", png_bytes(), "image/png")) for i in range(2)]
    assert post_edit(client, files=two, size="64x64").status_code == 200
    assert [len(j.images) for j in handle.jobs] == [1, 2]
    assert handle.jobs[0].images[0].shape == (20, 30, 3)


@pytest.mark.parametrize("field", ["image", "image[]", "images", "images[]"])
def test_errors_name_the_image_field_the_client_sent(field: str) -> None:
    client, handle = make_client()
    junk = [(field, ("a.png", b"hello world", "image/png"))]
    assert assert_error(post_edit(client, files=junk), 400, field)["code"] == "invalid_image_format"
    four = [(field, (f"{i}.png", png_bytes(), "image/png")) for i in range(4)]
    assert assert_error(post_edit(client, files=four), 400, field)["code"] == "too_many_images"
    as_text = client.post("/v1/images/edits", data={"prompt": "x", field: "not a file"})
    assert_error(as_text, 400, field)
    assert handle.jobs == []


def test_upload_too_large_is_413() -> None:
    client, handle = make_client(limits={"max_upload_bytes": 4096})
    big = [("image", ("a.png", png_bytes(200, 200, color=None) + b"\0" * 8000, "image/png"))]
    err = assert_error(post_edit(client, files=big), 413, None)
    assert err["type"] == "invalid_request_error"
    assert handle.jobs == []


def test_not_multipart_and_malformed_multipart() -> None:
    client, _ = make_client()
    assert_error(client.post("/v1/images/edits", json={"prompt": "x"}), 400, None)
    resp = client.post(
        "/v1/images/edits",
        content=b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert resp.status_code == 400 and "error" in resp.json()


def test_unknown_route_and_method() -> None:
    client, _ = make_client()
    assert_error(client.get("/v1/nothing"), 404, None)
    assert_error(client.get("/v1/images/edits"), 405, None)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/images/edits", {"POST"}),
        ("PUT", "/v1/images/edits", {"POST"}),
        ("POST", "/v1/models", {"GET", "HEAD"}),
        ("DELETE", "/ready", {"GET", "HEAD"}),
        ("POST", "/", {"GET", "HEAD"}),
        ("POST", "/openapi.json", {"GET", "HEAD"}),
    ],
)
def test_405_carries_allow_with_the_routes_methods(method: str, path: str, allow: set[str]) -> None:
    client, _ = make_client()
    resp = client.request(method, path)
    err = assert_error(resp, 405, None)
    assert err["code"] == "method_not_allowed" and method in err["message"]
    assert {m.strip() for m in resp.headers["allow"].split(",")} == allow


def test_model_errors_map_to_status() -> None:
    def fail(job: Any) -> Any:
        raise InvalidRequestError("bad steps", param="num_inference_steps")

    client, _ = make_client(FakeModelHandle(edit=fail))
    assert_error(post_edit(client, size="64x64"), 400, "num_inference_steps")

    def crash(job: Any) -> Any:
        raise RuntimeError("secret traceback detail")

    client, _ = make_client(FakeModelHandle(edit=crash))
    err = assert_error(post_edit(client, size="64x64"), 500, None)
    assert "secret" not in err["message"]


def test_models_health_ready() -> None:
    client, _ = make_client(model={"source": "tiny", "aliases": ["qwen-image-edit-2509"]})
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["qwen-image-edit", "qwen-image-edit-2509"]
    assert client.get("/v1/models/qwen-image-edit-2509").json()["id"] == "qwen-image-edit-2509"
    assert_error(client.get("/v1/models/nope"), 404, None)
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


@pytest.mark.parametrize(
    ("source", "random"), [("tiny", True), ("synthetic", True), ("local", False)]
)
def test_models_and_ready_say_where_the_weights_come_from(source: str, random: bool) -> None:
    info = dataclasses.replace(FAKE_INFO, source=source)
    client, _ = make_client(FakeModelHandle(info=info))
    (card,) = client.get("/v1/models").json()["data"]
    # An extension inside the OpenAI model object (clients keep unknown keys in model_extra).
    assert (card["metadata"]["source"], card["metadata"]["random_weights"]) == (source, random)
    assert client.get("/v1/models/qwen-image-edit").json()["metadata"]["random_weights"] is random
    ready = client.get("/ready").json()
    assert (ready["source"], ready["random_weights"]) == (source, random)


def test_models_say_random_weights_from_the_config_before_the_model_answers() -> None:
    client, _ = make_client(FakeModelHandle(info_error=InternalError("loading")))
    (card,) = client.get("/v1/models").json()["data"]
    assert card["metadata"]["source"] == "tiny" and card["metadata"]["random_weights"] is True


def test_ready_lists_the_placement_table_apart_from_the_speed_notes() -> None:
    info = dataclasses.replace(
        FAKE_INFO,
        placement_table="placement strategy: single\n  transformer -> cuda:0\n",
        speed_notes=["modulation: 2 projections made once per edit for all its steps"],
    )
    client, _ = make_client(FakeModelHandle(info=info))
    ready = client.get("/ready").json()
    assert ready["placement"] == ["placement strategy: single", "  transformer -> cuda:0"]
    assert ready["speed"] == info.speed_notes


def test_ready_is_503_while_the_model_does_not_answer() -> None:
    handle = FakeModelHandle(info_error=InternalError("loading"))
    client, _ = make_client(handle)
    resp = client.get("/ready")
    err = assert_error(resp, 503, None)
    assert err["code"] == "model_not_ready"
    assert "Retry-After" in resp.headers


class RecordingMetrics:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []
        self.images: list[int] = []

    def request_done(self, *, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.requests.append((route, status))

    def images_returned(self, count: int) -> None:
        self.images.append(count)


def test_metrics_record_route_status_and_images() -> None:
    metrics = RecordingMetrics()
    cfg = AppConfig.model_validate({"model": {"source": "tiny"}, "limits": {"min_output_side": 32}})
    client = TestClient(
        create_app(EditService(model=FakeModelHandle(), config=cfg, metrics=metrics))
    )
    post_edit(client, size="32x32", n=2)
    post_edit(client, size="nope")
    client.get("/health")
    assert metrics.requests == [
        ("/v1/images/edits", 200),
        ("/v1/images/edits", 400),
        ("/health", 200),
    ]
    assert metrics.images == [2]


def test_deadline_and_submit_time_are_set() -> None:
    client, handle = make_client(request_timeout_s=30)
    post_edit(client, size="32x32")
    job = handle.jobs[0]
    assert job.deadline is not None and job.submitted_at is not None
    assert 29 <= job.deadline - job.submitted_at <= 31


def test_server_timing_header_on_edits() -> None:
    def timed_edit(job: Any) -> Any:
        out = fake_edit(job)
        timings = {"queue": 0.001, "pipeline": 0.25, "denoise": 0.2, "replica": 0.26}
        return dataclasses.replace(out, timings_s=timings)

    client, _ = make_client(FakeModelHandle(edit=timed_edit))
    resp = post_edit(client, size="64x64")
    assert resp.status_code == 200, resp.text
    stages = parse_server_timing(resp.headers["server-timing"])
    assert list(stages) == [
        "parse", "decode", "model", "queue", "pipeline", "denoise", "replica", "encode", "body",
        "total",
    ]  # fmt: skip
    assert stages["pipeline"] == 250.0 and stages["replica"] == 260.0
    assert stages["total"] >= stages["parse"] + stages["decode"] + stages["encode"]
    # Errors and other routes carry none (nothing was timed that a client could use).
    assert "server-timing" not in post_edit(client, size="1x1").headers
    assert "server-timing" not in client.get("/v1/models").headers


def test_response_body_is_compact_utf8_json_as_before() -> None:
    # The body is rendered by pydantic in the worker thread; it must stay byte for byte what
    # Starlette's JSONResponse wrote (compact separators, no nulls, key order).
    client, _ = make_client()
    resp = post_edit(client, size="64x64", n=2, seed=3)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert resp.content == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert list(body) == [
        "created",
        "data",
        "output_format",
        "size",
        "quality",
        "background",
        "usage",
    ]
    assert list(body["data"][0]) == ["b64_json"]
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_streamed_edits_have_no_server_timing() -> None:
    client, _ = make_client()
    resp = post_edit(client, size="64x64", stream="true")
    assert resp.status_code == 200 and "server-timing" not in resp.headers


def test_without_a_seed_each_image_reports_the_seed_it_used() -> None:
    client, handle = make_client()
    body = post_edit(client, n=3, size="32x32").json()
    seeds = [item["seed"] for item in body["data"]]
    assert seeds == handle.jobs[0].seeds
    # Image i uses seed + i, as with a client's seed: sending back the first reproduces them all.
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    assert 0 <= seeds[0] < 2**53 - 16  # exact in every JSON parser (JavaScript too)
    again = post_edit(client, n=3, size="32x32", seed=seeds[0]).json()
    assert [item["b64_json"] for item in again["data"]] == [d["b64_json"] for d in body["data"]]
    assert all("seed" not in item for item in again["data"])  # the client knows its seed


def test_request_id_echo_and_metrics_cover_every_answer() -> None:
    metrics = RecordingMetrics()
    cfg = AppConfig.model_validate({"model": {"source": "tiny"}})
    client = TestClient(
        create_app(EditService(model=FakeModelHandle(), config=cfg, metrics=metrics))
    )
    resp = client.get("/v1/nothing")
    assert resp.status_code == 404 and resp.headers["x-request-id"].startswith("req_")
    assert (
        client.get("/health", headers={"x-request-id": "mine"}).headers.get_list("x-request-id")
        == []
    )  # the caller's id (Serve's proxy echoes its own)
    client.get("/v1/models/qwen-image-edit")
    client.post("/v1/models")
    assert metrics.requests == [
        ("unmatched", 404),
        ("/health", 200),
        ("/v1/models/{model_id}", 200),
        ("/v1/models", 405),
    ]


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/v1/images/edits", "/v1/images/edits"),
        ("GET", "/v1/images/img-1700000000000-" + "0" * 32 + ".png", "/v1/images/{image_id}"),
        ("GET", "/v1/models", "/v1/models"),
        ("GET", "/v1/models/qwen-image-edit", "/v1/models/{model_id:path}"),
        ("GET", "/ready", "/ready"),
        ("GET", "/", "/"),
    ],
)
def test_serves_proxy_can_name_every_route_in_its_access_log(
    method: str, path: str, route: str
) -> None:
    """Serve's proxy rebuilds the app's routes from their paths (no custom convertors) to name
    each request's route in the access log and metrics; a route it cannot rebuild makes it
    name every request by the route prefix ("GET /")."""
    from ray.serve._private.thirdparty.get_asgi_route_name import (
        extract_route_patterns,
        get_asgi_route_name,
    )
    from starlette.applications import Starlette
    from starlette.routing import Route

    client, _ = make_client()
    patterns = extract_route_patterns(client.app)
    # The proxy's process registers none of ours: only Starlette's own convertors exist there.
    for pattern in patterns:
        used = set(re.findall(r"{\w+:(\w+)}", pattern.path))
        assert used <= {"str", "path", "int", "float", "uuid"}, pattern.path

    async def endpoint(request: Any) -> None:
        return None

    # As ray.serve._private.proxy_router.ProxyRouter.match_route_pattern builds it.
    mock = Starlette(routes=[Route(p.path, endpoint, methods=p.methods) for p in patterns])
    # Under a route prefix, as the proxy hands the scope on (the path includes the prefix).
    scope = {"type": "http", "method": method, "path": "/app" + path, "root_path": "/app"}
    assert get_asgi_route_name(mock, scope) == "/app" + route
    # The ingress itself still tells a stored image from other names under /v1/images.
    assert client.get("/v1/images/generations").status_code == 404
