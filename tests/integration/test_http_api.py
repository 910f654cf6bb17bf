"""End to end over HTTP: the official openai client and raw multipart against the real app."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.common.timing import parse_server_timing
from tests.integration.conftest import Server, model_stats

pytestmark = pytest.mark.integration


def png(width: int = 48, height: int = 40, mode: str = "RGB", color: Any = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def edit(server: Server, files: list[tuple[str, Any]], **data: Any) -> httpx.Response:
    data.setdefault("prompt", "make it blue")
    return httpx.post(
        f"{server.url}/v1/images/edits",
        data={k: str(v) for k, v in data.items()},
        files=files,
        timeout=120,
    )


def test_ready_went_from_503_to_200(server: Server) -> None:
    statuses = [status for status, _ in server.ready_history]
    assert statuses[-1] == 200
    # Before the model replica had loaded, /ready answered OpenAI-style 503s.
    assert (503, "model_not_ready") in server.ready_history, server.ready_history
    assert all(s in (200, 503) for s in statuses)


def test_openai_client_single_image(client: openai.OpenAI) -> None:
    result = client.images.edit(
        model="qwen-image-edit",
        image=("in.png", png(), "image/png"),
        prompt="add a hat",
        size="64x48",
    )
    assert result.size == "64x48" and result.output_format == "png"
    assert len(result.data) == 1
    assert decode(result.data[0].b64_json).size == (64, 48)
    assert result.usage is not None and result.usage.output_tokens == 4 * 3


def test_openai_client_several_images_and_n(client: openai.OpenAI) -> None:
    images = [
        ("a.png", png(), "image/png"),
        ("b.png", png(32, 64, color=(0, 90, 200)), "image/png"),
    ]
    result = client.images.edit(
        model="qwen-image-edit-2509", image=images, prompt="combine them", n=2, size="48x48"
    )
    assert len(result.data) == 2
    decoded = [np.asarray(decode(d.b64_json)) for d in result.data]
    assert all(a.shape == (48, 48, 3) for a in decoded)
    assert not np.array_equal(decoded[0], decoded[1])  # no seed: each image its own noise


def test_openai_client_extensions_through_extra_body(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=("in.png", png(), "image/png"), prompt="x", size="32x32",
        extra_body={"seed": 3, "num_inference_steps": 1, "negative_prompt": "blurry", "true_cfg_scale": 2.0},
    )  # fmt: skip
    assert decode(result.data[0].b64_json).size == (32, 32)


@pytest.mark.parametrize("field", ["image", "image[]"])
def test_raw_multipart_field_names(server: Server, field: str) -> None:
    resp = edit(server, [(field, ("a.png", png(), "image/png"))], size="32x32")
    assert resp.status_code == 200, resp.text
    repeated = [(field, ("a.png", png(), "image/png")), (field, ("b.png", png(), "image/png"))]
    assert edit(server, repeated, size="32x32").status_code == 200


# The seed server's documented request (docs/migrating.md), as its multi-GPU guide writes it.
SEED_CURL = (
    'curl -X POST http://localhost:8000/v1/images/edits -F "prompt=test" -F "images=@test.jpg"'
)


def test_seed_servers_curl_verbatim(server: Server, tmp_path: Path) -> None:
    Image.new("RGB", (64, 48), (10, 120, 200)).save(tmp_path / "test.jpg", format="JPEG")
    port = server.url.rsplit(":", 1)[1]
    command = SEED_CURL.replace("localhost:8000", f"localhost:{port}")
    done = subprocess.run(
        f'{command} -s -w "\n%{{http_code}}"',
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    body, status = done.stdout.rsplit("\n", 1)
    assert status == "200", body
    result = json.loads(body)
    assert decode(result["data"][0]["b64_json"]).format == "PNG"
    # The fields the seed's clients read, beside OpenAI's.
    usage = result["usage"]
    assert (usage["input_images"], usage["generated_images"]) == (1, 1)
    assert usage["processing_time_seconds"] > 0 and usage["output_tokens"] > 0


@pytest.mark.parametrize("field", ["images", "images[]"])
def test_seed_images_field_with_several_files(server: Server, field: str) -> None:
    files = [(field, (f"{i}.png", png(), "image/png")) for i in range(2)]
    resp = edit(server, files, size="32x32", n=2)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["input_images"] == 2
    assert resp.json()["usage"]["generated_images"] == 2


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_decode_at_the_claimed_size(server: Server, fmt: str, pil: str) -> None:
    resp = edit(
        server,
        [("image", ("a.png", png(), "image/png"))],
        size="80x48",
        output_format=fmt,
        output_compression=70,
    )
    body = resp.json()
    assert resp.status_code == 200 and body["output_format"] == fmt
    img = decode(body["data"][0]["b64_json"])
    assert img.format == pil and f"{img.size[0]}x{img.size[1]}" == body["size"] == "80x48"


def test_size_auto_keeps_the_first_input_aspect(server: Server) -> None:
    resp = edit(server, [("image", ("wide.png", png(200, 100), "image/png"))], size="auto")
    body = resp.json()
    w, h = (int(v) for v in body["size"].split("x"))
    assert decode(body["data"][0]["b64_json"]).size == (w, h)
    assert w > h and w % 16 == 0 and h % 16 == 0


@pytest.mark.parametrize(
    "mode,color", [("RGBA", (10, 200, 10, 128)), ("L", 90), ("LA", (30, 200)), ("P", 3)]
)
def test_rgba_grayscale_palette_inputs(server: Server, mode: str, color: Any) -> None:
    resp = edit(
        server, [("image", ("x.png", png(mode=mode, color=color), "image/png"))], size="32x32"
    )
    assert resp.status_code == 200, resp.text


def test_seed_reproducibility(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png"))]
    a = edit(server, files, size="32x32", seed=1234).json()["data"][0]["b64_json"]
    b = edit(server, files, size="32x32", seed=1234).json()["data"][0]["b64_json"]
    c = edit(server, files, size="32x32", seed=999).json()["data"][0]["b64_json"]
    assert a == b
    assert a != c


def test_openai_client_gets_the_seeds_it_did_not_send(client: openai.OpenAI) -> None:
    image = ("in.png", png(), "image/png")
    first = client.images.edit(image=image, prompt="add a hat", size="32x32", n=2)
    seeds = [(d.model_extra or {})["seed"] for d in first.data]
    assert seeds[1] == seeds[0] + 1  # image i uses seed + i
    # Sending the first seed back reproduces the batch, byte for byte, and nothing is echoed.
    again = client.images.edit(
        image=image, prompt="add a hat", size="32x32", n=2, extra_body={"seed": seeds[0]}
    )
    assert [d.b64_json for d in again.data] == [d.b64_json for d in first.data]
    assert all("seed" not in (d.model_extra or {}) for d in again.data)


@pytest.mark.parametrize(
    "files,data,status,param",
    [
        ([("image", ("a.png", png(), "image/png"))], {"prompt": ""}, 400, "prompt"),
        ([], {"prompt": "x"}, 400, "image"),
        ([("image", ("a.png", b"not an image", "image/png"))], {}, 400, "image"),
        ([("image", ("a.png", png(), "image/png"))], {"size": "huge"}, 400, "size"),
        ([("image", ("a.png", png(), "image/png"))], {"size": "4096x4096"}, 400, "size"),
        ([("image", ("a.png", png(), "image/png"))], {"n": 4}, 400, "n"),
        ([("image", ("a.png", png(), "image/png"))], {"output_format": "bmp"}, 400, "output_format"),
        ([("image", ("a.png", png(), "image/png"))], {"model": "gpt-image-1"}, 400, "model"),
        ([("image[]", (f"{i}.png", png(), "image/png")) for i in range(4)], {}, 400, "image[]"),
        ([("images", ("a.png", b"not an image", "image/png"))], {}, 400, "images"),
        ([("image", ("a.png", png(1200, 1200, color=None) + b"\0" * (3 * 1024 * 1024), "image/png"))], {}, 413, None),
    ],
)  # fmt: skip
def test_errors_over_http(
    server: Server, files: Any, data: dict[str, Any], status: int, param: str | None
) -> None:
    resp = edit(server, files, **data)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    assert isinstance(err["code"], str) and err["code"]


def test_n_above_the_limit_states_this_servers_limit(server: Server) -> None:
    err = edit(server, [("image", ("a.png", png(), "image/png"))], n=999).json()["error"]
    assert err["param"] == "n" and "between 1 and 3 on this server" in err["message"]


def _raw_edit(server: Server, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/images/edits",
        content=body,
        headers={"content-type": content_type.encode("latin-1")},
        timeout=120,
    )


def test_content_type_is_read_case_insensitively_and_odd_charsets_never_500(
    server: Server,
) -> None:
    from tests.fixtures import BOUNDARY, multipart

    body, _ = multipart([("prompt", b"make it blue"), ("size", b"32x32")], image=png())
    ok = _raw_edit(server, body, f"Multipart/Form-Data; Boundary={BOUNDARY}; Charset=UTF-8")
    assert ok.status_code == 200, ok.text[:300]
    for charset in ("no-such-charset", "rot13", "utf-16", "\xff"):
        resp = _raw_edit(
            server, body, f"multipart/form-data; boundary={BOUNDARY}; charset={charset}"
        )
        assert resp.status_code == 415, resp.text[:300]
        assert resp.json()["error"]["code"] == "unsupported_charset"


@pytest.mark.parametrize("field", ["mask", "image[]"])
def test_a_file_field_sent_as_text_is_refused_not_ignored(server: Server, field: str) -> None:
    before = model_stats("http-api").get("ok", 0)
    resp = edit(server, [("image", ("a.png", png(), "image/png"))], size="32x32", **{field: "x"})
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["param"] == field
    assert resp.json()["error"]["code"] == "invalid_field_type"
    assert model_stats("http-api").get("ok", 0) == before  # no edit ran


def test_a_scalar_field_sent_as_a_file_is_refused(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png")), ("size", ("s.txt", b"32x32", "text/plain"))]
    err = edit(server, files).json()["error"]
    assert (err["param"], err["code"]) == ("size", "invalid_field_type")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/images/edits", {"POST"}), ("POST", "/v1/models", {"GET", "HEAD"})],
)
def test_405_names_the_allowed_methods(
    server: Server, method: str, path: str, allow: set[str]
) -> None:
    resp = httpx.request(method, f"{server.url}{path}")
    assert resp.status_code == 405
    # Starlette lists a route's methods from a set: the order is not fixed (nor need it be).
    assert {m.strip() for m in resp.headers["allow"].split(",")} == allow
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_a_spoofed_host_gets_no_link(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png"))]
    data = {"prompt": "p", "size": "32x32", "response_format": "url"}
    url = f"{server.url}/v1/images/edits"
    spoofed = httpx.post(url, data=data, files=files, headers={"host": "evil.example"})
    assert spoofed.status_code == 400, spoofed.text[:300]
    assert spoofed.json()["error"]["code"] == "host_not_allowed"
    # Forwarded headers from a client that is no configured proxy change nothing.
    forwarded = {"x-forwarded-host": "evil.example", "x-forwarded-proto": "https"}
    link = httpx.post(url, data=data, files=files, headers=forwarded, timeout=120)
    assert link.status_code == 200, link.text[:300]
    assert link.json()["data"][0]["url"].startswith(f"{server.url}/v1/images/img-")


def test_a_foreign_origin_runs_no_edit_and_the_own_origin_does(server: Server) -> None:
    files = [("image", ("a.png", png(), "image/png"))]
    data = {"prompt": "p", "size": "32x32"}
    url = f"{server.url}/v1/images/edits"
    before = model_stats("http-api").get("ok", 0)
    foreign = httpx.post(url, data=data, files=files, headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "cross_site_request"
    assert model_stats("http-api").get("ok", 0) == before
    origin = str(httpx.URL(server.url).copy_with(path="/")).rstrip("/")
    own = httpx.post(url, data=data, files=files, headers={"origin": origin}, timeout=120)
    assert own.status_code == 200, own.text[:300]


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("a.png", png(), "image/png"), prompt="x", n=9)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "n"


def test_unknown_route_is_openai_json(server: Server) -> None:
    resp = httpx.get(f"{server.url}/v1/images/generations")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["qwen-image-edit", "qwen-image-edit-2509"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["pipeline"] == "QwenImageEditPlusPipeline"
    assert ready["device_map"]["transformer"] == "cpu" and ready["placement"]
    # The placement table only; what the speed switches did is listed apart.
    assert not any(line.startswith("modulation") for line in ready["placement"])
    assert isinstance(ready["speed"], list)


def test_request_id_is_echoed_once(server: Server) -> None:
    resp = edit(server, [("image", ("a.png", b"junk", "image/png"))], size="32x32")
    assert resp.status_code == 400
    assert len(resp.headers.get_list("x-request-id")) == 1
    mine = httpx.post(
        f"{server.url}/v1/images/edits", headers={"x-request-id": "abc123"}, data={"prompt": "x"}
    )
    assert mine.headers.get_list("x-request-id") == ["abc123"]


def test_server_timing_header(server: Server) -> None:
    resp = edit(server, [("image", ("a.png", png(), "image/png"))], size="64x48", seed=1)
    assert resp.status_code == 200, resp.text
    header = resp.headers["server-timing"]
    for part in header.split(", "):  # name;dur=<ms> each, as written
        name, _, dur = part.partition(";dur=")
        assert name.isidentifier() and float(dur) >= 0, part
    ms = parse_server_timing(header)
    stages = {"parse", "decode", "queue", "pipeline", "replica", "model", "encode", "body", "total"}
    assert stages <= set(ms)
    # Nested stages: the ingress's total holds the model call, which holds the replica's time,
    # which holds the pipeline's (each rounded to 0.1 ms).
    assert ms["total"] >= ms["model"] >= ms["replica"] >= ms["pipeline"] > 0
    assert ms["model"] >= ms["queue"]
    assert ms["total"] >= ms["parse"] + ms["decode"] + ms["model"] + ms["encode"] - 0.5


def test_server_keeps_serving_after_errors(server: Server) -> None:
    for _ in range(3):
        edit(server, [("image", ("a.png", b"junk", "image/png"))])
    assert edit(server, [("image", ("a.png", png(), "image/png"))], size="32x32").status_code == 200


def test_prometheus_metrics_after_requests(server: Server) -> None:
    import time

    edit(server, [("image", ("a.png", png(), "image/png"))], size="32x32", n=2)
    edit(server, [("image", ("a.png", png(), "image/png"))], size="nope")
    wanted = [
        "ray_qwen_edit_requests_total{",
        "ray_qwen_edit_request_latency_seconds_bucket{",
        "ray_qwen_edit_images_per_request_bucket{",
        "ray_qwen_edit_runs_total{",
        "ray_qwen_edit_pipeline_seconds_bucket{",
        "ray_qwen_edit_queue_wait_seconds_bucket{",
        "ray_qwen_edit_denoise_step_seconds_bucket{",
        "ray_serve_num_http_requests_total{",  # Ray Serve's own metrics ride along
    ]

    def checks(text: str) -> list[str]:
        failed = [w for w in wanted if w not in text]
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_qwen_edit_requests_total{")]
        if not any('status="200"' in ln and 'route="/v1/images/edits"' in ln for ln in lines):
            failed.append("a 200 edit in requests_total")
        if not any('status="400"' in ln for ln in lines):
            failed.append("a 400 in requests_total")
        runs = [ln for ln in text.splitlines() if ln.startswith("ray_qwen_edit_runs_total{")]
        if not any('outcome="ok"' in ln and float(ln.rsplit(" ", 1)[1]) >= 1 for ln in runs):
            failed.append("an ok run in runs_total")
        return failed

    # Ray exports metrics in batches every few seconds: poll until all have arrived.
    failed: list[str] = ["nothing read yet"]
    deadline = time.monotonic() + 90
    while failed and time.monotonic() < deadline:
        failed = checks(httpx.get(server.metrics_url, timeout=10).text)
        if failed:
            time.sleep(2)
    assert not failed, failed


# --- inputs past what the model takes: a 400 naming the field, before the model replica ------


def tiny_tokens() -> Any:
    """The tiny model's own tokenizer, as the replica shares it with the ingress."""
    from serve_app.ingress.tokens import PromptTokenizer
    from serve_app.pipeline.random_weights.tiny import ensure_tiny_model

    path = ensure_tiny_model() / "tokenizer" / "tokenizer.json"
    from tokenizers import Tokenizer

    return PromptTokenizer(Tokenizer.from_file(str(path)))


PAST_THE_MODEL = [
    ({"prompt": "猫" * 400}, None, "prompt"),  # 400 characters, 1200 of the tiny model's tokens
    ({"prompt": "😀" * 300}, None, "prompt"),
    ({"negative_prompt": "x" * 100_000}, None, "negative_prompt"),
    ({"negative_prompt": "字" * 400}, None, "negative_prompt"),
    ({"prompt": "a <|image_pad|> b"}, None, "prompt"),
    ({"negative_prompt": "<|im_end|>"}, None, "negative_prompt"),
    ({"prompt": "make\x00it blue"}, None, "prompt"),
    ({"size": "１２８x１２８"}, None, "size"),
    ({}, [("image", png(404, 4))], "image"),
    ({}, [("image[]", png(40, 40)), ("image[]", png(3, 900))], "image[]"),
    ({}, [("image", png(1, 101))], "image"),
]


@pytest.mark.parametrize("data,files,param", PAST_THE_MODEL)
def test_inputs_past_the_models_limits_are_400_before_the_model(
    server: Server, data: dict[str, str], files: list[tuple[str, bytes]] | None, param: str
) -> None:
    before = model_stats(server.app)
    parts = [(name, ("f.png", blob, "image/png")) for name, blob in files or [("image", png())]]
    resp = edit(server, parts, **{"size": "32x32", **data})
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert model_stats(server.app) == before  # no edit started, none failed


def test_invalid_utf8_is_400_before_the_model(server: Server) -> None:
    from tests.fixtures import multipart

    before = model_stats(server.app)
    body, content_type = multipart([("prompt", b"caf\xe9 au lait"), ("size", b"32x32")])
    resp = httpx.post(
        f"{server.url}/v1/images/edits",
        content=body,
        headers={"content-type": content_type},
        timeout=60,
    )
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["error"]["param"] == "prompt"
    assert resp.json()["error"]["code"] == "invalid_encoding"
    assert model_stats(server.app) == before


def test_inputs_at_the_models_limits_are_edited(client: openai.OpenAI) -> None:
    from tests.fixtures import text_of_tokens

    tokens = tiny_tokens()
    limit = 1024  # limits.max_prompt_tokens' default: the pipelines' max_sequence_length
    wide = png(400, 4)  # aspect ratio 100:1, the default limit
    result = client.images.edit(
        image=[("wide.png", wide, "image/png"), ("tall.png", png(4, 400), "image/png")],
        prompt=text_of_tokens(limit, tokens.count),
        size="32x32",
        extra_body={
            "negative_prompt": text_of_tokens(limit, tokens.count, offset=1),
            "true_cfg_scale": 4.0,
            "num_inference_steps": 1,
        },
    )
    assert len(result.data) == 1
    assert result.usage is not None and result.usage.input_tokens_details.text_tokens == limit
